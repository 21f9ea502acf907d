"""Publishing results at least once: an idempotent producer, each record acknowledged before its offsets are committed.

The ``at_least_once`` processing guarantee (``AIMESH_PROCESSING_GUARANTEE``). No transaction: a result is visible to
read_committed readers as soon as the broker has it, one round trip instead of a transaction's four. The price: a
worker that dies after a result is acknowledged and before its offset is committed runs the task again on the
partition's next owner, and that task's terminal result is on the results topic twice. The notifier keeps a task's
first terminal result and drops any later one, so subscribers and ``GetTask`` still see exactly one.

The offsets are committed by the consumer thread (``commit``), not here: a call on the Consumer from another thread
waits for its ``consume()`` to return, and the consumer thread calls ``consume()`` back to back. ``publish`` hands
them over once every record is acknowledged; the consumer thread commits them asynchronously every
``commit_interval_s`` (as Kafka's own consumers and Kafka Streams commit at an interval under at-least-once: one
commit per fetch would be a broker write per few tasks), and synchronously when partitions are revoked, before they
move. A crash re-runs at most the tasks published in the last interval.

Errors map onto the transactional publisher's (``transactions``), so the worker handles both modes alike:

- a record refused for good (too large, its topic takes nothing): ``TransactionAborted`` naming it. The other
  records of the call were published; publishing again publishes them a second time (at least once);
- a delivery that failed otherwise (timed out, the broker away): ``TransactionAborted`` naming nothing;
- a fatal idempotence error: ``TransactionFatal``; the worker recreates the producer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from aimesh import kafka

from .ledger import OutRecord, TopicPartitionKey
from .transactions import (
    CALL_TIMEOUT_S,
    ProducerFactory,
    TransactionAborted,
    TransactionFatal,
    refusal,
    retry_produce,
)

log = logging.getLogger(__name__)


def acknowledged_config(base: dict[str, Any], *, max_record_bytes: int | None = None) -> dict[str, Any]:
    """The idempotent producer's settings (``base``) with the worker's record size limit as ``message.max.bytes``
    (unless ``base`` sets it), as ``transactions.transactional_config`` does."""
    config = dict(base)
    if max_record_bytes is not None:
        config.setdefault("message.max.bytes", max_record_bytes)
    # A record is acknowledged before the worker goes on: lingering would only delay that.
    config["linger.ms"] = 0
    return config


class AcknowledgedPublisher:
    """Owns one idempotent producer, built by ``producer_factory``, and the offsets waiting to be committed.
    ``publish`` from one thread at a time; ``commit`` from the consumer's thread."""

    def __init__(
        self,
        config: dict[str, Any],
        *,
        commit_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        producer_factory: ProducerFactory = kafka.producer,
    ) -> None:
        self._config = config
        self._new_producer = producer_factory
        self._commit_interval_s = commit_interval_s
        self._clock = clock
        self._producer: Producer | None = None
        self._lock = threading.Lock()
        self._uncommitted: dict[TopicPartitionKey, TopicPartition] = {}
        self._committed_at = clock()

    @property
    def transactional_id(self) -> str:
        return "none (at_least_once)"

    def start(self) -> None:
        self._producer = self._new_producer(self._config, logger=log)

    def fence(self, timeout_s: float) -> bool:
        """Nothing to resolve: a publish stuck in a call holds no transaction, and a result it still delivers is at
        worst a second copy, which the at-least-once guarantee allows."""
        return True

    def recreate(self) -> None:
        self.close()
        with self._lock:
            self._uncommitted.clear()  # the worker rewinds to the committed offsets: these tasks run again
        self.start()

    def close(self) -> None:
        """Flush and drop the producer; one in a fatal state, which refuses to flush, is dropped all the same."""
        if self._producer is not None:
            producer, self._producer = self._producer, None
            try:
                producer.flush(CALL_TIMEOUT_S)
            except KafkaException as e:
                log.warning("producer %s dropped unflushed: %s", self.transactional_id, e.args[0].str())

    def publish(self, records: list[OutRecord], offsets: list[TopicPartition], group_metadata: Any) -> None:
        """Publish ``records`` and wait for every acknowledgement, then hand ``offsets`` to ``commit``.
        ``group_metadata`` is unused (no transaction)."""
        producer = self._producer
        if producer is None:
            raise RuntimeError("publisher is not started")
        errors: dict[int, KafkaError] = {}
        for index, record in enumerate(records):
            try:
                retry_produce(producer, record, index, errors)
            except KafkaException:
                pass  # noted in errors; the other records still go out, and the call fails below
        while producer.flush(CALL_TIMEOUT_S) > 0:
            pass  # each record either arrives or fails within message.timeout.ms
        if errors:
            self._failed(errors)
        with self._lock:
            for tp in offsets:
                self._uncommitted[(tp.topic, tp.partition)] = tp

    def commit(self, consumer: Consumer, keys: set[TopicPartitionKey] | None = None, *, wait: bool = False) -> None:
        """Commit the offsets handed over by ``publish`` (of ``keys``, or all) through ``consumer``: asynchronously once
        ``commit_interval_s`` has passed since the last commit, or, with ``wait``, now and before returning (a revoke:
        the partitions' next owner reads them). Consumer thread only. A commit the broker refuses (the partition
        moved meanwhile) leaves its tasks to run again."""
        if not wait and self._clock() - self._committed_at < self._commit_interval_s:
            return
        self._committed_at = self._clock()
        with self._lock:
            chosen = [key for key in self._uncommitted if keys is None or key in keys]
            offsets = [self._uncommitted.pop(key) for key in chosen]
        if not offsets:
            return
        try:
            if wait:
                consumer.commit(offsets=offsets, asynchronous=False)
            else:
                consumer.commit(offsets=offsets, asynchronous=True)
        except KafkaException as e:
            log.warning("offsets of %d partitions not committed (their tasks may run again): %s", len(offsets), e)

    def forget(self, keys: set[TopicPartitionKey]) -> None:
        """Drop the uncommitted offsets of partitions this worker lost: they belong to another member now."""
        with self._lock:
            for key in keys:
                self._uncommitted.pop(key, None)

    @staticmethod
    def _failed(errors: dict[int, KafkaError]) -> None:
        fatal = next((error for error in errors.values() if error.fatal()), None)
        if fatal is not None:
            log.error("the idempotent producer hit a fatal error: %s", fatal.str())
            raise TransactionFatal(fatal.str())
        refused = tuple(r for i, error in sorted(errors.items()) if (r := refusal(i, error)) is not None)
        for r in refused:
            log.warning("record %d was refused (%s): %s", r.index, r.code, r.reason)
        first = errors[min(errors)]
        raise TransactionAborted(f"{len(errors)} records not delivered: {first.str()}", refused)
