"""Which notifier replica answers for a task.

A standalone notifier reads every partition and answers for every task. Partitioned replicas (one consumer
group, ``AIMESH_NOTIFIER_PARTITIONED``) split the results and tasks topics' partitions between them: the owner
of a task is the replica assigned the partition its id hashes to (librdkafka's default partitioner, CRC-32
of the key, as every producer of these topics uses), and any other replica forwards the call to it.
"""

from __future__ import annotations

from typing import Protocol

from aimesh import kafka


def partition_of(task_id: str, partitions: int) -> int:
    """The partition of the results (and tasks) topic whose records are keyed ``task_id``."""
    return kafka.partition_of(task_id.encode(), partitions)


class Ownership(Protocol):
    def is_local(self, task_id: str) -> bool:
        """Whether this replica owns the task (a standalone notifier owns every task)."""
        ...

    def is_ready(self, task_id: str) -> bool:
        """Whether this replica, owning the task, has read its partition's history (a partition just assigned
        is being read: its tasks are not answerable yet)."""
        ...

    def owner_address(self, task_id: str) -> str | None:
        """The gRPC address (host:port) of the replica that owns the task; None while nobody is known to
        (a rebalance in progress)."""
        ...


class Everything:
    """A standalone notifier's ownership: every task, always."""

    def is_local(self, task_id: str) -> bool:
        return True

    def is_ready(self, task_id: str) -> bool:
        return True

    def owner_address(self, task_id: str) -> str | None:
        return None
