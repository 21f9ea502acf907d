"""Run the inference worker: ``python -m aimesh.worker`` or ``aimesh-worker``."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from collections.abc import Coroutine
from typing import Any

from aimesh import runtime
from aimesh.kafka import AsyncProducer, consumer_config, producer_config
from aimesh.metrics import MetricsServer, WorkerMetrics, new_registry
from aimesh.retry import RetryPolicy
from aimesh.settings import WorkerSettings

from .cancellation import CancellationReader, Cancellations
from .inference import TritonInference
from .slots import PriorityClass, Slots
from .transactions import TransactionalPublisher, transactional_config
from .worker import ProducerWedged, Worker

log = logging.getLogger("aimesh.worker")


async def serve(settings: WorkerSettings, stop: asyncio.Event) -> list[Worker]:
    """One Worker per priority class, sharing the process's task slots, Triton client, progress producer and
    cancellations: the tasks topic in ``worker_group``, the batch tasks topic in ``batch_worker_group``."""
    worker_id = settings.worker_id or f"{socket.gethostname()}-{os.getpid()}"
    kafka_extra = settings.kafka_client_config()
    producer_cfg = producer_config(
        settings.kafka_bootstrap, client_id=f"aimesh-worker-{worker_id}", delivery_timeout_s=30.0, extra=kafka_extra
    )
    # The cancellations reader assigns every partition itself and commits nothing: the group id is never joined.
    cancel_cfg = consumer_config(
        settings.kafka_bootstrap,
        group_id=f"aimesh-worker-cancels-{worker_id}",
        client_id=f"aimesh-worker-{worker_id}-cancels",
        extra={"fetch.wait.max.ms": 100, **kafka_extra},
    )
    metrics = WorkerMetrics(new_registry())
    metrics_server = MetricsServer(settings.metrics_host, settings.metrics_port, metrics.registry)
    slots = Slots(settings.max_in_flight)
    cancellations = Cancellations(settings.cancel_window_s)
    workers: dict[PriorityClass, Worker] = {}

    def cancel_arrived(task_id: str, tenant: str) -> None:  # on the reader's thread
        for worker in list(workers.values()):
            worker.cancel_arrived(task_id, tenant)

    reader = CancellationReader(
        cancel_cfg, settings.cancel_topic, cancellations, window_s=settings.cancel_window_s, on_cancel=cancel_arrived
    )
    stop_reader = threading.Event()
    reader_thread = threading.Thread(target=reader.run, args=(stop_reader,), name="kafka-cancels", daemon=True)

    async def keep_running(priority_class: PriorityClass, topic: str, group: str, suffix: str) -> int:
        """Run this class's Worker until ``stop``; start over with a new one after a wedged producer. Returns how
        many tasks it processed."""
        consumer_cfg = consumer_config(
            settings.kafka_bootstrap,
            group_id=group,
            client_id=f"aimesh-worker-{worker_id}{suffix}",
            # A fetch the broker holds open (no new records) delays the next one after a resume: keep it short.
            extra={"fetch.wait.max.ms": 100, **kafka_extra},
        )
        txn_config = transactional_config(
            producer_cfg,
            transactional_id=(settings.transactional_id or f"aimesh-worker-{worker_id}") + suffix,
            transaction_timeout_s=settings.transaction_timeout_s,
        )
        processed = 0
        while True:
            worker = workers[priority_class] = Worker(
                consumer_config=consumer_cfg,
                publisher=TransactionalPublisher(txn_config),
                progress=progress,
                triton=triton,
                tasks_topic=topic,
                results_topic=settings.results_topic,
                dead_letter_topic=settings.dead_letter_topic,
                worker_id=worker_id,
                max_in_flight=settings.max_in_flight,
                max_batch_size=settings.max_batch_size,
                inference_timeout_s=settings.inference_timeout_s,
                triton_retry=RetryPolicy(
                    initial_s=settings.retry_initial_s, max_s=settings.retry_max_s, budget_s=settings.retry_budget_s
                ),
                health_interval_s=settings.triton_health_interval_s,
                grace_s=settings.shutdown_grace_s,
                metrics=metrics,
                priority_class=priority_class,
                slots=slots,
                cancellations=cancellations,
            )
            try:
                await worker.run(stop)
                return processed + worker.processed
            except ProducerWedged as e:
                processed += worker.processed
                if stop.is_set():
                    return processed
                # Start over with a new producer (same transactional.id: it fences the wedged one) and consumer.
                log.error("%s (%s tasks); starting over with a new producer and consumer", e, priority_class)

    async def both_or_neither(running: Coroutine[Any, Any, int]) -> int:
        """A Worker that crashes stops the other one too (it drains): the process exits, and is restarted whole."""
        try:
            return await running
        except BaseException:
            stop.set()
            raise

    async with AsyncProducer(producer_cfg) as progress, TritonInference(settings.triton_url) as triton, metrics_server:
        reader_thread.start()
        try:
            counts = await asyncio.gather(
                both_or_neither(keep_running("interactive", settings.tasks_topic, settings.worker_group, "")),
                both_or_neither(
                    keep_running("batch", settings.batch_tasks_topic, settings.batch_worker_group, "-batch")
                ),
            )
        finally:
            stop_reader.set()
            await asyncio.to_thread(reader_thread.join, 5.0)
        log.info("worker %s stopped after %d interactive and %d batch tasks", worker_id, *counts)
        return list(workers.values())


def main() -> None:
    runtime.run_service("worker", WorkerSettings(), serve)


if __name__ == "__main__":
    main()
