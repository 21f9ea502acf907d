"""Which replica of a partitioned notifier group owns which partition, as the group's committed offsets say.

A replica that is assigned a results partition commits an offset for it in the group with its own gRPC address
as the commit's metadata (the notifier keeps its real progress in its state store; these commits carry only
the address). The broker takes a commit only from the partition's current owner, so the partition's
committed metadata always names its latest owner: the directory, as ``application.server`` is for Kafka
Streams' interactive queries. A replica knows its own partitions at once (the feed tells it of every
assignment and revocation) and learns the others' by reading the group's committed offsets every
``REFRESH_S``, and at once after its own assignment changed (``refresh_soon``). A replica that died keeps
its partitions' metadata until their new owner commits (after the group's session timeout); calls forwarded
to it meanwhile fail and are retried.

(The group's description, ``describe_consumer_groups``, would serve too, but librdkafka 2.16's admin client
aborted the process on an assertion, ``rd_kafka_enq_once_del_source_return``, while the broker was down.)
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from confluent_kafka import KafkaException

from aimesh import kafka
from aimesh.background import BackgroundThread
from aimesh.lifecycle import OnDeath

from .ownership import partition_of

log = logging.getLogger(__name__)

REFRESH_S = 2.0
COMMITTED_TIMEOUT_S = 5.0


class PartitionDirectory:
    """An ``Ownership`` for a partitioned replica: its own partitions (and which of them are read up to the
    end they had when assigned), and every partition's owner's address.

    Thread-safe: the feed's thread and the refresher write, the event loop reads; each write replaces a whole
    value, which readers take as they find it.
    """

    def __init__(self, address: str) -> None:
        self.address = address
        self.partitions = 0  # the results topic's partition count; 0 until known
        self._local: frozenset[int] = frozenset()
        self._ready: frozenset[int] = frozenset()
        self._owners: dict[int, str] = {}
        self._lock = threading.Lock()  # between writers
        self.stale = threading.Event()  # set: describe the group now

    def is_local(self, task_id: str) -> bool:
        return self.partitions > 0 and partition_of(task_id, self.partitions) in self._local

    def is_ready(self, task_id: str) -> bool:
        return self.partitions > 0 and partition_of(task_id, self.partitions) in self._ready

    def owner_address(self, task_id: str) -> str | None:
        if self.partitions <= 0:
            return None
        partition = partition_of(task_id, self.partitions)
        if partition in self._local:
            return self.address
        return self._owners.get(partition)

    def refresh_soon(self) -> None:
        self.stale.set()

    def assigned(self, partitions: Iterable[int]) -> None:
        with self._lock:
            self._local = self._local | set(partitions)
        self.stale.set()

    def revoked(self, partitions: Iterable[int]) -> None:
        gone = set(partitions)
        with self._lock:
            self._local = self._local - gone
            self._ready = self._ready - gone
        self.stale.set()

    def caught_up(self, partitions: Iterable[int]) -> None:
        with self._lock:
            self._ready = self._ready | (set(partitions) & self._local)

    def local(self) -> frozenset[int]:
        return self._local

    def learn(self, owners: dict[int, str]) -> None:
        """The owners the group's description gave (partitions in transit are missing)."""
        self._owners = owners


def owners_of(committed: Mapping[kafka.TopicPartitionKey, tuple[int, str]]) -> dict[int, str]:
    """Partition -> its owner's address, from the group's committed offsets and their metadata (``kafka.committed``;
    metadata: the address, none where something else committed)."""
    return {partition: metadata for (_, partition), (_, metadata) in committed.items() if metadata}


class DirectoryRefresher(BackgroundThread):
    """Reads the group's committed offsets of ``topic`` every REFRESH_S (sooner when the directory is marked
    stale) into ``directory``, with a consumer of the group that does not join it (``kafka.reader_config``)."""

    def __init__(
        self,
        consumer_config: dict[str, Any],
        *,
        topic: str,
        directory: PartitionDirectory,
        on_death: OnDeath | None = None,
    ) -> None:
        super().__init__("notifier-directory", on_death=on_death)
        self._config = kafka.reader_config(consumer_config)
        self._topic = topic
        self._directory = directory

    def run(self) -> None:
        reader = kafka.consumer(self._config, logger=log)
        try:
            while not self.stopping.is_set():
                self._directory.stale.wait(REFRESH_S)
                self._directory.stale.clear()
                count = self._directory.partitions
                if self.stopping.is_set() or count <= 0:
                    continue
                try:
                    asked = [(self._topic, p) for p in range(count)]
                    self._directory.learn(owners_of(kafka.committed(reader, asked, COMMITTED_TIMEOUT_S)))
                except KafkaException as e:  # the broker unreachable a while: keep what is known, try again
                    log.debug("reading the group's committed offsets failed: %s", e)
        finally:
            reader.close()
