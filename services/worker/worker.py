"""The worker: a consumer-group member that runs tasks through Triton and publishes exactly one terminal result per
task. ``Worker`` wires the parts below and runs them; each module's docstring says more.

Exactly once: a task's terminal result (and, for a record it cannot process, its dead-letter record) is published
in the same Kafka transaction that commits its partition's offsets. Inference runs *outside* transactions; a
finished task is published by the next transaction, whatever still runs before it in its partition (a fast task
never waits for a slow one). The committed offset stays the partition's lowest unpublished one, and the published
offsets above it ride in the commit's metadata (``ledger``, ``finished_offsets``); a new owner of the partition
reads both and skips exactly the tasks already published. A crash re-runs what was not published; a read_committed
consumer never sees a result twice. At least once (``AIMESH_PROCESSING_GUARANTEE=at_least_once``,
``acknowledged``): the same ledger and steps, but a publish is an idempotent producer's records acknowledged, then
the offsets committed by the consumer thread; the notifier delivers only each task's first terminal result.

The parts, and where they run:
- ``consumer_loop.TaskConsumer`` (the consumer thread) owns the group Consumer: fetches, pauses and resumes each
  priority class, and runs the rebalance callbacks;
- ``committer.Committer`` (the publisher thread) publishes whatever the ``ledger`` says is ready;
- ``scheduler.Scheduler`` and ``runner.TaskRunner`` (the event loop) start tasks from per-class backlogs and run
  each through Triton to its ``outcomes.Outcomes``;
- ``lag.LagReporter`` (a thread started by the consumer thread) sets the consumer lag gauges;
- ``cancellation.CancellationReader`` (a thread) reads the cancellations topic; ``health.TritonHealth`` (a task)
  checks Triton.
Four threads beside the event loop's, and a task: any that dies stops fetching and is reported to ``on_death``
(the service's ``Lifeline``, see ``aimesh.lifecycle``), and the service stops the worker.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

from aimesh.kafka import AsyncProducer, Record
from aimesh.lifecycle import OnDeath
from aimesh.metrics import WorkerMetrics
from aimesh.retry import RetryPolicy

from .cancellation import CancellationReader, Cancellations
from .committer import Committer, ProducerWedged
from .consumer_loop import TaskConsumer
from .duplicates import Duplicates
from .health import TritonHealth
from .inference import Triton
from .lag import LagReporter
from .ledger import Ledger, Partition
from .options import WorkerOptions
from .runner import TaskRunner
from .scheduler import Scheduler
from .transactions import Publisher

log = logging.getLogger(__name__)

__all__ = ["ProducerWedged", "Worker", "WorkerOptions"]


class Worker:
    """Consumes the tasks topics, infers on Triton, publishes to the results topic (and the dead-letter topic), as
    ``options`` say.

    A ``lifecycle.Part``: ``start`` joins the group and runs; ``stop`` drains (fetching stops, in-flight tasks get
    ``grace_s`` to finish, what finished is published and committed, and the consumer leaves its group).
    """

    def __init__(
        self,
        options: WorkerOptions,
        *,
        consumer_config: dict[str, Any],
        publisher: Publisher,
        progress: AsyncProducer,
        triton: Triton,
        triton_retry: RetryPolicy,
        metrics: WorkerMetrics | None = None,
        cancel_consumer_config: dict[str, Any] | None = None,
    ) -> None:
        self._options = options
        self.metrics = metrics if metrics is not None else WorkerMetrics()
        self.ledger = Ledger()
        self._stop_fetching = threading.Event()
        self.cancellations = Cancellations(options.cancel_window_s)
        self.health = TritonHealth(triton.is_ready, interval_s=options.health_interval_s, on_change=self._on_health)
        self.runner = TaskRunner.of(
            options,
            triton=triton,
            progress=progress,
            health=self.health,
            cancellations=self.cancellations,
            metrics=self.metrics,
            retry=triton_retry,
            group=consumer_config["group.id"],
        )
        self.scheduler = Scheduler(self._process, options.max_in_flight, options.batch_tasks_topic, self._stop_fetching)
        self.committer = Committer(
            publisher,
            self.ledger,
            self.metrics,
            results_topic=options.results_topic,
            drop_unpublished=lambda: self.consumer.forget_all(),
            refetch=lambda: self.consumer.refetch(),
        )
        self.consumer = TaskConsumer(
            consumer_config,
            tasks_topic=options.tasks_topic,
            batch_tasks_topic=options.batch_tasks_topic,
            ledger=self.ledger,
            duplicates=Duplicates(options.idempotency_window_s, consumer_config),
            committer=self.committer,
            scheduler=self.scheduler,
            lag=LagReporter(consumer_config, self.ledger, self.metrics),
            metrics=self.metrics,
            max_in_flight=options.max_in_flight,
            stop_fetching=self._stop_fetching,
            guarded=self._guarded,
        )
        self.cancel_reader = self._cancel_reader(options, cancel_consumer_config)
        self.on_death: OnDeath | None = None  # told when a thread or the health check dies
        self._loop: asyncio.AbstractEventLoop | None = None
        self._threads: list[threading.Thread] = []
        self._health_check: asyncio.Task[None] | None = None
        self._stopping = False
        self.processed = 0

    def _cancel_reader(
        self, options: WorkerOptions, consumer_config: dict[str, Any] | None
    ) -> CancellationReader | None:
        if not options.cancel_topic or consumer_config is None:
            return None
        return CancellationReader(
            consumer_config,
            options.cancel_topic,
            self.cancellations,
            window_s=options.cancel_window_s,
            on_cancel=self._cancel_arrived,
        )

    @property
    def name(self) -> str:
        return "worker"

    @property
    def wedged(self) -> bool:
        """Whether the worker gave up its producer, a transactional call never having returned (ProducerWedged):
        build a new Worker, whose producer fences the wedged one."""
        return self.committer.wedged.is_set()

    async def start(self) -> None:
        """Join the group and run: the consumer, publisher and cancellations threads, the Triton health check."""
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self.committer.publisher.start)
        self.consumer.subscribe(self._loop)
        log.info(
            "worker %s consuming %s as group %s (transactional id %s)",
            self._options.worker_id,
            " and ".join(self.consumer.topics),
            self.consumer.group,
            self.committer.publisher.transactional_id,
        )
        self._threads = [
            self._thread(self.consumer.run, "kafka-consumer"),
            self._thread(self.committer.run, "kafka-publisher"),
        ]
        if self.cancel_reader is not None:
            # It retries broker trouble itself; anything else that ends it stops the worker like any other thread.
            self.cancel_reader.on_death = self._died
            await self.cancel_reader.start()
        self._health_check = asyncio.create_task(self.health.run(), name="triton-health")
        self._health_check.add_done_callback(self._health_ended)

    async def stop(self) -> None:
        """Drain: stop fetching, give running tasks ``grace_s``, publish what finished, leave the group. Safe to call
        twice, and before ``start``."""
        if self._stopping:
            return
        self._stopping = True
        self._stop_fetching.set()
        if self._threads:
            await self._drain()
        if self._health_check is not None:
            self._health_check.cancel()
        await self.runner.close()
        if self._threads and not self.wedged:  # a wedged producer is abandoned: its thread may never return
            await asyncio.to_thread(self.committer.publisher.close)

    def _thread(self, body: Callable[[], None], name: str) -> threading.Thread:
        thread = threading.Thread(target=self._guarded, args=(body,), name=name, daemon=True)
        thread.start()
        return thread

    async def _drain(self) -> None:
        consumer, publisher = self._threads
        await self.scheduler.drain(self._options.grace_s)
        # The consumer thread closes the consumer, whose final revoke publishes everything finished.
        self.consumer.stop()
        await asyncio.to_thread(consumer.join)
        self.committer.stop()
        if not self.wedged:
            await asyncio.to_thread(publisher.join)
        if self.cancel_reader is not None:
            await self.cancel_reader.stop()

    async def _process(self, record: Record, partition: Partition) -> None:
        outcome = await self.runner.handle(record)
        if self.ledger.finished(partition, record.offset, outcome):
            self.committer.work_ready.set()
            self.processed += 1

    def _guarded(self, body: Callable[[], None]) -> None:
        """Run a thread's loop; if it dies, stop the worker instead of running on half-blind."""
        try:
            body()
        except BaseException as e:
            log.critical("%s failed", threading.current_thread().name, exc_info=True)
            self._died(threading.current_thread().name, e)

    def _died(self, component: str, error: BaseException) -> None:
        """A thread or task the worker needs ended: fetch nothing more, and tell ``on_death`` (the service stops the
        worker, then exits non-zero or, for a wedged producer, starts a new worker). Any thread."""
        self._stop_fetching.set()
        if self.on_death is not None:
            self.on_death(component, error)

    def _health_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.critical("the Triton health check failed", exc_info=task.exception())
            self._died(task.get_name(), task.exception() or RuntimeError("ended"))

    def _on_health(self, healthy: bool) -> None:
        self.consumer.triton_ok = healthy
        self.metrics.triton_ready.set(1 if healthy else 0)

    def _cancel_arrived(self, task_id: str, tenant: str) -> None:
        """A cancellation was read (on the reader's thread): stop the task's stream if it is streaming here."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.runner.stop_stream, task_id, tenant)
