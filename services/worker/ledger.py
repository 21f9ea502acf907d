"""What a worker has fetched, finished and published, partition by partition.

Tasks finish out of order, and each finished task is published at once (a fast task never waits for a slow one
fetched before it): its result goes out in a Kafka transaction that also commits the partition's offsets. The
committed offset stays the partition's lowest offset not yet published, and the offsets above it that *are*
published travel with it in the offset commit's metadata (``finished_offsets``), in the same transaction. A
crash or a rebalance therefore leaves, for every partition, a committed offset and the set of later offsets
whose results are committed; the next owner (``assign`` with that set) skips exactly those and runs the rest.
A result is visible exactly when the commit recording its offset is, so no task's result is ever published
twice, and none is lost.

Thread-safe: the event loop records outcomes while the publisher thread takes what is ready and the
consumer thread assigns and releases partitions.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from aimesh import finished_offsets
from aimesh.kafka import Headers

TopicPartitionKey = tuple[str, int]
# A committed offset and its metadata, as the group coordinator holds them.
Committed = tuple[int, str]


@dataclass(frozen=True)
class OutRecord:
    """A record to publish inside the transaction that commits its task's offset."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: Headers


# Why Kafka refused a record for good: its size, something else about it, or its topic taking no record at all.
RefusalScope = Literal["size", "record", "topic"]


@dataclass(frozen=True)
class Refusal:
    """Kafka refused ``records[index]`` of a publish for good: the same record would be refused again."""

    index: int
    scope: RefusalScope
    code: str  # librdkafka's name of the error, e.g. MSG_SIZE_TOO_LARGE
    reason: str  # its description


@dataclass(frozen=True)
class Outcome:
    """What a finished task publishes, and what to do once that is committed (count it, say).

    ``smaller(refusal)`` builds what replaces this outcome when Kafka refused one of its records for good: a smaller
    outcome of the same task, or None when nothing smaller can help (the topic refuses every record: wait).
    """

    records: tuple[OutRecord, ...] = ()
    on_committed: Callable[[], None] | None = None
    smaller: Callable[[Refusal], Outcome | None] | None = None


# What stands in the ledger for an offset whose result is published: its outcome is not needed any more.
_PUBLISHED = Outcome()
# Most offsets of one partition published above its committed offset (held there by a task that still runs). Past
# it, the partition's later tasks wait for the ones below them again, as they all did before out-of-order
# publishing: the published offsets are encoded into every commit of the partition, and are kept in memory.
MAX_PUBLISHED_AHEAD = 4096


@dataclass
class Partition:
    """One owned partition in one assignment: re-assignment makes a new object, so a task that finishes for
    an earlier assignment is recognised as stale."""

    key: TopicPartitionKey
    # Fetched offsets not yet below the committed offset, in fetch order (which is offset order) -> outcome: None
    # while the task runs, _PUBLISHED once its result is published.
    pending: dict[int, Outcome | None] = field(default_factory=dict)
    # The finished outcomes in ``pending`` not yet published, and the offsets that are _PUBLISHED: kept apart so that
    # what a publish needs is found without a scan of ``pending``.
    finished: dict[int, Outcome] = field(default_factory=dict)
    published: set[int] = field(default_factory=set)
    next_offset: int | None = None  # one past the highest offset fetched
    committed: int | None = None  # the committed offset: read at assignment, then the one last committed
    # Offsets above the committed one that the commit's metadata records as published: never run again.
    skip: frozenset[int] = frozenset()
    released: bool = False


@dataclass(frozen=True)
class Ready:
    """What one partition can publish now: ``outcomes`` (of ``offsets``), committing ``next_offset`` with
    ``metadata`` (the offsets above it already published, this publish's included)."""

    partition: Partition
    next_offset: int
    outcomes: tuple[Outcome, ...]
    offsets: tuple[int, ...]  # the offset of each outcome
    metadata: str = ""


class Ledger:
    def __init__(
        self,
        *,
        max_metadata_bytes: int = finished_offsets.MAX_METADATA_BYTES,
        max_published_ahead: int = MAX_PUBLISHED_AHEAD,
    ) -> None:
        self._lock = threading.Lock()
        self._partitions: dict[TopicPartitionKey, Partition] = {}
        self._max_metadata_bytes = max_metadata_bytes
        self._max_published_ahead = max_published_ahead

    def assign(
        self, keys: list[TopicPartitionKey], committed: dict[TopicPartitionKey, Committed] | None = None
    ) -> None:
        """Own ``keys`` from now on; ``committed`` gives, for those whose group has committed an offset, that offset and
        its metadata (the published offsets above it, which are skipped when fetched)."""
        with self._lock:
            for key in keys:
                if key not in self._partitions:
                    partition = self._partitions[key] = Partition(key)
                    if committed is not None and key in committed:
                        offset, metadata = committed[key]
                        partition.committed = offset
                        partition.skip = finished_offsets.decode(offset, metadata)

    def release(self, keys: list[TopicPartitionKey]) -> list[Partition]:
        """Forget the partitions (revoked or lost): their unpublished work is dropped and runs again on
        their next owner. Returns the released partitions, whose running tasks can be cancelled."""
        with self._lock:
            released = [p for key in keys if (p := self._partitions.pop(key, None)) is not None]
            for partition in released:
                partition.released = True
            return released

    def fetched(self, key: TopicPartitionKey, offset: int) -> Partition | None:
        """Record a fetched offset as running. None when the partition is not owned (a fetch that raced its
        revocation), the offset was already seen, or its result is published already (the committed metadata says
        so): the caller must not run it."""
        with self._lock:
            partition = self._partitions.get(key)
            if partition is None or (partition.next_offset is not None and offset < partition.next_offset):
                return None
            partition.next_offset = offset + 1
            if offset in partition.skip:
                partition.pending[offset] = _PUBLISHED
                partition.published.add(offset)
                return None
            partition.pending[offset] = None
            return partition

    def finished(self, partition: Partition, offset: int, outcome: Outcome) -> bool:
        """Record a task's outcome. False if its partition was released meanwhile (the outcome is dropped)."""
        with self._lock:
            if partition.released or offset not in partition.pending or partition.pending[offset] is not None:
                return False
            partition.pending[offset] = partition.finished[offset] = outcome
            return True

    def ready(self, keys: set[TopicPartitionKey] | None = None) -> list[Ready]:
        """For every owned partition (or each of ``keys``) with finished outcomes not yet published, or a committed
        offset that can move up: what to publish and commit."""
        with self._lock:
            out: list[Ready] = []
            for key, partition in self._partitions.items():
                if keys is None or key in keys:
                    ready = self._ready(partition)
                    if ready is not None:
                        out.append(ready)
            return out

    def _ready(self, partition: Partition) -> Ready | None:
        if not partition.finished and not (partition.pending and next(iter(partition.pending.values())) is _PUBLISHED):
            return None  # nothing to publish, and the committed offset cannot move
        offsets = sorted(partition.finished)
        take = len(offsets)
        commit, metadata, ahead = self._commit(partition, offsets)
        if len(metadata) > self._max_metadata_bytes or ahead > self._max_published_ahead:
            # Too many offsets to record: publish the lowest ones that fit, the rest once the committed offset has
            # caught up with them. None at all always fits: the published ones fitted when they were committed.
            low, high = 0, take
            while high - low > 1:
                middle = (low + high) // 2
                _, encoded, count = self._commit(partition, offsets[:middle])
                if len(encoded) <= self._max_metadata_bytes and count <= self._max_published_ahead:
                    low = middle
                else:
                    high = middle
            take = low
            commit, metadata, _ = self._commit(partition, offsets[:take])
        if not take and (partition.committed is None or commit <= partition.committed):
            return None
        chosen = offsets[:take]
        return Ready(partition, commit, tuple(partition.finished[o] for o in chosen), tuple(chosen), metadata)

    @staticmethod
    def _commit(partition: Partition, publishing: list[int]) -> tuple[int, str, int]:
        """The offset to commit once ``publishing`` is published too, the metadata recording the published offsets
        above it, and how many those are."""
        adding = set(publishing)
        commit = partition.next_offset
        for offset, outcome in partition.pending.items():  # only the head: everything below the commit is gone
            if outcome is not _PUBLISHED and offset not in adding:
                commit = offset
                break
        assert commit is not None  # something was fetched
        ahead = [o for o in partition.published if o > commit] + [o for o in publishing if o > commit]
        return commit, finished_offsets.encode(commit, ahead), len(ahead)

    def replace(self, partition: Partition, offset: int, outcome: Outcome) -> bool:
        """Put ``outcome`` in place of the finished one at ``offset`` (Kafka refused a record of that one). False if
        the partition was released or the offset is not finished and unpublished."""
        with self._lock:
            if partition.released or offset not in partition.finished:
                return False
            partition.pending[offset] = partition.finished[offset] = outcome
            return True

    def committed(self, ready: list[Ready]) -> None:
        """The transaction publishing ``ready`` committed: its outcomes are published, and nothing below its
        committed offset is kept."""
        with self._lock:
            for r in ready:
                partition = r.partition
                for offset in r.offsets:
                    if partition.finished.pop(offset, None) is not None:
                        partition.pending[offset] = _PUBLISHED
                        partition.published.add(offset)
                lowest = next(iter(partition.pending), r.next_offset)
                for offset in range(lowest, r.next_offset):  # offsets are dense, but for transaction markers
                    partition.pending.pop(offset, None)
                    partition.published.discard(offset)
                    partition.finished.pop(offset, None)
                partition.committed = r.next_offset

    def pending(self) -> int:
        """Records fetched and not yet published (running, or finished and waiting to be published)."""
        with self._lock:
            return sum(len(p.pending) - len(p.published) for p in self._partitions.values())

    def owned(self) -> list[TopicPartitionKey]:
        with self._lock:
            return list(self._partitions)

    def committed_offsets(self) -> dict[TopicPartitionKey, int | None]:
        """Each owned partition with its committed offset (None: not known; the group has committed none)."""
        with self._lock:
            return {key: partition.committed for key, partition in self._partitions.items()}
