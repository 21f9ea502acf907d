"""Dropping repeated task records: one execution per task id derived from an idempotency key.

A submission with an idempotency key gets a task id derived from its tenant and key (a UUID version 5,
``aimesh.ingest.idempotency.derived_task_id``), so a retry that another ingest replica takes publishes a second
record with the same id. The record key is the task id: both land in the same partition. Of the records of one
partition that carry the same derived id, only the first (the lowest offset) runs; a later one is a duplicate: it is
not run and publishes nothing, and its offset is finished like any other (committed through the transaction, so
nothing stalls). Random (version 4) ids never repeat and are not tracked.

Which record is first is a fact of the log, so every owner of a partition reaches the same answer. The owner learns
it as it fetches, and a new owner (after a crash or a rebalance) first reads the partition's records of the last
``window_s`` seconds up to the committed offset, and on to the last offset the commit's metadata records as finished
(``finished_offsets``): every record it will not fetch again. A duplicate is recognised while its first record is at
most ``window_s`` older (by record timestamps, the partition's own clock, so a worker that lags behind by more than
the window still recognises it); older ids are forgotten, which bounds the memory.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from aimesh import finished_offsets, kafka
from aimesh.kafka import fetch

from .ledger import Committed, TopicPartitionKey

log = logging.getLogger(__name__)

# How long an assignment may spend reading a partition's recent records before it goes on without the rest: the
# duplicates of ids it did not read then run again, which is what happened before derived ids.
REBUILD_TIMEOUT_S = 60.0
REBUILD_POLL_S = 0.5
REBUILD_BATCH = 1000


# A canonical (lower-case) UUID version 5 of the RFC 4122 variant. A regular expression: uuid.UUID took half the
# time of reading a partition's records.
_DERIVED_ID = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-5[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def derived_id(key: bytes | None) -> str | None:
    """The task id in record key ``key`` if it is one derived from an idempotency key (a canonical UUID version 5)."""
    if key is None or _DERIVED_ID.fullmatch(key) is None:
        return None
    return key.decode("ascii")


class FirstOffsets:
    """One partition's derived task ids, each with the lowest offset known to carry it and that record's timestamp,
    for the last ``window_s`` seconds of the partition's records. Not thread-safe."""

    def __init__(self, window_s: float) -> None:
        self._window_s = window_s
        # task id -> (lowest offset, timestamp in seconds); insertion order is (about) timestamp order.
        self._first: OrderedDict[str, tuple[int, float]] = OrderedDict()
        self._newest_s = float("-inf")

    def note(self, task_id: str, offset: int, timestamp_s: float) -> bool:
        """Learn that ``offset`` carries ``task_id``; True if a lower offset carries it too: a duplicate. The same
        offset noted again (fetched again after a rewind) is not a duplicate of itself."""
        self._newest_s = max(self._newest_s, timestamp_s)
        self._expire()
        first = self._first.get(task_id)
        if first is not None and first[0] < offset:
            return True
        if first is None or offset < first[0]:
            self._first[task_id] = (offset, timestamp_s)
        return False

    def _expire(self) -> None:
        oldest_s = self._newest_s - self._window_s
        while self._first:
            task_id, (_, timestamp_s) = next(iter(self._first.items()))
            if timestamp_s >= oldest_s:
                break
            del self._first[task_id]

    def __len__(self) -> int:
        return len(self._first)


def rebuild_ranges(
    committed: dict[TopicPartitionKey, Committed], starts: dict[TopicPartitionKey, int]
) -> dict[TopicPartitionKey, tuple[int, int]]:
    """For each partition with a committed offset and a first offset of the window (``starts``): the offsets a new
    owner reads, ``[start, end)``, where ``end`` is one past the last offset it will not fetch again (the committed
    offset, or past the highest finished offset the commit's metadata records). Partitions with nothing to read are
    left out."""
    ranges = {}
    for key, (offset, metadata) in committed.items():
        skipped = finished_offsets.decode(offset, metadata)
        end = max(offset, max(skipped, default=-1) + 1)
        start = starts.get(key, -1)
        if 0 <= start < end:
            ranges[key] = (start, end)
    return ranges


class Duplicates:
    """The first offsets of derived task ids in every owned partition (``FirstOffsets``). Thread-safe: the consumer
    thread assigns and checks, and any thread may release.

    ``consumer_config`` is the worker's own; the records of a newly assigned partition are read with a consumer of
    its own that never joins the group.
    """

    def __init__(self, window_s: float, consumer_config: dict[str, Any]) -> None:
        self._window_s = window_s
        self._config = kafka.reader_config(consumer_config)
        self._config.update(
            {
                "client.id": kafka.client_id_for(consumer_config, "duplicates", default="aimesh-worker"),
                "enable.partition.eof": True,
            }
        )
        self._lock = threading.Lock()
        self._partitions: dict[TopicPartitionKey, FirstOffsets] = {}

    def is_duplicate(self, key: TopicPartitionKey, record_key: bytes | None, offset: int, timestamp_ms: int) -> bool:
        """Whether the record at ``offset`` of partition ``key`` repeats a derived task id an earlier record of the
        partition carries (its task ran, or runs): then it must not run."""
        task_id = derived_id(record_key)
        if task_id is None:
            return False
        with self._lock:
            partition = self._partitions.setdefault(key, FirstOffsets(self._window_s))
            return partition.note(task_id, offset, timestamp_ms / 1000)

    def assign(self, keys: list[TopicPartitionKey], committed: dict[TopicPartitionKey, Committed]) -> None:
        """Own ``keys`` from now on: read, for those with ``committed`` offsets, the derived ids of the window's
        records that will not be fetched again. Blocks while it reads (on the 2-core development machine, 0.5 to
        1.4 s per 100,000 records: docs/design.md)."""
        fresh = {key: FirstOffsets(self._window_s) for key in keys}
        wanted = {key: value for key, value in committed.items() if key in fresh}
        if wanted:
            started = time.monotonic()
            read = self._read(wanted, fresh)
            log.info(
                "read %d recent task records of %d partitions in %.2fs: %d derived task ids",
                read,
                len(wanted),
                time.monotonic() - started,
                sum(len(f) for f in fresh.values()),
            )
        with self._lock:
            self._partitions.update(fresh)

    def release(self, keys: list[TopicPartitionKey]) -> None:
        with self._lock:
            for key in keys:
                self._partitions.pop(key, None)

    def tracked(self, key: TopicPartitionKey) -> int:
        """How many derived task ids partition ``key`` remembers."""
        with self._lock:
            partition = self._partitions.get(key)
            return 0 if partition is None else len(partition)

    def _read(self, committed: dict[TopicPartitionKey, Committed], into: dict[TopicPartitionKey, FirstOffsets]) -> int:
        consumer = kafka.consumer(self._config, logger=log)
        try:
            since_ms = int((time.time() - self._window_s) * 1000)
            ranges = rebuild_ranges(committed, kafka.offsets_at(consumer, committed, since_ms, REBUILD_TIMEOUT_S))
            read = 0
            for key, record_key, offset, timestamp_ms in read_ranges(consumer, ranges, REBUILD_TIMEOUT_S):
                task_id = derived_id(record_key)
                if task_id is not None:
                    into[key].note(task_id, offset, timestamp_ms / 1000)
                read += 1
            return read
        except KafkaException as e:
            # Going on is safe for exactly-once results; only a duplicate of an id not read may run again.
            log.warning("recent task records not read (their duplicates may run again): %s", e.args[0])
            return 0
        finally:
            consumer.close()


def read_ranges(
    consumer: Consumer, ranges: dict[TopicPartitionKey, tuple[int, int]], timeout_s: float
) -> Iterator[tuple[TopicPartitionKey, bytes | None, int, int]]:
    """Each record of ``ranges`` (``[start, end)`` per partition) as (partition, key, offset, timestamp in ms), in
    offset order per partition; at most ``timeout_s`` long (then what is left is logged and not read)."""
    if not ranges:
        return
    consumer.assign([TopicPartition(t, p, start) for (t, p), (start, _) in ranges.items()])
    left = dict(ranges)
    give_up = time.monotonic() + timeout_s
    while left:
        if time.monotonic() > give_up:
            log.warning("gave up reading recent task records of %s after %.0fs", sorted(left), timeout_s)
            return
        for message in fetch(consumer, REBUILD_BATCH, REBUILD_POLL_S):
            key = (str(message.topic()), int(message.partition() or 0))
            if key not in left:
                continue
            error = message.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    del left[key]  # the end of the log: nothing more to read (records may have been deleted)
                elif not error.retriable():  # a retriable one (a broker away) is the consumer's to get past
                    raise KafkaException(error)
                continue
            offset = int(message.offset() or 0)
            if offset >= left[key][1]:
                del left[key]
                continue
            raw = message.key()
            record_key = raw.encode() if isinstance(raw, str) else raw
            yield key, record_key, offset, message.timestamp()[1]
            if offset + 1 >= left[key][1]:
                del left[key]
