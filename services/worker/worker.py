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
- ``cancellation.CancellationReader`` (a thread) reads the cancellations topic; ``health.TritonHealth`` (a task,
  ``lifecycle.TaskPart``) checks Triton.
Four threads beside the event loop's (each a ``background.BackgroundThread``), and a task: any that dies stops
fetching and is reported to ``on_death`` (the service's ``Lifeline``, see ``aimesh.lifecycle``), and the service
stops the worker.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

from aimesh.kafka import Record
from aimesh.kafka_producer import AsyncProducer
from aimesh.lifecycle import OnDeath, TaskPart
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
        self._health_check = TaskPart("triton-health", self.health.run, on_death=self._died)
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
            on_death=self._died,
        )
        self.consumer = TaskConsumer(
            consumer_config,
            tasks_topic=options.tasks_topic,
            batch_tasks_topic=options.batch_tasks_topic,
            ledger=self.ledger,
            duplicates=Duplicates(options.idempotency_window_s, consumer_config),
            committer=self.committer,
            scheduler=self.scheduler,
            lag=LagReporter(consumer_config, self.ledger, self.metrics, on_death=self._died),
            metrics=self.metrics,
            max_in_flight=options.max_in_flight,
            stop_fetching=self._stop_fetching,
            on_death=self._died,
        )
        self.cancel_reader = self._cancel_reader(options, cancel_consumer_config)
        self.on_death: OnDeath | None = None  # told when a thread or the health check dies
        self._loop: asyncio.AbstractEventLoop | None = None
        self._running = self._stopping = False
        self.processed = 0

    def _cancel_reader(
        self, options: WorkerOptions, consumer_config: dict[str, Any] | None
    ) -> CancellationReader | None:
        if not options.cancel_topic or consumer_config is None:
            return None
        reader = CancellationReader(
            consumer_config,
            options.cancel_topic,
            self.cancellations,
            window_s=options.cancel_window_s,
            on_cancel=self._cancel_arrived,
        )
        # It retries broker trouble itself; anything else that ends it stops the worker like any other thread.
        reader.on_death = self._died
        return reader

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
        await self.consumer.start()
        await self.committer.start()
        self._running = True
        if self.cancel_reader is not None:
            await self.cancel_reader.start()
        await self._health_check.start()

    async def stop(self) -> None:
        """Drain: stop fetching, give running tasks ``grace_s``, publish what finished, leave the group. Safe to call
        twice, and before ``start``."""
        if self._stopping:
            return
        self._stopping = True
        self._stop_fetching.set()
        if self._running:
            await self._drain()
        await self._health_check.stop()
        await self.runner.close()
        if self._running and not self.wedged:  # a wedged producer is abandoned: its thread may never return
            await asyncio.to_thread(self.committer.publisher.close)

    async def _drain(self) -> None:
        await self.scheduler.drain(self._options.grace_s)
        # The consumer thread closes the consumer, whose final revoke publishes everything finished.
        await self.consumer.stop()
        await self.committer.stop()  # not waited for if wedged
        if self.cancel_reader is not None:
            await self.cancel_reader.stop()

    async def _process(self, record: Record, partition: Partition) -> None:
        outcome = await self.runner.handle(record)
        if self.ledger.finished(partition, record.offset, outcome):
            self.committer.work_ready.set()
            self.processed += 1

    def _died(self, component: str, error: BaseException) -> None:
        """A thread or task the worker needs ended: fetch nothing more, and tell ``on_death`` (the service stops the
        worker, then exits non-zero or, for a wedged producer, starts a new worker). Any thread."""
        self._stop_fetching.set()
        if self.on_death is not None:
            self.on_death(component, error)

    def _on_health(self, healthy: bool) -> None:
        self.consumer.triton_ok = healthy
        self.metrics.triton_ready.set(1 if healthy else 0)

    def _cancel_arrived(self, task_id: str, tenant: str) -> None:
        """A cancellation was read (on the reader's thread): stop the task's stream if it is streaming here."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.runner.stop_stream, task_id, tenant)
