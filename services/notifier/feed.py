"""Reads the tasks topics (interactive and batch) and the results topic into the TaskStore.

At start it reads every partition of these topics from where the store's saved offsets say it stopped, or,
for a partition the store has no offset of (a new state directory) or whose saved offset is older than the
retention window, from ``retention_s`` ago (``offsets_for_times``). Standalone it reads every partition;
partitioned (a ``directory``), those the consumer group assigns it. One thread does all the Kafka calls;
decoded events reach the event loop in batches, each with the offsets it reached.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaException, Message, TopicPartition
from opentelemetry.trace import SpanContext

from aimesh import events, kafka, tracing
from aimesh.background import BackgroundThread
from aimesh.errors import UndecodableRecord
from aimesh.kafka import Record, fetch
from aimesh.lifecycle import OnDeath
from aimesh.v1 import result_pb2, task_pb2

from .directory import PartitionDirectory

log = logging.getLogger(__name__)

Event = task_pb2.AITaskEvent | result_pb2.AIResultEvent


@dataclass(frozen=True)
class Decoded:
    """A record read from Kafka; ``trace`` is the context of the span that processed a result record."""

    event: Event
    trace: SpanContext | None = None


# A partition whose position has not moved for this long counts as read: an open transaction holds a
# read_committed consumer before its end until it commits or aborts (the transaction timeout), and must not hold
# the notifier unready.
STALLED_S = 15.0
# How long a replica of a partitioned group may wait for its first assignment before it serves anyway (with
# none: more replicas than partitions), forwarding every call.
FIRST_ASSIGNMENT_LIMIT_S = 30.0

# Batches handed to the event loop and not yet delivered, at most.
MAX_BATCHES_AHEAD = 4

TopicPartitionKey = tuple[str, int]
# The next offset to read of each (topic, partition) a batch reached.
Offsets = dict[TopicPartitionKey, int]


class Feed(BackgroundThread):
    """Streams decoded events of ``topics`` to ``deliver`` on ``loop``, with the offsets each batch reached.

    Standalone (no ``directory``) it reads every partition; with a ``directory`` it joins the consumer group
    of its config and reads the partitions the group assigns it, telling the directory of each assignment,
    revocation and partition read up to its end, and ``on_moved`` (on the loop) of the results partitions
    revoked. Each partition starts where ``saved_offsets`` (a previous run's) or this run left it, unless that
    is older than ``history_s`` (see the module). ``caught_up`` is set once the first partitions' history was
    read (a partition whose position stays short of its end for STALLED_S counts as read). If its
    thread dies, ``on_death`` is told (see ``BackgroundThread``)."""

    def __init__(
        self,
        consumer_config: dict[str, Any],
        *,
        tasks_topics: tuple[str, ...],
        results_topic: str,
        history_s: float,
        deliver: Callable[[list[Decoded], Offsets], None],
        loop: asyncio.AbstractEventLoop,
        saved_offsets: Mapping[TopicPartitionKey, int] | None = None,
        directory: PartitionDirectory | None = None,
        on_moved: Callable[[set[int]], None] | None = None,
        saved_cluster: str | None = None,
        on_new_cluster: Callable[[str], None] | None = None,
        on_death: OnDeath | None = None,
    ) -> None:
        super().__init__("notifier-feed", on_death=on_death)
        self._config = consumer_config
        self._group = str(consumer_config["group.id"])
        self._tasks_topics = frozenset(tasks_topics)
        self._results_topic = results_topic
        self._topics = (*dict.fromkeys(tasks_topics), results_topic)  # each once, in order
        self._history_s = history_s
        self._deliver = deliver
        self._loop = loop
        self._next: dict[TopicPartitionKey, int] = dict(saved_offsets or {})  # where each partition resumes
        self._directory = directory
        self._on_moved = on_moved
        self._saved_cluster = saved_cluster
        self._on_new_cluster = on_new_cluster
        # Partitions not yet read up to the end they had when assigned: that end, the position last seen and when
        # it last moved.
        self._targets: dict[TopicPartitionKey, tuple[int, int, float]] = {}
        self._assigned_once = False
        self._told_caught_up = False
        self._room = threading.BoundedSemaphore(MAX_BATCHES_AHEAD)
        self._unannounced: set[int] = set()  # results partitions assigned whose ownership is not committed yet
        self._announce_after = 0.0
        self.caught_up = asyncio.Event()

    def run(self) -> None:
        consumer = kafka.consumer(self._config, logger=log)
        try:
            partitions = self._wait_for_topics(consumer)
            if self._directory is None:
                self._assign(consumer, partitions)
            else:
                self._directory.partitions = sum(1 for p in partitions if p.topic == self._results_topic)
                consumer.subscribe(
                    list(self._topics), on_assign=self._assign, on_revoke=self._revoke, on_lost=self._revoke
                )
            started = time.monotonic()
            while not self.stopping.is_set():
                batch = fetch(consumer, 500, 0.1)
                decoded = [e for e in map(self._decode, batch) if e is not None]
                offsets = _reached(batch)
                if offsets:
                    self._next.update(offsets)
                    self._hand_over(decoded, offsets)
                self._check_caught_up(consumer, started)
                if self._unannounced:
                    self._announce(consumer)
        finally:
            consumer.close()

    def _hand_over(self, decoded: list[Decoded], offsets: Offsets) -> None:
        """Have the event loop deliver a batch, waiting while MAX_BATCHES_AHEAD are not delivered yet: reading
        history runs ahead of what the loop applies, and what waits for it must not pile up in memory."""
        while not self._room.acquire(timeout=0.1):
            if self.stopping.is_set():
                return

        def deliver() -> None:
            try:
                self._deliver(decoded, offsets)
            finally:
                self._room.release()

        self._loop.call_soon_threadsafe(deliver)

    def _wait_for_topics(self, consumer: Consumer) -> list[TopicPartition]:
        """Every partition of the topics, once each topic exists."""
        partitions: list[TopicPartition] = []
        for topic in self._topics:
            while not self.stopping.is_set():
                cluster = consumer.list_topics(topic, timeout=10)
                found = kafka.partitions_in(cluster, topic)
                if found:
                    partitions.extend(TopicPartition(topic, p) for p in found)
                    self._check_cluster(cluster.cluster_id)
                    break
                log.warning("topic %s is not available yet; waiting", topic)
                time.sleep(1.0)
        return partitions

    def _check_cluster(self, cluster_id: str | None) -> None:
        """A state read from another cluster (its data folder replaced, say) is dropped: its offsets would skip
        records of this one."""
        if cluster_id is None or cluster_id == self._saved_cluster:
            return
        if self._saved_cluster is not None:
            log.warning(
                "the saved state is of Kafka cluster %s, not %s: starting afresh", self._saved_cluster, cluster_id
            )
        self._saved_cluster = cluster_id
        self._next.clear()
        if self._on_new_cluster is not None:
            self._loop.call_soon_threadsafe(self._on_new_cluster, cluster_id)

    def _assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._assigned_once = True
        if not partitions:
            return
        starts = self._starts(consumer, partitions)
        if self._directory is None:
            consumer.assign(starts)
        else:
            consumer.incremental_assign(starts)
            mine = {p.partition for p in partitions if p.topic == self._results_topic}
            self._directory.assigned(mine)
            self._unannounced |= mine
            self._announce_after = 0.0
        now = time.monotonic()
        for p in starts:
            low, high = consumer.get_watermark_offsets(p, timeout=10, cached=False)
            if (p.offset if p.offset >= 0 else high) < high:
                self._targets[(p.topic, p.partition)] = (high, -1, now)
        self._tell_ready()
        resumed = sum(1 for p in starts if p.offset >= 0 and self._next.get((p.topic, p.partition)) == p.offset)
        log.info("reading %d partitions (%d resumed where the saved state ends)", len(starts), resumed)

    def _revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if self._directory is None or not partitions:
            return
        consumer.incremental_unassign(partitions)
        for p in partitions:
            self._targets.pop((p.topic, p.partition), None)
        moved = {p.partition for p in partitions if p.topic == self._results_topic}
        self._directory.revoked(moved)
        self._unannounced -= moved
        if moved and self._on_moved is not None:
            self._loop.call_soon_threadsafe(self._on_moved, moved)
        log.info("partitions %s moved to another replica", sorted(moved))

    def _announce(self, consumer: Consumer) -> None:
        """Commit an offset of each results partition assigned and not yet announced, with this replica's address
        as its metadata: how the others learn who owns it (see ``directory``). Tried again a second later if
        the broker does not take it."""
        if self._directory is None or time.monotonic() < self._announce_after:
            return
        topic, address = self._results_topic, self._directory.address
        offsets = [
            TopicPartition(topic, p, max(0, self._next.get((topic, p), 0)), metadata=address)
            for p in sorted(self._unannounced)
        ]
        try:
            consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as e:
            log.debug("announcing partitions %s failed: %s", sorted(self._unannounced), e)
            self._announce_after = time.monotonic() + 1.0
            return
        self._unannounced.clear()
        self._directory.refresh_soon()

    def _starts(self, consumer: Consumer, partitions: list[TopicPartition]) -> list[TopicPartition]:
        """Where to start each partition: where the saved state (or this run) left it, unless that is older
        than the window; else the window's first record, or the end if it has none (nothing older matters)."""
        since_ms = int((time.time() - self._history_s) * 1000)
        found = kafka.offsets_at(consumer, [(p.topic, p.partition) for p in partitions], since_ms, timeout_s=30)
        return [
            TopicPartition(t, p, offset if offset < 0 else max(self._next.get((t, p), -1), offset))
            for (t, p), offset in found.items()
        ]

    def _check_caught_up(self, consumer: Consumer, started: float) -> None:
        if self._targets:
            self._drop_reached(consumer)
        if self._told_caught_up:
            return
        waited = time.monotonic() - started
        if (self._assigned_once and not self._targets) or (
            self._directory is not None and not self._assigned_once and waited > FIRST_ASSIGNMENT_LIMIT_S
        ):
            log.info("history read in %.2fs", waited)
            self._loop.call_soon_threadsafe(self.caught_up.set)
            self._told_caught_up = True

    def _drop_reached(self, consumer: Consumer) -> None:
        """Forget the targets reached (or stalled short of them for STALLED_S); tell the directory which
        partitions are read up to their end in every topic."""
        try:
            positions = consumer.position([TopicPartition(t, p) for t, p in self._targets])
        except KafkaException as e:
            log.debug("position unavailable: %s", e)
            return
        now = time.monotonic()
        for p in positions:
            key = (p.topic, p.partition)
            target, seen, moved = self._targets[key]
            if p.offset >= target or (p.offset == seen and now - moved > STALLED_S):
                del self._targets[key]
            elif p.offset != seen:
                self._targets[key] = (target, p.offset, now)
        self._tell_ready()

    def _tell_ready(self) -> None:
        """Tell the directory which of its partitions are read up to their end in every topic (those with nothing
        to read among them)."""
        if self._directory is not None:
            pending = {p for _, p in self._targets}
            self._directory.caught_up(self._directory.local() - pending)

    def _decode(self, message: Message) -> Decoded | None:
        if message.error():
            log.warning("feed consumer error: %s", message.error())
            return None
        record = Record.of(message)
        try:
            if record.topic in self._tasks_topics:
                return Decoded(events.decode_task(record.value))
            with tracing.process_span(
                record.topic,
                key=(record.key or b"").decode("utf-8", "replace"),
                partition=record.partition,
                offset=record.offset,
                group=self._group,
                headers=record.headers,
            ):
                return Decoded(events.decode_result(record.value), tracing.current_span_context())
        except UndecodableRecord as e:
            log.warning("skipping undecodable record %s: %s", record.where(), e)
            return None


def _reached(batch: list[Message]) -> Offsets:
    """The next offset to read of each partition ``batch`` has a record of."""
    reached: Offsets = {}
    for message in batch:
        topic, partition, offset = message.topic(), message.partition(), message.offset()
        if message.error() is None and topic is not None and partition is not None and offset is not None:
            reached[(topic, partition)] = max(reached.get((topic, partition), 0), offset + 1)
    return reached
