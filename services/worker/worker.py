"""The worker: a consumer-group member that runs tasks through Triton and publishes exactly one terminal
result per task.

Exactly once: a task's terminal result (and, for a record it cannot process, its dead-letter record) is
published in the same Kafka transaction that commits its partition's offsets. Inference runs *outside*
transactions; a finished task is published by the next transaction, whatever still runs before it in its
partition (a fast task never waits for a slow one). The committed offset stays the partition's lowest unpublished
one, and the published offsets above it ride in the commit's metadata (``ledger``, ``finished_offsets``); a new
owner of the partition reads both and skips exactly the tasks already published. A crash re-runs what was not
published; a read_committed consumer never sees a result twice.

At least once (``AIMESH_PROCESSING_GUARANTEE=at_least_once``, ``acknowledged``): the same ledger and the same
steps, but a publish is an idempotent producer's records acknowledged, then the offsets committed by the consumer
thread, with no transaction. A crash between the two re-runs tasks whose results are already on the topic; the
notifier delivers only each task's first terminal result.

Three threads, each with one job:
- the consumer thread owns the Consumer: fetches, pauses (in-flight limit reached, Triton unhealthy,
  draining) and resumes, and runs the rebalance callbacks (which publish or drop the moving partitions'
  work under the transaction lock);
- the publisher thread owns the transactional producer and publishes whatever is ready;
- the event loop runs tasks: decoding, micro-batched Triton calls with retries, building outcomes.
A fourth thread (``cancellation.CancellationReader``) reads the cancellations topic into ``Cancellations``, and a
fifth refreshes the consumer lag gauges. Any of them that dies stops the worker: ``run`` raises ComponentDied.

Poison outcomes: every outcome is fitted to the record size limit before it enters the ledger (``record_limits``),
and an outcome whose record Kafka refuses anyway is replaced by a smaller one (``Outcome.smaller``); aborts that name
no record, or a topic that refuses every record, are handled as ``aborts`` says. No outcome is retried forever.

Priority classes: the worker consumes the tasks topic (interactive) and the batch tasks topic, with a backlog and
pause/resume of its own for each, so a backlog full of batch records never stops interactive records being fetched,
and a free slot always goes to an interactive task first. Requests to models with Triton priority levels carry
priority 1 (interactive) or 2 (batch), so interactive requests also overtake batch ones in Triton's queue.

Streaming models (decoupled in Triton) run one task per streaming request; each response becomes a partial RUNNING
update (sequence 3, 4, ...) sent like the RUNNING one through the non-transactional progress producer, and the
terminal result (in the transaction, like every terminal result) holds the whole text and the sequence one past
the last partial update.

Cancellation: a task whose cancellation the worker knows is not run when it is taken from the backlog or about to
join a Triton request: it ends CANCELLED, published like an EXPIRED one. A running streaming task is cancelled in
Triton and ends CANCELLED with the text so far. A unary request already sent to Triton is left to finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager, aclosing
from dataclasses import dataclass
from typing import Any, Literal

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition
from opentelemetry.trace import Span

from aimesh import events, finished_offsets, runtime, tracing
from aimesh.errors import BrokerUnavailable, UndecodableRecord
from aimesh.kafka import GROUP_MEMBER_PROPERTIES, AsyncProducer, Headers, Record, fetch
from aimesh.metrics import WorkerMetrics, error_code_label, status_label
from aimesh.retry import RetryPolicy
from aimesh.v1 import result_pb2, task_pb2

from .aborts import AbortPolicy
from .batching import Batcher, BatchKey, CancelledByClient
from .cancellation import CancellationReader, Cancellations
from .duplicates import Duplicates
from .health import TritonHealth
from .inference import STREAM_OUTPUT_NAME, Inference, InferenceFailed, ModelInfo, Triton
from .ledger import Committed, Ledger, Outcome, OutRecord, Partition, Ready, Refusal, TopicPartitionKey
from .record_limits import MAX_ERROR_HEADER_BYTES, RecordLimits, cut_utf8
from .transactions import Publisher, TransactionAborted, TransactionFatal

log = logging.getLogger(__name__)

POLL_TIMEOUT_S = 0.1
PAUSED_POLL_TIMEOUT_S = 0.02
MAX_FETCH_BATCH = 500
# Records fetched and waiting for a free slot are held up to max(AIMESH_MAX_IN_FLIGHT, this); fetching pauses when
# the backlog is full and resumes when it is half empty. A finished task's slot is refilled from the backlog at
# once: pausing and resuming per task would cost a fetch round trip (up to fetch.wait.max.ms) every time.
MIN_BACKLOG = 100
LAG_REFRESH_INTERVAL_S = 5.0
# Bounds each broker query of a lag refresh (and so how long stopping waits for the lag thread).
LAG_QUERY_TIMEOUT_S = 1.0
# The publisher thread wakes at least this often (after an aborted transaction it waits as ``aborts`` says).
PUBLISH_IDLE_S = 0.5
MAX_ABORTS_AFTER_STOP = 20
# Requests per model the worker keeps outstanding at Triton; more tasks than that wait to share a request. Many:
# rows waiting in the worker cannot join the batches Triton's dynamic batcher forms (with 4, mesh / direct Triton
# at concurrency 64 was 0.64 in `make bench`).
MAX_CONCURRENT_REQUESTS = 16
# A producer fenced this often in this window means another live process uses the same transactional.id.
MAX_FENCES, FENCE_WINDOW_S = 3, 60.0
# A transactional call blocked this long is wedged: librdkafka's send_offsets_to_transaction can ignore its timeout
# and hang for good after the group coordinator went away (librdkafka issues #5456, #5511). The worker then gives
# up this producer and consumer and starts over (see ProducerWedged); nothing was committed, so nothing is lost.
PUBLISH_WEDGED_S = 45.0
# How many transactions a revoke tries before letting the partitions go unpublished: enough for an outcome to be
# cut down twice (Kafka refusing its records) and published.
REVOKE_PUBLISH_TRIES = 4
# How long the worker tries to read the committed offsets of partitions it is assigned (each query, and in all).
COMMITTED_QUERY_TIMEOUT_S, COMMITTED_TIMEOUT_S = 10.0, 60.0
# How long a revoke waits for a publish in progress before letting the partitions go unpublished.
REVOKE_LOCK_TIMEOUT_S = 20.0
# How long a revoke waits for the broker to resolve a stuck transaction (by fencing it) before letting partitions go.
FENCE_STUCK_TIMEOUT_S = 60.0
# Before a streaming task's terminal result is handed to the ledger, its partial updates get this long to be
# acknowledged, so that a watcher usually sees them before the terminal one (best effort: they are progress).
PARTIALS_FLUSH_S = 5.0
# Triton request priorities (for models with dynamic_batching priority_levels >= 2): 1 is served first.
INTERACTIVE_TRITON_PRIORITY, BATCH_TRITON_PRIORITY = 1, 2
# The seed the worker gives a streaming model when the client gave none (derived from the task id: a rerun emits
# the same tokens with the same sequence numbers). Request parameter name, and the model's largest seed.
SEED_PARAMETER = "seed"
MAX_SEED = 2**63 - 1

# A deadline further away than this is taken as this far away: ingest checks deadlines, but a record written straight
# to the topic is read as it is, and a deadline of 10^13 s would overflow the microseconds Triton is given.
MAX_DEADLINE_S = 7 * 24 * 3600.0

PriorityClass = Literal["interactive", "batch"]
# How far a task's outcome was cut down: fitted to the record size limit; minimal (Kafka refused a fitted record: a
# FAILED result without output, a dead-letter record without value); without its dead-letter record (Kafka refused
# even the minimal one, or the dead-letter topic takes no record).
_Stage = Literal["fitted", "minimal", "no_dead_letter"]
CLASSES: tuple[PriorityClass, ...] = ("interactive", "batch")  # in the order free slots are given


def derived_seed(task_id: str) -> int:
    """A stable seed for a task that has none: the same task id always gives the same one."""
    return int.from_bytes(hashlib.sha256(task_id.encode()).digest()[:8], "big") & MAX_SEED


@dataclass
class _Run:
    """What one task's processing has done so far: the partial updates its current attempt sent, and their text."""

    batch: bool = False
    partials: int = 0
    text: list[str] | None = None
    last_partial: asyncio.Future[Any] | None = None


UNARY_MODEL = ModelInfo(decoupled=False, priority_levels=0)
# What a streaming attempt returns when the client cancelled the task while it streamed.
_STOPPED = Inference(output=result_pb2.TaskOutput(), model_version="")


class ProducerWedged(RuntimeError):
    """A transactional call never returned. The Worker that raised it is done; build a new one (a new producer
    with the same transactional.id fences the wedged one and aborts its transaction)."""


class Worker:
    """Consumes ``tasks_topic``, infers on Triton, publishes to ``results_topic`` (and ``dead_letter_topic``).

    ``run(stop)`` returns after a graceful drain: fetching stops, in-flight tasks get ``grace_s`` to finish,
    what finished is published and committed, and the consumer leaves its group.
    """

    def __init__(
        self,
        *,
        consumer_config: dict[str, Any],
        publisher: Publisher,
        progress: AsyncProducer,
        triton: Triton,
        tasks_topic: str,
        results_topic: str,
        dead_letter_topic: str,
        worker_id: str,
        max_in_flight: int,
        max_batch_size: int,
        inference_timeout_s: float,
        triton_retry: RetryPolicy,
        health_interval_s: float,
        grace_s: float,
        metrics: WorkerMetrics | None = None,
        batch_tasks_topic: str = "",
        cancel_topic: str = "",
        cancel_consumer_config: dict[str, Any] | None = None,
        cancel_window_s: float = 3600.0,
        max_record_bytes: int = 1_000_000,
        max_request_bytes: int = 4_194_304,
        idempotency_window_s: float = 3600.0,
    ) -> None:
        self._consumer_config = consumer_config
        self._duplicates = Duplicates(idempotency_window_s, consumer_config)
        self._publisher = publisher
        self._progress = progress
        self._triton = triton
        self._tasks_topic = tasks_topic
        self._batch_tasks_topic = batch_tasks_topic
        self._results_topic = results_topic
        self._dead_letter_topic = dead_letter_topic
        self._limits = RecordLimits(
            results_topic=results_topic, dead_letter_topic=dead_letter_topic, max_record_bytes=max_record_bytes
        )
        self._worker_id = worker_id
        self._max_in_flight = max_in_flight
        self._max_backlog = max(max_in_flight, MIN_BACKLOG)
        # One backlog per priority class (event loop only), and their sizes (written by the event loop, read by the
        # consumer thread).
        self._backlogs: dict[PriorityClass, deque[tuple[Record, Partition]]] = {c: deque() for c in CLASSES}
        self._backlog_sizes: dict[PriorityClass, int] = dict.fromkeys(CLASSES, 0)
        self._triton_retry = triton_retry
        self._grace_s = grace_s
        self._group = consumer_config["group.id"]
        self._metrics = metrics if metrics is not None else WorkerMetrics()
        self._ledger = Ledger()
        self._batcher = Batcher(
            triton,
            max_batch_size=max_batch_size,
            max_request_bytes=max_request_bytes,
            max_concurrent=MAX_CONCURRENT_REQUESTS,
            timeout_s=inference_timeout_s,
            on_request=lambda model, items: self._metrics.inference_batch_items.labels(model).observe(items),
        )
        self._inference_timeout_s = inference_timeout_s
        self._health = TritonHealth(triton.is_ready, interval_s=health_interval_s, on_change=self._on_health)
        self._cancellations = Cancellations(cancel_window_s)
        self._cancel_reader = (
            CancellationReader(
                cancel_consumer_config,
                cancel_topic,
                self._cancellations,
                window_s=cancel_window_s,
                on_cancel=self._cancel_arrived,
            )
            if cancel_topic and cancel_consumer_config is not None
            else None
        )
        self._stop_cancel_reader = threading.Event()
        # Running streaming tasks: task id -> (tenant, the event that stops its stream). Event loop only.
        self._streams: dict[str, tuple[str, asyncio.Event]] = {}
        self._tasks: dict[asyncio.Task[None], Partition] = {}
        # Running tasks taken from the batch backlog. They may hold all but a quarter of the slots: the rest stay
        # free for interactive tasks, which would otherwise wait for batch ones to finish before even reaching
        # Triton (whose request priority then lets them jump its queue).
        self._batch_running: set[asyncio.Task[None]] = set()
        self._batch_slots = max_in_flight - max_in_flight // 4
        self._loop: asyncio.AbstractEventLoop | None = None
        self._consumer: Consumer | None = None
        # Guards the transactional producer and the ledger's publish-then-commit steps: the publisher thread
        # and the rebalance callbacks (consumer thread) both publish.
        self._txn_lock = threading.Lock()
        self._work_ready = threading.Event()
        self._stop_fetching = threading.Event()
        self._stop_consumer = threading.Event()
        self._stop_publisher = threading.Event()
        self._rewind = threading.Event()
        self._wedged = threading.Event()
        # Set while a topic refuses every record (see aborts): fetching pauses meanwhile.
        self._publish_blocked = threading.Event()
        self._aborts = AbortPolicy(self._on_blocked)
        self._publishing_since: float | None = None
        self._triton_ok = True
        self._paused: dict[PriorityClass, bool] = dict.fromkeys(CLASSES, False)  # consumer thread only
        # The consumer's group metadata (generation, member id) for send_offsets_to_transaction. Read on the consumer
        # thread only: Consumer.consumer_group_metadata() blocks while another thread is inside consume().
        self._group_metadata: Any = None
        self._fences: list[float] = []
        # Partitions with a lag gauge: the lag thread sets them, the consumer thread's rebalances drop them.
        self._lag_series: set[TopicPartitionKey] = set()
        self._lag_lock = threading.Lock()
        self._stop_lag = threading.Event()
        self._crashed: asyncio.Event | None = None
        self._crash: BaseException | None = None
        self._crashed_component = ""
        self.processed = 0

    # --- lifecycle ---------------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._crashed = asyncio.Event()
        await asyncio.to_thread(self._publisher.start)
        self._consumer = Consumer(self._consumer_config, logger=log)
        topics = [self._tasks_topic] + ([self._batch_tasks_topic] if self._batch_tasks_topic else [])
        self._consumer.subscribe(topics, on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost)
        log.info(
            "worker %s consuming %s as group %s (transactional id %s)",
            self._worker_id,
            " and ".join(topics),
            self._group,
            self._publisher.transactional_id,
        )
        threads = [
            threading.Thread(target=self._guarded, args=(self._consume_loop,), name="kafka-consumer", daemon=True),
            threading.Thread(target=self._guarded, args=(self._publish_loop,), name="kafka-publisher", daemon=True),
        ]
        for thread in threads:
            thread.start()
        cancel_thread: threading.Thread | None = None
        if self._cancel_reader is not None:
            # It retries broker trouble itself; anything else that ends it stops the worker like any other thread.
            cancel_thread = threading.Thread(
                target=self._guarded,
                args=(functools.partial(self._cancel_reader.run, self._stop_cancel_reader),),
                name="kafka-cancels",
                daemon=True,
            )
            cancel_thread.start()
        health = asyncio.create_task(self._health.run(), name="triton-health")
        health.add_done_callback(self._health_ended)
        try:
            waits = {asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._crashed.wait())}
            _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for w in pending:
                w.cancel()
        finally:
            await self._drain(threads)
            self._stop_cancel_reader.set()
            if cancel_thread is not None:
                await asyncio.to_thread(cancel_thread.join, 5.0)
            health.cancel()
            await self._batcher.close()
            if not self._wedged.is_set():  # a wedged producer is abandoned: its thread may never return
                await asyncio.to_thread(self._publisher.close)
        if self._wedged.is_set():
            raise ProducerWedged(f"a transactional call blocked for more than {PUBLISH_WEDGED_S:.0f}s")
        if self._crash is not None:
            # run_service turns this into a non-zero exit: an orchestrator restarts the worker.
            raise runtime.ComponentDied(self._crashed_component, self._crash)

    async def _drain(self, threads: list[threading.Thread]) -> None:
        """Stop fetching, give running tasks ``grace_s``, publish what finished, leave the group."""
        log.info("draining %d in-flight tasks for up to %.1fs", len(self._tasks), self._grace_s)
        self._stop_fetching.set()
        for c in CLASSES:  # never started: left uncommitted, they run again on the partitions' next owner
            self._backlogs[c].clear()
            self._backlog_sizes[c] = 0
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=self._grace_s)
            for task in pending:
                task.cancel()
            if pending:
                log.warning("%d tasks did not finish in the grace period; they will run again", len(pending))
                await asyncio.wait(pending)
        # The consumer thread closes the consumer, whose final revoke publishes everything finished.
        self._stop_consumer.set()
        await asyncio.to_thread(threads[0].join)
        self._stop_publisher.set()
        self._work_ready.set()
        if not self._wedged.is_set():
            await asyncio.to_thread(threads[1].join)

    def _guarded(self, body: Callable[[], None]) -> None:
        """Run a thread's loop; if it dies, stop the worker instead of running on half-blind."""
        try:
            body()
        except BaseException as e:
            log.critical("%s failed", threading.current_thread().name, exc_info=True)
            self._died(threading.current_thread().name, e)

    def _died(self, component: str, error: BaseException) -> None:
        """A thread or task the worker needs ended: drain and stop, then ``run`` raises ComponentDied. Any thread."""
        if self._crash is None:
            self._crash, self._crashed_component = error, component
        self._stop_fetching.set()
        if self._loop is not None and self._crashed is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: run has returned already
                self._loop.call_soon_threadsafe(self._crashed.set)

    def _health_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.critical("the Triton health check failed", exc_info=task.exception())
            self._died(task.get_name(), task.exception() or RuntimeError("ended"))

    # --- consumer thread ---------------------------------------------------------------------------------

    def _consume_loop(self) -> None:
        consumer = self._consumer
        assert consumer is not None and self._loop is not None
        # Lag queries take a round trip per partition: on this thread they held back the records already fetched
        # (a newly assigned worker's first 1.3 s, measured). They run on a thread and a client of their own: the
        # consumer's calls from another thread wait for its consume() to return.
        lag = threading.Thread(target=self._guarded, args=(self._lag_loop,), name="kafka-lag", daemon=True)
        lag.start()
        try:
            while not self._stop_consumer.is_set():
                since = self._publishing_since
                if since is not None and time.monotonic() - since > PUBLISH_WEDGED_S:
                    self._wedged.set()
                    raise ProducerWedged(f"a publish has been blocked for {time.monotonic() - since:.0f}s")
                if self._rewind.is_set():
                    self._rewind_to_committed()
                self._group_metadata = consumer.consumer_group_metadata()
                self._publisher.commit(consumer)  # at_least_once: the offsets of what was published since
                pending = self._ledger.pending()
                self._metrics.tasks_in_flight.set(pending)
                # Each priority class pauses and resumes on its own backlog. Hysteresis: pause at a full backlog,
                # resume at half; both also pause while Triton is down, while draining, and if finished work piles
                # up unpublished (the broker is not keeping up) or cannot be published (a topic refuses every record).
                held = pending >= 2 * (self._max_in_flight + 2 * self._max_backlog) or self._publish_blocked.is_set()
                room = MAX_FETCH_BATCH
                for c in CLASSES:
                    backlog = self._backlog_sizes[c]
                    full = backlog > self._max_backlog // 2 if self._paused[c] else backlog >= self._max_backlog
                    pause = self._stop_fetching.is_set() or not self._triton_ok or full or held
                    if pause != self._paused[c]:
                        self._set_paused(c, pause)
                    if not self._paused[c]:
                        room = min(room, self._max_backlog - backlog)  # a fetch may be all of one class
                if all(self._paused.values()):
                    # Keep calling consume while paused: it serves rebalances and max.poll.interval.ms.
                    messages = consumer.consume(1, PAUSED_POLL_TIMEOUT_S)
                else:
                    messages = fetch(consumer, max(1, room), POLL_TIMEOUT_S)
                for message in messages:
                    if message.error():
                        log.warning("consumer error: %s", message.error())
                        continue
                    record = Record.of(message)
                    partition = self._ledger.fetched((record.topic, record.partition), record.offset)
                    if partition is None:
                        continue
                    if self._duplicates.is_duplicate(partition.key, record.key, record.offset, message.timestamp()[1]):
                        self._drop_duplicate(record, partition)
                    else:
                        self._loop.call_soon_threadsafe(self._enqueue, record, partition)
        finally:
            self._stop_lag.set()
            lag.join()
            # Leaves the group; the revoke callback this triggers publishes everything finished.
            consumer.close()

    def _class_of(self, topic: str) -> PriorityClass:
        return "batch" if self._batch_tasks_topic and topic == self._batch_tasks_topic else "interactive"

    def _set_paused(self, priority_class: PriorityClass, paused: bool) -> None:
        assert self._consumer is not None
        partitions = [TopicPartition(t, p) for t, p in self._ledger.owned() if self._class_of(t) == priority_class]
        if partitions:
            (self._consumer.pause if paused else self._consumer.resume)(partitions)
        self._paused[priority_class] = paused

    def _rewind_to_committed(self) -> None:
        """After a fatal producer error dropped all unpublished work: fetch again from the committed offsets."""
        assert self._consumer is not None
        self._rewind.clear()
        assignment = self._consumer.assignment()
        committed = self._committed(self._consumer, assignment)
        for tp in assignment:
            offset = committed.get((tp.topic, tp.partition), (OFFSET_BEGINNING, ""))[0]
            self._consumer.seek(TopicPartition(tp.topic, tp.partition, offset))
        self._ledger.assign([(tp.topic, tp.partition) for tp in assignment], committed)
        self._duplicates.assign([(tp.topic, tp.partition) for tp in assignment], committed)
        log.warning("rewound %d partitions to their committed offsets", len(assignment))

    @staticmethod
    def _committed(consumer: Consumer, partitions: list[TopicPartition]) -> dict[TopicPartitionKey, Committed]:
        """The group's committed offset and its metadata (the published offsets above it) for each of ``partitions``
        that has one. Retried while the broker is away: without it the partitions' published tasks would run again,
        so an error here stops the worker (its restart asks again)."""
        if not partitions:
            return {}
        asked = [TopicPartition(p.topic, p.partition) for p in partitions]
        give_up = time.monotonic() + COMMITTED_TIMEOUT_S
        while True:
            try:
                found = consumer.committed(asked, timeout=COMMITTED_QUERY_TIMEOUT_S)
                break
            except KafkaException as e:
                if not e.args[0].retriable() or time.monotonic() >= give_up:
                    raise
                log.warning("committed offsets not read, retrying: %s", e.args[0].str())
        committed = {(tp.topic, tp.partition): (tp.offset, tp.metadata or "") for tp in found if tp.offset >= 0}
        skipped = {key: len(finished_offsets.decode(*value)) for key, value in committed.items()}
        if any(skipped.values()):
            log.info("offsets already published above the committed ones (skipped): %s", skipped)
        return committed

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._group_metadata = consumer.consumer_group_metadata()
        keys, committed = [(p.topic, p.partition) for p in partitions], self._committed(consumer, partitions)
        self._ledger.assign(keys, committed)
        self._duplicates.assign(keys, committed)
        paused = [p for p in partitions if self._paused[self._class_of(p.topic)]]
        if paused:
            consumer.pause(paused)
        log.info("assigned %s", [p.partition for p in partitions])

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Publish and commit what is finished before the partitions move; the rest runs again on the new owner.
        keys = [(p.topic, p.partition) for p in partitions]
        self._group_metadata = consumer.consumer_group_metadata()
        if self._txn_lock.acquire(timeout=0 if self._wedged.is_set() else REVOKE_LOCK_TIMEOUT_S):
            try:
                for _ in range(REVOKE_PUBLISH_TRIES):
                    if self._publish_ready(set(keys)):
                        break
                self._publisher.commit(consumer, set(keys), wait=True)
                self._forget(keys)
            finally:
                self._txn_lock.release()
        else:
            # A publish is stuck: let the partitions go with nothing published; their new owner runs the work again.
            # Not before the stuck transaction is resolved, though: its commit may still land, and a new owner that
            # read the committed offsets before it would publish those tasks' results a second time.
            log.warning("revoking %s without publishing: a transaction in progress does not return; fencing it", keys)
            if not self._publisher.fence(FENCE_STUCK_TIMEOUT_S):
                log.error("the stuck transaction was not fenced: %s may have results published twice", keys)
            self._forget(keys)
        log.info("revoked %s", [p.partition for p in partitions])

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Lost partitions may already belong to another member: publish and commit nothing for them. No lock: a
        # publish in progress may be stuck on the same broker trouble that lost them, and its offsets carry the
        # old generation, which the broker refuses (the transaction aborts).
        self._group_metadata = consumer.consumer_group_metadata()
        keys = [(p.topic, p.partition) for p in partitions]
        self._publisher.forget(set(keys))
        self._forget(keys)
        log.warning("lost %s", [p.partition for p in partitions])

    def _drop_duplicate(self, record: Record, partition: Partition) -> None:
        """Finish ``record`` without running it: an earlier record of its partition carries its (derived) task id.
        Its offset is committed like any other; nothing is published for it."""
        task_id = (record.key or b"").decode()
        log.info("not running %s: an earlier record of its partition carries task %s", record.where(), task_id)
        counted = self._metrics.duplicate_tasks.labels(record.topic).inc
        if self._ledger.finished(partition, record.offset, Outcome(on_committed=counted)):
            self._work_ready.set()

    def _forget(self, keys: list[TopicPartitionKey]) -> None:
        released = self._ledger.release(keys)
        self._duplicates.release(keys)
        if released and self._loop is not None:
            self._loop.call_soon_threadsafe(self._cancel_tasks_of, released)
        self._forget_lag(set(keys))

    def _lag_loop(self) -> None:
        # Same group id, for its committed offsets; it never subscribes, so it never joins the group.
        config = {k: v for k, v in self._consumer_config.items() if k not in GROUP_MEMBER_PROPERTIES}
        probe = Consumer({**config, "client.id": f"{config.get('client.id', 'aimesh-worker')}-lag"}, logger=log)
        try:
            while not self._stop_lag.wait(LAG_REFRESH_INTERVAL_S):
                try:
                    self._refresh_lag(probe)
                except Exception:  # telemetry: never the reason a worker stops
                    log.exception("consumer lag not refreshed")
        finally:
            probe.close()

    def _refresh_lag(self, probe: Consumer) -> None:
        """Set the lag gauge of every owned partition: its high watermark minus the group's committed offset
        (the low watermark when the group has committed none: the consumer starts from the earliest)."""
        committed = self._ledger.committed_offsets()
        lags: dict[TopicPartitionKey, int] = {}
        try:
            # Partitions this worker has committed nothing for yet: ask the group coordinator.
            unknown = [TopicPartition(t, p) for (t, p), offset in committed.items() if offset is None]
            for tp in probe.committed(unknown, timeout=LAG_QUERY_TIMEOUT_S) if unknown else []:
                if tp.offset >= 0:
                    committed[(tp.topic, tp.partition)] = tp.offset
            for (topic, partition), offset in committed.items():
                if self._stop_lag.is_set():
                    return
                # Not the cached watermark: a paused partition is not fetched, so its cached one goes stale.
                watermarks = probe.get_watermark_offsets(
                    TopicPartition(topic, partition), timeout=LAG_QUERY_TIMEOUT_S, cached=False
                )
                if watermarks is not None:
                    low, high = watermarks
                    lags[(topic, partition)] = max(0, high - (low if offset is None else offset))
        except KafkaException as e:
            # Telemetry only: the gauges keep their last values until the broker answers again.
            log.debug("consumer lag not refreshed: %s", e)
            return
        with self._lag_lock:
            owned = self._ledger.committed_offsets().keys()  # not those released while the queries ran
            for (topic, partition), lag in lags.items():
                if (topic, partition) in owned:
                    self._metrics.consumer_lag_records.labels(topic, str(partition)).set(lag)
                    self._lag_series.add((topic, partition))
            stale = self._lag_series - owned
        self._forget_lag(stale)

    def _forget_lag(self, keys: set[TopicPartitionKey]) -> None:
        """Drop the lag series of partitions this worker no longer owns (their new owner reports them)."""
        with self._lag_lock:
            for topic, partition in keys & self._lag_series:
                self._metrics.consumer_lag_records.remove(topic, str(partition))
            self._lag_series -= keys

    # --- publisher thread --------------------------------------------------------------------------------

    def _publish_loop(self) -> None:
        failures_after_stop = 0
        while not self._wedged.is_set():
            self._work_ready.wait(PUBLISH_IDLE_S)
            self._work_ready.clear()
            with self._txn_lock:
                published = self._publish_ready()
                wait_s = self._aborts.wait_s()
            if published and self._stop_publisher.is_set():
                return
            if not published:
                if self._stop_publisher.is_set():
                    failures_after_stop += 1
                    if failures_after_stop >= MAX_ABORTS_AFTER_STOP:
                        log.error("giving up publishing at shutdown; unpublished tasks will run again")
                        return
                time.sleep(wait_s)
                self._work_ready.set()

    def _publish_ready(self, keys: set[TopicPartitionKey] | None = None) -> bool:
        """Publish what has finished in every owned partition (or in ``keys``) and commit their offsets in one
        transaction, or one transaction per partition after aborts that named no record (see ``aborts``). Call with
        ``_txn_lock`` held. False if a transaction was aborted (publish again)."""
        ready = self._ledger.ready(keys)
        if not ready:
            return True
        if not self._aborts.isolate:
            published = self._publish(ready)
        else:
            published = all([self._publish([r]) for r in ready])  # a list: every partition gets its try
        if published:
            self._aborts.committed(everything=True)
        return published

    def _publish(self, ready: list[Ready]) -> bool:
        """Publish ``ready`` in one transaction. False if it was aborted: what it carried is left in the ledger, each
        outcome whose record Kafka refused for good replaced by a smaller one."""
        # For each record: the Ready holding it, its outcome's index there, and its index in that outcome.
        owners = [(r, i, j) for r in ready for i, outcome in enumerate(r.outcomes) for j in range(len(outcome.records))]
        records = [record for r in ready for outcome in r.outcomes for record in outcome.records]
        offsets = [TopicPartition(r.partition.key[0], r.partition.key[1], r.next_offset, r.metadata) for r in ready]
        self._publishing_since = time.monotonic()
        try:
            self._publisher.publish(records, offsets, self._group_metadata)
        except TransactionAborted as e:
            self._metrics.transactions.labels("aborted").inc()
            if self._wedged.is_set():
                return True  # a given-up worker stops publishing
            self._after_abort(owners, e.refused)
            return False
        except TransactionFatal:
            if self._wedged.is_set():
                return True  # given up while the call hung: a newer producer owns the id now, touch nothing
            self._metrics.transactions.labels("fatal").inc()
            self._recover_from_fatal()
            return True
        finally:
            self._publishing_since = None
        if self._wedged.is_set():
            return True
        self._metrics.transactions.labels("committed").inc()
        self._aborts.committed(everything=False)
        self._ledger.committed(ready)
        self._after_commit(ready)
        return True

    def _after_abort(self, owners: list[tuple[Ready, int, int]], refused: tuple[Refusal, ...]) -> None:
        """Replace each outcome that owns a refused record by its smaller form (for its first refused record: the
        next transaction tells whether another record of it is refused too)."""
        changed, blocked = False, False
        seen: set[tuple[int, int]] = set()
        for refusal in refused:
            ready, i, j = owners[refusal.index]
            if (id(ready), i) in seen:
                continue
            seen.add((id(ready), i))
            if self._replace_refused(ready, i, dataclasses.replace(refusal, index=j)):
                changed = True
            else:
                blocked = True
        self._aborts.aborted(named=bool(refused), changed=changed, blocked=blocked)

    def _replace_refused(self, ready: Ready, i: int, refusal: Refusal) -> bool:
        """Put the smaller form of ``ready.outcomes[i]`` in the ledger. False if there is none: the refused record's
        topic takes no record at all (blocked)."""
        outcome = ready.outcomes[i]
        record = outcome.records[refusal.index]
        kind = "result" if record.topic == self._results_topic else "dead_letter"
        replacement = outcome.smaller(refusal) if outcome.smaller is not None else None
        where = f"{ready.partition.key[0]}[{ready.partition.key[1]}]@{ready.offsets[i]}"
        if replacement is None:
            self._metrics.refused_records.labels(kind, "blocked").inc()
            log.error("%s refuses every record (%s: %s): publishing waits", record.topic, refusal.code, refusal.reason)
            return False
        action = "dropped" if len(replacement.records) < len(outcome.records) else "replaced"
        self._metrics.refused_records.labels(kind, action).inc()
        log.error(
            "the %s record of %s was refused for good (%s: %s): %s",
            kind,
            where,
            refusal.code,
            refusal.reason,
            "dropped" if action == "dropped" else "publishing a smaller outcome instead",
        )
        self._ledger.replace(ready.partition, ready.offsets[i], replacement)
        return True

    def _on_blocked(self, blocked: bool) -> None:
        self._metrics.publish_blocked.set(1 if blocked else 0)
        if blocked:
            self._publish_blocked.set()
            log.error("a topic refuses every record; nothing is published or fetched until it takes them again")
        else:
            self._publish_blocked.clear()
            log.warning("publishing again")

    def _after_commit(self, ready: list[Ready]) -> None:
        for r in ready:
            for outcome in r.outcomes:
                if outcome.on_committed is not None:
                    outcome.on_committed()

    def _recover_from_fatal(self) -> None:
        """The producer cannot go on (most likely fenced by a newer instance with our transactional.id): drop
        every unpublished outcome, recreate the producer, and fetch again from the committed offsets."""
        now = time.monotonic()
        self._fences = [t for t in self._fences if now - t < FENCE_WINDOW_S] + [now]
        if len(self._fences) > MAX_FENCES:
            raise RuntimeError(
                f"transactional producer {self._publisher.transactional_id} failed fatally {len(self._fences)} times "
                f"in {FENCE_WINDOW_S:.0f}s: is another live worker using the same AIMESH_WORKER_ID?"
            )
        self._forget(self._ledger.owned())
        self._publisher.recreate()
        self._rewind.set()

    # --- event loop: tasks -------------------------------------------------------------------------------

    def _on_health(self, healthy: bool) -> None:
        self._triton_ok = healthy
        self._metrics.triton_ready.set(1 if healthy else 0)

    def _enqueue(self, record: Record, partition: Partition) -> None:
        self._backlogs[self._class_of(record.topic)].append((record, partition))
        self._fill()

    def _fill(self) -> None:
        """Start backlog records while fewer than max_in_flight tasks run (none once the worker drains): interactive
        ones first, batch ones only when no interactive record waits and fewer than ``_batch_slots`` batch tasks
        run."""
        interactive, batch = self._backlogs["interactive"], self._backlogs["batch"]
        while len(self._tasks) < self._max_in_flight and not self._stop_fetching.is_set():
            if interactive:
                backlog = interactive
            elif batch and len(self._batch_running) < self._batch_slots:
                backlog = batch
            else:
                break
            record, partition = backlog.popleft()
            if partition.released:
                continue  # its partition moved on while it waited: the new owner runs it
            task = asyncio.create_task(self._process(record, partition), name=f"task@{record.where()}")
            self._tasks[task] = partition
            if backlog is batch:
                self._batch_running.add(task)
            task.add_done_callback(self._task_done)
        for c in CLASSES:
            self._backlog_sizes[c] = len(self._backlogs[c])

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)
        self._batch_running.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s crashed", task.get_name(), exc_info=task.exception())
        self._fill()

    def _cancel_tasks_of(self, partitions: list[Partition]) -> None:
        """Stop the running tasks of released partitions, and drop their backlog: their new owner runs them."""
        for task, partition in list(self._tasks.items()):
            if any(partition is p for p in partitions):
                task.cancel()
        for c in CLASSES:
            self._backlogs[c] = deque((r, p) for r, p in self._backlogs[c] if not p.released)
            self._backlog_sizes[c] = len(self._backlogs[c])

    def _cancel_arrived(self, task_id: str, tenant: str) -> None:
        """A cancellation was read (on the reader's thread): stop the task's stream if it is streaming here."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._stop_stream, task_id, tenant)

    def _stop_stream(self, task_id: str, tenant: str) -> None:
        stream = self._streams.get(task_id)
        if stream is not None and stream[0] == tenant:
            log.info("cancelling the stream of task %s", task_id)
            stream[1].set()

    def _is_cancelled(self, task: task_pb2.AITaskEvent) -> bool:
        return self._cancellations.is_cancelled(task.task_id, task.tenant)

    async def _process(self, record: Record, partition: Partition) -> None:
        outcome = await self._handle(record)
        if self._ledger.finished(partition, record.offset, outcome):
            self._work_ready.set()
            self.processed += 1

    async def _handle(self, record: Record) -> Outcome:
        try:
            task = events.decode_task(record.value)
        except UndecodableRecord as e:
            return self._undecodable(record, e)
        runtime.task_id_var.set(task.task_id)
        run = _Run(batch=self._class_of(record.topic) == "batch" or task.priority == task_pb2.PRIORITY_BATCH)
        with self._process_span(record, task.task_id):
            try:
                result, attempts = await self._run(task, run)
            except Exception as e:
                # A bug or an error type nobody expected: the client still gets an answer, and the partition is
                # not blocked behind a task that never finishes.
                log.exception("task %s failed unexpectedly", task.task_id)
                tracing.fail(f"internal error: {e!r}")
                result = self._result(task, result_pb2.TASK_STATUS_FAILED)
                result.error.CopyFrom(
                    result_pb2.TaskError(code=result_pb2.ERROR_CODE_INTERNAL, message=f"internal error: {e!r}")
                )
                attempts = 0
            # One past the last partial update of the attempt that produced the result (none: FIRST_PARTIAL_SEQUENCE).
            result.sequence = events.FIRST_PARTIAL_SEQUENCE + run.partials
            await self._flush_partials(run)
            return self._outcome(record, task.task_id, self._fit(result), attempts=attempts)

    def _fit(self, result: result_pb2.AIResultEvent) -> result_pb2.AIResultEvent | None:
        """``result``, or what replaces it when its record would not fit the record size limit (see record_limits)."""
        fitted = self._limits.fit_result(result)
        if fitted is not result:
            log.error("task %s: %s", result.task_id, fitted.error.message if fitted else "its task id fits no record")
            tracing.fail("result too large")
            self._metrics.refused_records.labels("result", "preflight").inc()
        return fitted

    def _outcome(
        self,
        record: Record,
        task_id: str,
        result: result_pb2.AIResultEvent | None,
        *,
        attempts: int,
        undecodable: str = "",
        error: str = "",
        stage: _Stage = "fitted",
    ) -> Outcome:
        """What a finished task publishes: its result and, for a failure (or an ``undecodable`` record: the reason),
        a dead-letter record, fitted to the record size limit (``stage``: how far it was cut down already); its
        ``smaller`` is the next stage, for when Kafka refuses one of its records all the same."""
        error = error or (result.error.message if result is not None else "")
        dead_letter = undecodable or (self._dead_letter_reason(result) if result is not None else "")
        records = [] if result is None else [self._result_record(result)]
        if dead_letter and stage != "no_dead_letter":
            records.append(
                self._dead_letter_record(
                    record,
                    reason=dead_letter,
                    error=error,
                    attempts=attempts,
                    task_id=task_id,
                    minimal=stage != "fitted",
                )
            )
            if stage == "fitted":
                tracing.event("dead_letter", {"aimesh.dead_letter.reason": dead_letter})
        counted = None if undecodable or result is None else (result.model_name, status_label(result.status))
        dead_lettered = dead_letter if stage != "no_dead_letter" else ""

        def committed() -> None:
            if counted is not None:
                self._metrics.results.labels(*counted).inc()
            if dead_lettered:
                self._metrics.dead_lettered.labels(dead_lettered).inc()

        def smaller(refusal: Refusal) -> Outcome | None:
            """A refused result becomes the minimal FAILED one (unless it is that already, or its topic refuses every
            record: nothing smaller helps then); a refused dead-letter record becomes the minimal one, then none."""
            next_stage: _Stage
            if records[refusal.index].topic == self._results_topic:
                if stage != "fitted" or refusal.scope == "topic" or result is None:
                    return None
                replaced, next_stage = self._refused_result(result, refusal), "minimal"
            else:
                drop = stage != "fitted" or refusal.scope == "topic"
                replaced, next_stage = result, "no_dead_letter" if drop else "minimal"
            return self._outcome(
                record, task_id, replaced, attempts=attempts, undecodable=undecodable, error=error, stage=next_stage
            )

        return Outcome(tuple(records), committed, smaller)

    def _refused_result(self, result: result_pb2.AIResultEvent, refusal: Refusal) -> result_pb2.AIResultEvent | None:
        code = (
            result_pb2.ERROR_CODE_RESULT_TOO_LARGE if refusal.scope == "size" else result_pb2.ERROR_CODE_RESULT_REFUSED
        )
        message = f"Kafka refused the result record ({refusal.code}: {refusal.reason}): its output was dropped"
        return self._limits.minimal_result(result, code, message)

    def _process_span(self, record: Record, key: str) -> AbstractContextManager[Span]:
        """The CONSUMER span of processing ``record``, continuing the trace its producer put in its headers."""
        return tracing.process_span(
            record.topic,
            key=key,
            partition=record.partition,
            offset=record.offset,
            group=self._group,
            headers=record.headers,
        )

    def _undecodable(self, record: Record, e: UndecodableRecord) -> Outcome:
        """A record this worker cannot read: dead-letter it, and answer its task if its id is readable."""
        self._metrics.undecodable_records.labels(e.reason).inc()
        key = e.task_id or (record.key or b"").decode("utf-8", "replace")
        with self._process_span(record, key):
            tracing.fail(f"undecodable record dead-lettered: {e}")
            log.error("dead-lettering undecodable record %s: %s", record.where(), e)
            result = None
            if e.task_id:
                result = result_pb2.AIResultEvent(
                    schema_version=events.SCHEMA_VERSION,
                    task_id=e.task_id,
                    status=result_pb2.TASK_STATUS_FAILED,
                    worker_id=self._worker_id,
                    produced_at=events.now_timestamp(),
                    error=result_pb2.TaskError(code=result_pb2.ERROR_CODE_BAD_TASK, message=str(e)),
                    sequence=events.FIRST_PARTIAL_SEQUENCE,
                )
                result = self._fit(result)
            return self._outcome(record, e.task_id, result, attempts=0, undecodable=e.reason, error=str(e))

    async def _run(self, task: task_pb2.AITaskEvent, run: _Run) -> tuple[result_pb2.AIResultEvent, int]:
        """The task's terminal result, and how many times inference was tried."""
        started = time.time()
        deadline = self._deadline(task, started)
        if deadline is not None and deadline <= started:
            return self._expired(task, started, "the task's deadline passed before a worker reached it"), 0
        if self._is_cancelled(task):
            return self._cancelled(task, started, "the task was cancelled by the client before it ran"), 0
        if task.input.WhichOneof("kind") != "text":
            result = self._result(task, result_pb2.TASK_STATUS_FAILED)
            result.error.CopyFrom(
                result_pb2.TaskError(
                    code=result_pb2.ERROR_CODE_BAD_TASK, message="the task has no input this worker can serve"
                )
            )
            tracing.fail(result.error.message)
            return self._finish(result, task, started, started), 0

        self._announce_running(task)
        if task.HasField("submitted_at"):
            queue_wait_s = max(0.0, started - events.timestamp_s(task.submitted_at))
            self._metrics.queue_wait_seconds.labels(task.model_name).observe(queue_wait_s)
        inference_started = time.monotonic()
        attempts = 0
        result = self._result(task, result_pb2.TASK_STATUS_SUCCEEDED)

        async def attempt() -> Inference:
            nonlocal attempts
            attempts += 1
            if self._is_cancelled(task):  # learned while it waited for a retry
                raise CancelledByClient("cancelled before it was sent to Triton")
            info = await self._model_info(task)
            if info.decoupled:
                return await self._stream(task, deadline, run)
            return await self._infer(task, deadline, info, run)

        try:
            inference = await self._triton_retry.call(
                attempt,
                budget_s=None if deadline is None else max(0.0, deadline - started),
                on_retry=lambda e: self._on_retry(task.model_name, e),
                sleep=lambda wait_s: self._backoff(wait_s, deadline),
                paused_s=self._health.unhealthy_seconds,
            )
        except CancelledByClient:
            self._metrics.inference_seconds.labels(task.model_name).observe(time.monotonic() - inference_started)
            cancelled = self._cancelled(task, started, "the task was cancelled by the client before it ran")
            if run.text is not None:  # between two attempts of a stream: what the last one had sent
                cancelled.output.CopyFrom(self._text_output("".join(run.text)))
            return cancelled, attempts
        except InferenceFailed as e:
            self._metrics.inference_seconds.labels(task.model_name).observe(time.monotonic() - inference_started)
            if e.retryable and deadline is not None and time.time() >= deadline:
                expired = self._expired(task, started, f"the task's deadline passed during inference: {e}")
                if run.text is not None:  # a stream stopped by the deadline: what it had sent so far
                    expired.output.CopyFrom(self._text_output("".join(run.text)))
                return expired, attempts
            result.status = result_pb2.TASK_STATUS_FAILED
            result.error.CopyFrom(e.to_proto())
            tracing.fail(
                str(e), {"aimesh.error.code": result_pb2.ErrorCode.Name(e.code), "aimesh.error.retryable": e.retryable}
            )
            return self._finish(result, task, started, time.time()), attempts
        self._metrics.inference_seconds.labels(task.model_name).observe(time.monotonic() - inference_started)
        result.output.CopyFrom(inference.output)
        result.model_version = inference.model_version
        if inference is _STOPPED:
            # A stream cancelled by the client: CANCELLED, with the text it had streamed.
            result.status = result_pb2.TASK_STATUS_CANCELLED
            result.output.CopyFrom(self._text_output("".join(run.text or [])))
            result.error.CopyFrom(result_pb2.TaskError(message="the task was cancelled by the client while it ran"))
            tracing.fail("cancelled by the client while streaming")
        return self._finish(result, task, started, time.time()), attempts

    @staticmethod
    def _deadline(task: task_pb2.AITaskEvent, now: float) -> float | None:
        """The task's deadline (epoch seconds), no further than ``MAX_DEADLINE_S`` from ``now``: every timeout the
        worker derives from it (retry budget, Triton queue timeout, stream timeout, waits) stays in range whatever
        the record says."""
        if not task.HasField("deadline"):
            return None
        return min(events.timestamp_s(task.deadline), now + MAX_DEADLINE_S)

    async def _model_info(self, task: task_pb2.AITaskEvent) -> ModelInfo:
        """How to call the task's model. A model whose configuration Triton refuses (an unknown model) is called
        like a unary one, so the task fails the way any inference call on it fails, inside an ``infer`` span."""
        try:
            return await self._triton.model_info(task.model_name, task.model_version)
        except InferenceFailed as e:
            if e.retryable:
                raise
            return UNARY_MODEL

    async def _infer(self, task: task_pb2.AITaskEvent, deadline: float | None, info: ModelInfo, run: _Run) -> Inference:
        priority = 0
        if info.priority_levels >= 2:
            priority = BATCH_TRITON_PRIORITY if run.batch else INTERACTIVE_TRITON_PRIORITY
        with tracing.infer_span(
            task.model_name, server_address=self._triton.url, batch_items=1, task_id=task.task_id
        ) as span:
            batched = await self._batcher.infer(
                BatchKey.of(task.model_name, task.model_version, dict(task.parameters), priority),
                task.input.text,
                deadline=deadline,
                metadata=tracing.grpc_metadata(),
                cancelled=lambda: self._is_cancelled(task),
            )
            span.set_attribute("aimesh.inference.batch_items", batched.batch_items)
            return batched.inference

    async def _stream(self, task: task_pb2.AITaskEvent, deadline: float | None, run: _Run) -> Inference:
        """One attempt at a streaming model: each response is sent as a partial update (sequence 3, 4, ... from the
        start of every attempt: a retried stream repeats the same tokens, seeded, under the same numbers). Returns
        the whole text, or ``_STOPPED`` when the client cancelled the task meanwhile (the text so far in ``run``)."""
        run.partials, run.text = 0, []
        parameters = dict(task.parameters)
        parameters.setdefault(SEED_PARAMETER, str(derived_seed(task.task_id)))
        timeout_s = self._inference_timeout_s
        if deadline is not None:
            timeout_s = min(timeout_s, max(0.001, deadline - time.time()))
        stop = asyncio.Event()
        self._streams[task.task_id] = (task.tenant, stop)
        if self._is_cancelled(task):
            stop.set()
        version, final = "", False
        try:
            with tracing.infer_span(
                task.model_name, server_address=self._triton.url, batch_items=1, task_id=task.task_id
            ) as span:
                tokens = self._triton.stream(
                    task.model_name,
                    task.input.text,
                    model_version=task.model_version,
                    parameters=parameters,
                    timeout_s=timeout_s,
                    stop=stop,
                    metadata=tracing.grpc_metadata(),
                )
                async with aclosing(tokens):  # an attempt that ends early (cancelled task) cancels the stream
                    async for token in tokens:
                        version, final = token.model_version, token.final
                        if token.text:
                            run.text.append(token.text)
                            self._send_partial(task, events.FIRST_PARTIAL_SEQUENCE + run.partials, token.text, run)
                            run.partials += 1
                span.set_attribute("aimesh.inference.stream_responses", run.partials)
        finally:
            self._streams.pop(task.task_id, None)
        if not final:
            return _STOPPED
        return Inference(output=self._text_output("".join(run.text)), model_version=version)

    @staticmethod
    def _text_output(text: str) -> result_pb2.TaskOutput:
        output = result_pb2.TaskOutput()
        output.tensors.add(name=STREAM_OUTPUT_NAME, datatype="BYTES", shape=[1], string_data=[text])
        return output

    def _send_partial(self, task: task_pb2.AITaskEvent, sequence: int, text: str, run: _Run) -> None:
        """A partial output, through the progress producer like RUNNING updates: in order per task (one key, one
        idempotent producer), best effort (the terminal result holds the whole text)."""
        partial = self._result(task, result_pb2.TASK_STATUS_RUNNING)
        partial.produced_at.CopyFrom(events.now_timestamp())
        partial.sequence = sequence
        partial.partial = True
        partial.output.CopyFrom(self._text_output(text))
        try:
            future = self._progress.produce_nowait(
                self._results_topic,
                key=task.task_id,
                value=partial.SerializeToString(),
                headers=events.result_headers(),
            )
        except BrokerUnavailable as e:
            log.debug("partial update %d of %s not queued: %s", sequence, task.task_id, e)
            return
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        run.last_partial = future

    @staticmethod
    async def _flush_partials(run: _Run) -> None:
        """Give the task's partial updates a moment to be acknowledged before its terminal result is published."""
        if run.last_partial is not None and not run.last_partial.done():
            await asyncio.wait({run.last_partial}, timeout=PARTIALS_FLUSH_S)

    async def _backoff(self, wait_s: float, deadline: float | None) -> None:
        """Sleep the backoff, then, if Triton is down, wait for it to come back (up to the task's deadline)."""
        await asyncio.sleep(wait_s)
        if not self._health.healthy:
            tracing.event("waiting for Triton")
            await self._health.wait_healthy(None if deadline is None else max(0.0, deadline - time.time()))

    def _on_retry(self, model: str, error: BaseException) -> None:
        code = error.code if isinstance(error, InferenceFailed) else result_pb2.ERROR_CODE_UNSPECIFIED
        self._metrics.observe_retry(model, code)
        if code == result_pb2.ERROR_CODE_UNAVAILABLE:
            self._health.check_soon()  # Triton may be down: find out before the next attempt

    def _result(self, task: task_pb2.AITaskEvent, status: result_pb2.TaskStatus.ValueType) -> result_pb2.AIResultEvent:
        return result_pb2.AIResultEvent(
            schema_version=events.SCHEMA_VERSION,
            task_id=task.task_id,
            status=status,
            model_name=task.model_name,
            worker_id=self._worker_id,
            tenant=task.tenant,
        )

    def _cancelled(self, task: task_pb2.AITaskEvent, started: float, why: str) -> result_pb2.AIResultEvent:
        result = self._result(task, result_pb2.TASK_STATUS_CANCELLED)
        result.error.CopyFrom(result_pb2.TaskError(message=why))
        tracing.fail(f"cancelled: {why}")
        return self._finish(result, task, started, time.time())

    def _expired(self, task: task_pb2.AITaskEvent, started: float, why: str) -> result_pb2.AIResultEvent:
        result = self._result(task, result_pb2.TASK_STATUS_EXPIRED)
        result.error.CopyFrom(result_pb2.TaskError(code=result_pb2.ERROR_CODE_DEADLINE_EXCEEDED, message=why))
        tracing.fail(f"expired: {why}")
        return self._finish(result, task, started, time.time())

    def _finish(
        self, result: result_pb2.AIResultEvent, task: task_pb2.AITaskEvent, started: float, ended: float
    ) -> result_pb2.AIResultEvent:
        submitted = events.timestamp_s(task.submitted_at) or started
        result.produced_at.CopyFrom(events.now_timestamp())
        result.timings.queue_wait.FromNanoseconds(int(max(0.0, started - submitted) * 1e9))
        result.timings.inference.FromNanoseconds(int((ended - started) * 1e9))
        result.timings.total.FromNanoseconds(int(max(0.0, time.time() - submitted) * 1e9))
        return result

    @staticmethod
    def _dead_letter_reason(result: result_pb2.AIResultEvent) -> str:
        """Why a FAILED task goes to the dead-letter topic too (a label such as ``model_not_found``); empty for
        results that are not failures of processing (succeeded, expired)."""
        if result.status != result_pb2.TASK_STATUS_FAILED:
            return ""
        return error_code_label(result.error.code)

    def _result_record(self, result: result_pb2.AIResultEvent) -> OutRecord:
        headers = events.result_headers()
        with tracing.send_span(self._results_topic, result.task_id, headers):
            pass  # the record is sent inside the next transaction; the span marks its creation
        return OutRecord(self._results_topic, result.task_id.encode(), result.SerializeToString(), headers)

    def _dead_letter_record(
        self, record: Record, *, reason: str, error: str, attempts: int, task_id: str, minimal: bool = False
    ) -> OutRecord:
        """The task record with the reason in headers, cut to fit the record size limit; ``minimal``: without its
        value or the original headers (Kafka refused the fitted one)."""
        headers: Headers = [
            (events.DLQ_REASON_HEADER, reason.encode()),
            (events.DLQ_ERROR_HEADER, cut_utf8(error, MAX_ERROR_HEADER_BYTES).encode()),
            (events.DLQ_TOPIC_HEADER, record.topic.encode()),
            (events.DLQ_PARTITION_HEADER, str(record.partition).encode()),
            (events.DLQ_OFFSET_HEADER, str(record.offset).encode()),
            (events.DLQ_ATTEMPTS_HEADER, str(attempts).encode()),
            (events.DLQ_WORKER_HEADER, self._worker_id.encode()),
        ]
        if task_id:
            headers.append((events.DLQ_TASK_ID_HEADER, task_id.encode()))
        if minimal:
            return self._limits.minimal_dead_letter(record.key, len(record.value or b""), headers)
        # The original headers ride along (trace context included), after ours.
        fitted = self._limits.fit_dead_letter(record.key, record.value, headers, record.headers)
        if fitted.value is not record.value:
            self._metrics.refused_records.labels("dead_letter", "preflight").inc()
        return fitted

    def _announce_running(self, task: task_pb2.AITaskEvent) -> None:
        """Best effort, outside transactions: a lost RUNNING update costs a subscriber a progress step, never
        the result; a repeated one (a task run again after a crash) changes nothing for the notifier."""
        running = self._result(task, result_pb2.TASK_STATUS_RUNNING)
        running.produced_at.CopyFrom(events.now_timestamp())
        running.sequence = events.RUNNING_SEQUENCE
        headers = events.result_headers()
        try:
            with tracing.send_span(self._results_topic, task.task_id, headers):
                self._progress.produce_detached(
                    self._results_topic, key=task.task_id, value=running.SerializeToString(), headers=headers
                )
        except BrokerUnavailable as e:
            log.debug("RUNNING update for %s not queued: %s", task.task_id, e)
