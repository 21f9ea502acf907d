"""The consumer thread: it owns the worker's group Consumer, fetches tasks into the scheduler's backlogs, pauses and
resumes each priority class on its own backlog (``should_pause``), and runs the rebalance callbacks, which publish
(assigned partitions: read the committed offsets and the published ones above them; revoked: publish what finished
first) or drop (lost) the moving partitions' work."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

from aimesh import finished_offsets, kafka
from aimesh.background import BackgroundThread
from aimesh.kafka import Record, fetch
from aimesh.lifecycle import OnDeath
from aimesh.metrics import WorkerMetrics

from .committer import Committer
from .duplicates import Duplicates
from .lag import LagReporter
from .ledger import Committed, Ledger, Outcome, Partition, TopicPartitionKey
from .scheduler import CLASSES, PriorityClass, Scheduler, class_of

log = logging.getLogger(__name__)

POLL_TIMEOUT_S = 0.1
PAUSED_POLL_TIMEOUT_S = 0.02
MAX_FETCH_BATCH = 500
# Records fetched and waiting for a free slot are held up to max(AIMESH_MAX_IN_FLIGHT, this); fetching pauses when
# the backlog is full and resumes when it is half empty. A finished task's slot is refilled from the backlog at
# once: pausing and resuming per task would cost a fetch round trip (up to fetch.wait.max.ms) every time.
MIN_BACKLOG = 100
# How many transactions a revoke tries before letting the partitions go unpublished: enough for an outcome to be
# cut down twice (Kafka refusing its records) and published.
REVOKE_PUBLISH_TRIES = 4
# How long the worker tries to read the committed offsets of partitions it is assigned (each query, and in all).
COMMITTED_QUERY_TIMEOUT_S, COMMITTED_TIMEOUT_S = 10.0, 60.0
# How long a revoke waits for a publish in progress before letting the partitions go unpublished.
REVOKE_LOCK_TIMEOUT_S = 20.0
# How long a revoke waits for the broker to resolve a stuck transaction (by fencing it) before letting partitions go.
FENCE_STUCK_TIMEOUT_S = 60.0


def should_pause(*, paused: bool, backlog: int, max_backlog: int, hold: bool) -> bool:
    """Whether a priority class's fetching should be paused. Hysteresis: pause at a full backlog, resume at half;
    ``hold`` (draining, Triton down, finished work piling up unpublished) pauses whatever the backlog."""
    full = backlog > max_backlog // 2 if paused else backlog >= max_backlog
    return hold or full


class TaskConsumer(BackgroundThread):
    """Fetches ``tasks_topic`` (and ``batch_tasks_topic``, if any) as a member of the worker group
    (``consumer_config``) into ``scheduler``. ``run`` is the consumer thread ``kafka-consumer`` (it runs ``lag`` beside
    it), from ``start`` until ``stop``, which returns once the consumer has left its group; fetching pauses once
    ``stop_fetching`` is set. If it dies, ``on_death`` is told."""

    def __init__(
        self,
        consumer_config: dict[str, Any],
        *,
        tasks_topic: str,
        batch_tasks_topic: str,
        ledger: Ledger,
        duplicates: Duplicates,
        committer: Committer,
        scheduler: Scheduler,
        lag: LagReporter,
        metrics: WorkerMetrics,
        max_in_flight: int,
        stop_fetching: threading.Event,
        on_death: OnDeath | None = None,
    ) -> None:
        super().__init__("kafka-consumer", on_death=on_death)
        self._config, self._batch_tasks_topic = consumer_config, batch_tasks_topic
        self.topics = [tasks_topic] + ([batch_tasks_topic] if batch_tasks_topic else [])
        self.group: str = consumer_config["group.id"]
        self._ledger, self._duplicates, self._committer = ledger, duplicates, committer
        self._scheduler, self._lag, self._metrics = scheduler, lag, metrics
        self._max_in_flight = max_in_flight
        self._max_backlog = max(max_in_flight, MIN_BACKLOG)
        self._stop_fetching = stop_fetching
        self._rewind = threading.Event()
        self.triton_ok = True  # set by the worker's Triton health check
        self._paused: dict[PriorityClass, bool] = dict.fromkeys(CLASSES, False)  # consumer thread only
        self._consumer: Consumer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def subscribe(self, loop: asyncio.AbstractEventLoop) -> None:
        """Join the group (the first rebalance happens in `run`); records go to the scheduler on ``loop``."""
        self._loop = loop
        self._consumer = kafka.consumer(self._config, logger=log)
        self._consumer.subscribe(
            self.topics, on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )

    def refetch(self) -> None:
        """Fetch again from the committed offsets (after a fatal producer error dropped all unpublished work)."""
        self._rewind.set()

    def forget_all(self) -> None:
        self.forget(self._ledger.owned())

    def run(self) -> None:
        consumer = self._consumer
        assert consumer is not None and self._loop is not None
        self._lag.start_sync()
        try:
            while not self.stopping.is_set():
                self._committer.check_wedged()
                if self._rewind.is_set():
                    self._rewind_to_committed()
                self._committer.group_metadata = consumer.consumer_group_metadata()
                self._committer.publisher.commit(consumer)  # at_least_once: the offsets of what was published since
                room = self._pause_or_resume()
                if all(self._paused.values()):
                    # Keep calling consume while paused: it serves rebalances and max.poll.interval.ms.
                    messages = consumer.consume(1, PAUSED_POLL_TIMEOUT_S)
                else:
                    messages = fetch(consumer, max(1, room), POLL_TIMEOUT_S)
                for message in messages:
                    if message.error():
                        log.warning("consumer error: %s", message.error())
                        continue
                    self.take(Record.of(message), message.timestamp()[1])
        finally:
            self._lag.stop_sync()
            # Leaves the group; the revoke callback this triggers publishes everything finished.
            consumer.close()

    def _pause_or_resume(self) -> int:
        """Pause or resume each priority class; return how many records a fetch may bring (it may be all one
        class)."""
        pending = self._ledger.pending()
        self._metrics.tasks_in_flight.set(pending)
        # Finished work piling up unpublished (the broker is not keeping up) or unpublishable (a topic refuses every
        # record) pauses every class, as do draining and Triton being down.
        piled_up = pending >= 2 * (self._max_in_flight + 2 * self._max_backlog) or self._committer.blocked.is_set()
        hold = self._stop_fetching.is_set() or not self.triton_ok or piled_up
        room = MAX_FETCH_BATCH
        for c in CLASSES:
            backlog = self._scheduler.backlog_sizes[c]
            pause = should_pause(paused=self._paused[c], backlog=backlog, max_backlog=self._max_backlog, hold=hold)
            if pause != self._paused[c]:
                self._set_paused(c, pause)
            if not self._paused[c]:
                room = min(room, self._max_backlog - backlog)
        return room

    def take(self, record: Record, timestamp_ms: int) -> None:
        """A fetched record: into the scheduler's backlog, or finished at once if it repeats an earlier task."""
        assert self._loop is not None
        partition = self._ledger.fetched((record.topic, record.partition), record.offset)
        if partition is None:
            return
        if self._duplicates.is_duplicate(partition.key, record.key, record.offset, timestamp_ms):
            self._drop_duplicate(record, partition)
        else:
            self._loop.call_soon_threadsafe(self._scheduler.enqueue, record, partition)

    def _set_paused(self, priority_class: PriorityClass, paused: bool) -> None:
        assert self._consumer is not None
        partitions = [
            TopicPartition(t, p)
            for t, p in self._ledger.owned()
            if class_of(t, self._batch_tasks_topic) == priority_class
        ]
        if partitions:
            (self._consumer.pause if paused else self._consumer.resume)(partitions)
        self._paused[priority_class] = paused

    def _rewind_to_committed(self) -> None:
        """After a fatal producer error dropped all unpublished work: fetch again from the committed offsets."""
        assert self._consumer is not None
        self._rewind.clear()
        assignment = self._consumer.assignment()
        committed = committed_offsets(self._consumer, assignment)
        for tp in assignment:
            offset = committed.get((tp.topic, tp.partition), (OFFSET_BEGINNING, ""))[0]
            self._consumer.seek(TopicPartition(tp.topic, tp.partition, offset))
        self._ledger.assign([(tp.topic, tp.partition) for tp in assignment], committed)
        self._duplicates.assign([(tp.topic, tp.partition) for tp in assignment], committed)
        log.warning("rewound %d partitions to their committed offsets", len(assignment))

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._committer.group_metadata = consumer.consumer_group_metadata()
        keys, committed = [(p.topic, p.partition) for p in partitions], committed_offsets(consumer, partitions)
        self._ledger.assign(keys, committed)
        self._duplicates.assign(keys, committed)
        paused = [p for p in partitions if self._paused[class_of(p.topic, self._batch_tasks_topic)]]
        if paused:
            consumer.pause(paused)
        log.info("assigned %s", [p.partition for p in partitions])

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Publish and commit what is finished before the partitions move; the rest runs again on the new owner.
        keys = [(p.topic, p.partition) for p in partitions]
        committer = self._committer
        committer.group_metadata = consumer.consumer_group_metadata()
        if committer.lock.acquire(timeout=0 if committer.wedged.is_set() else REVOKE_LOCK_TIMEOUT_S):
            try:
                for _ in range(REVOKE_PUBLISH_TRIES):
                    if committer.publish_ready(set(keys)):
                        break
                committer.publisher.commit(consumer, set(keys), wait=True)
                self.forget(keys)
            finally:
                committer.lock.release()
        else:
            # A publish is stuck: let the partitions go with nothing published; their new owner runs the work again.
            # Not before the stuck transaction is resolved, though: its commit may still land, and a new owner that
            # read the committed offsets before it would publish those tasks' results a second time.
            log.warning("revoking %s without publishing: a transaction in progress does not return; fencing it", keys)
            if not committer.publisher.fence(FENCE_STUCK_TIMEOUT_S):
                log.error("the stuck transaction was not fenced: %s may have results published twice", keys)
            self.forget(keys)
        log.info("revoked %s", [p.partition for p in partitions])

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Lost partitions may already belong to another member: publish and commit nothing for them. No lock: a
        # publish in progress may be stuck on the same broker trouble that lost them, and its offsets carry the
        # old generation, which the broker refuses (the transaction aborts).
        self._committer.group_metadata = consumer.consumer_group_metadata()
        keys = [(p.topic, p.partition) for p in partitions]
        self._committer.publisher.forget(set(keys))
        self.forget(keys)
        log.warning("lost %s", [p.partition for p in partitions])

    def _drop_duplicate(self, record: Record, partition: Partition) -> None:
        """Finish ``record`` without running it: an earlier record of its partition carries its (derived) task id.
        Its offset is committed like any other; nothing is published for it."""
        task_id = (record.key or b"").decode()
        log.info("not running %s: an earlier record of its partition carries task %s", record.where(), task_id)
        counted = self._metrics.duplicate_tasks.labels(record.topic).inc
        if self._ledger.finished(partition, record.offset, Outcome(on_committed=counted)):
            self._committer.work_ready.set()

    def forget(self, keys: list[TopicPartitionKey]) -> None:
        """Drop the work of partitions this worker no longer owns: their running tasks, backlog and lag series."""
        released = self._ledger.release(keys)
        self._duplicates.release(keys)
        if released and self._loop is not None:
            self._loop.call_soon_threadsafe(self._scheduler.cancel_tasks_of, released)
        self._lag.forget(set(keys))


def committed_offsets(consumer: Consumer, partitions: list[TopicPartition]) -> dict[TopicPartitionKey, Committed]:
    """The group's committed offset and its metadata (the published offsets above it) for each of ``partitions`` that
    has one. Retried while the broker is away: without it the partitions' published tasks would run again, so an
    error here stops the worker (its restart asks again)."""
    if not partitions:
        return {}
    asked = [(p.topic, p.partition) for p in partitions]
    give_up = time.monotonic() + COMMITTED_TIMEOUT_S
    while True:
        try:
            committed = kafka.committed(consumer, asked, COMMITTED_QUERY_TIMEOUT_S)
            break
        except KafkaException as e:
            if not e.args[0].retriable() or time.monotonic() >= give_up:
                raise
            log.warning("committed offsets not read, retrying: %s", e.args[0].str())
    skipped = {key: len(finished_offsets.decode(*value)) for key, value in committed.items()}
    if any(skipped.values()):
        log.info("offsets already published above the committed ones (skipped): %s", skipped)
    return committed
