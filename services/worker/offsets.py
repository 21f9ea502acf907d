"""Which offsets a worker may commit while tasks finish out of order.

A partition's committable offset is its lowest offset still in flight, or one past the highest offset
seen when nothing is in flight: committing it never skips a task whose result is not yet durable.
Thread-safe: the consumer thread commits and revokes while the event loop completes tasks.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

TopicPartitionKey = tuple[str, int]


@dataclass
class _Partition:
    in_flight: set[int] = field(default_factory=set)
    next_offset: int | None = None
    committed: int | None = None

    def committable(self) -> int | None:
        if self.in_flight:
            return min(self.in_flight)
        return self.next_offset


class OffsetTracker:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._partitions: dict[TopicPartitionKey, _Partition] = {}

    def assign(self, keys: list[TopicPartitionKey]) -> None:
        with self._lock:
            for key in keys:
                self._partitions.setdefault(key, _Partition())

    def revoke(self, keys: list[TopicPartitionKey]) -> dict[TopicPartitionKey, int]:
        """Forget the partitions; return what is still committable for them (to commit before they go)."""
        with self._lock:
            out: dict[TopicPartitionKey, int] = {}
            for key in keys:
                part = self._partitions.pop(key, None)
                if part is None:
                    continue
                offset = part.committable()
                if offset is not None and offset != part.committed:
                    out[key] = offset
            return out

    def started(self, key: TopicPartitionKey, offset: int) -> bool:
        """Record a fetched offset as in flight. False if the partition is not owned (a stale fetch)."""
        with self._lock:
            part = self._partitions.get(key)
            if part is None:
                return False
            part.in_flight.add(offset)
            if part.next_offset is None or offset + 1 > part.next_offset:
                part.next_offset = offset + 1
            return True

    def finished(self, key: TopicPartitionKey, offset: int) -> None:
        with self._lock:
            part = self._partitions.get(key)
            if part is not None:
                part.in_flight.discard(offset)

    def to_commit(self) -> dict[TopicPartitionKey, int]:
        """Offsets that moved since the last ``committed`` call."""
        with self._lock:
            out: dict[TopicPartitionKey, int] = {}
            for key, part in self._partitions.items():
                offset = part.committable()
                if offset is not None and offset != part.committed:
                    out[key] = offset
            return out

    def committed(self, offsets: dict[TopicPartitionKey, int]) -> None:
        with self._lock:
            for key, offset in offsets.items():
                part = self._partitions.get(key)
                if part is not None and (part.committed is None or offset > part.committed):
                    part.committed = offset

    def in_flight(self) -> int:
        with self._lock:
            return sum(len(p.in_flight) for p in self._partitions.values())

    def owned(self) -> list[TopicPartitionKey]:
        with self._lock:
            return list(self._partitions)

    def committed_offsets(self) -> dict[TopicPartitionKey, int | None]:
        """Each owned partition with the offset last committed for it since it was assigned (None: none yet)."""
        with self._lock:
            return {key: part.committed for key, part in self._partitions.items()}
