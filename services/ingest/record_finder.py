"""Finding out whether a task record whose delivery was not acknowledged landed in its partition after all.

confluent-kafka-python does not expose librdkafka's per-message persistence status (``Message`` has no
``status()``; confluentinc/confluent-kafka-python#529 was closed unmerged), and a delivery timeout
(``_MSG_TIMED_OUT``) is reported both for a record never sent and for one the broker wrote without the
acknowledgement arriving. So the log is asked: the record's key (its task id) picks its partition, and the
record's timestamp is no earlier than the moment it was produced, so reading that partition from the first
offset at or after that time up to its end offset finds it if it is there.

Not finding it proves nothing for good: a request the producer gave up on may still be appended by the broker
later. The caller keeps the key in doubt and asks again on the next retry.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any, Protocol

from confluent_kafka import Consumer, KafkaException, TopicPartition

from aimesh import kafka
from aimesh.errors import AimeshError
from aimesh.kafka import partition_of

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 5.0
# Reading the partition's tail takes at most this long; past it the answer is "not known".
SCAN_TIMEOUT_S = 10.0


class LookupUnavailable(AimeshError):
    """The partition could not be read (broker unreachable, topic missing, scan too long)."""


class RecordFinder(Protocol):
    async def landed(self, topic: str, key: str, since_ms: int) -> bool:
        """Whether a record keyed ``key`` is in ``topic`` with a timestamp at or after ``since_ms``. Raises
        LookupUnavailable when that cannot be told now."""
        ...


class KafkaRecordFinder:
    """Answers with one consumer that never joins a group; lookups run one at a time on a worker thread."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self._config = {
            **kafka.reader_config(config, group_id="aimesh-ingest-record-finder"),
            "isolation.level": "read_uncommitted",  # ingest's producer is not transactional
        }
        self._consumer: Consumer | None = None
        self._lock = threading.Lock()

    async def landed(self, topic: str, key: str, since_ms: int) -> bool:
        return await asyncio.to_thread(self._landed, topic, key.encode(), since_ms)

    def close(self) -> None:
        with self._lock:
            if self._consumer is not None:
                self._consumer.close()
                self._consumer = None

    def _landed(self, topic: str, key: bytes, since_ms: int) -> bool:
        with self._lock:
            if self._consumer is None:
                self._consumer = kafka.consumer(self._config, logger=log)
            try:
                return self._scan(self._consumer, topic, key, since_ms)
            except KafkaException as e:
                raise LookupUnavailable(str(e)) from e
            finally:
                self._consumer.unassign()

    def _scan(self, consumer: Consumer, topic: str, key: bytes, since_ms: int) -> bool:
        partitions = kafka.topic_partitions(consumer, topic, REQUEST_TIMEOUT_S)
        if not partitions:
            raise LookupUnavailable(f"topic {topic} not found")
        partition = partition_of(key, len(partitions))
        start = kafka.offsets_at(consumer, [(topic, partition)], since_ms, REQUEST_TIMEOUT_S)[(topic, partition)]
        _, end = consumer.get_watermark_offsets(TopicPartition(topic, partition), REQUEST_TIMEOUT_S, cached=False)
        if start < 0 or start >= end:  # no record at or after since_ms
            return False
        consumer.assign([TopicPartition(topic, partition, start)])
        give_up_at = time.monotonic() + SCAN_TIMEOUT_S
        while time.monotonic() < give_up_at:
            for message in consumer.consume(500, 0.5):
                if message.error() is None and message.key() == key:
                    return True
            if consumer.position([TopicPartition(topic, partition)])[0].offset >= end:
                return False
        raise LookupUnavailable(f"reading {topic}[{partition}] from offset {start} to {end} took too long")
