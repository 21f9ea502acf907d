"""What a worker has fetched, finished and published, partition by partition.

Tasks finish out of order, but a partition's records are published in offset order: only the *contiguous*
run of finished records at the head of a partition is ready, and it is published in one Kafka transaction
together with the offset one past its last record. A result therefore becomes visible exactly when its
offset is committed, and a crash can never leave a result published for an offset that is not committed
(which would publish it again after the restart).

Thread-safe: the event loop records outcomes while the publisher thread takes what is ready and the
consumer thread assigns and releases partitions.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from aimesh.kafka import Headers

TopicPartitionKey = tuple[str, int]


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


@dataclass
class Partition:
    """One owned partition in one assignment: re-assignment makes a new object, so a task that finishes for
    an earlier assignment is recognised as stale."""

    key: TopicPartitionKey
    # Fetched offsets in fetch order (which is offset order) -> outcome, None while the task runs.
    pending: dict[int, Outcome | None] = field(default_factory=dict)
    next_offset: int | None = None  # one past the highest offset fetched
    committed: int | None = None  # the offset last committed in this assignment
    released: bool = False


@dataclass(frozen=True)
class Ready:
    """The contiguous finished head of one partition: publish ``outcomes``, commit ``next_offset``."""

    partition: Partition
    next_offset: int
    outcomes: tuple[Outcome, ...]
    offsets: tuple[int, ...]  # the offset of each outcome


class Ledger:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._partitions: dict[TopicPartitionKey, Partition] = {}

    def assign(self, keys: list[TopicPartitionKey]) -> None:
        with self._lock:
            for key in keys:
                if key not in self._partitions:
                    self._partitions[key] = Partition(key)

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
        revocation) or the offset was already seen: the caller must not run it."""
        with self._lock:
            partition = self._partitions.get(key)
            if partition is None or (partition.next_offset is not None and offset < partition.next_offset):
                return None
            partition.pending[offset] = None
            partition.next_offset = offset + 1
            return partition

    def finished(self, partition: Partition, offset: int, outcome: Outcome) -> bool:
        """Record a task's outcome. False if its partition was released meanwhile (the outcome is dropped)."""
        with self._lock:
            if partition.released or offset not in partition.pending:
                return False
            partition.pending[offset] = outcome
            return True

    def ready(self, keys: set[TopicPartitionKey] | None = None) -> list[Ready]:
        """The finished head of every owned partition (or of ``keys``) that has one."""
        with self._lock:
            out: list[Ready] = []
            for key, partition in self._partitions.items():
                if keys is not None and key not in keys:
                    continue
                outcomes: list[Outcome] = []
                offsets: list[int] = []
                for offset, outcome in partition.pending.items():
                    if outcome is None:
                        break
                    outcomes.append(outcome)
                    offsets.append(offset)
                if offsets:
                    out.append(Ready(partition, offsets[-1] + 1, tuple(outcomes), tuple(offsets)))
            return out

    def replace(self, partition: Partition, offset: int, outcome: Outcome) -> bool:
        """Put ``outcome`` in place of the finished one at ``offset`` (Kafka refused a record of that one). False if
        the partition was released or the offset is no longer pending."""
        with self._lock:
            if partition.released or partition.pending.get(offset) is None:
                return False
            partition.pending[offset] = outcome
            return True

    def committed(self, ready: list[Ready]) -> None:
        """The transaction publishing ``ready`` committed: drop those entries."""
        with self._lock:
            for r in ready:
                partition = r.partition
                for offset in [o for o in partition.pending if o < r.next_offset]:
                    del partition.pending[offset]
                partition.committed = r.next_offset

    def pending(self) -> int:
        """Records fetched and not yet committed (running, or finished and waiting to be published)."""
        with self._lock:
            return sum(len(p.pending) for p in self._partitions.values())

    def owned(self) -> list[TopicPartitionKey]:
        with self._lock:
            return list(self._partitions)

    def committed_offsets(self) -> dict[TopicPartitionKey, int | None]:
        """Each owned partition with the offset last committed for it since it was assigned (None: none yet)."""
        with self._lock:
            return {key: partition.committed for key, partition in self._partitions.items()}
