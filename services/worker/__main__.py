"""Run the inference worker: ``python -m aimesh.worker`` or ``aimesh-worker``."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import Any

from aimesh import runtime
from aimesh.kafka import AsyncProducer, consumer_config, producer_config
from aimesh.metrics import MetricsServer, WorkerMetrics, new_registry
from aimesh.retry import RetryPolicy
from aimesh.settings import WorkerSettings

from .acknowledged import AcknowledgedPublisher, acknowledged_config
from .transactions import Publisher, TransactionalPublisher, transactional_config
from .triton_pool import connect
from .worker import ProducerWedged, Worker

log = logging.getLogger("aimesh.worker")


def new_publisher(settings: WorkerSettings, producer_cfg: dict[str, Any], worker_id: str) -> Publisher:
    """The publisher of the chosen processing guarantee."""
    if settings.processing_guarantee == "at_least_once":
        config = acknowledged_config(producer_cfg, max_record_bytes=settings.max_record_bytes)
        return AcknowledgedPublisher(config, commit_interval_s=settings.commit_interval_s)
    config = transactional_config(
        producer_cfg,
        transactional_id=settings.transactional_id or f"aimesh-worker-{worker_id}",
        transaction_timeout_s=settings.transaction_timeout_s,
        max_record_bytes=settings.max_record_bytes,
    )
    return TransactionalPublisher(config)


async def serve(settings: WorkerSettings, stop: asyncio.Event) -> Worker:
    worker_id = settings.worker_id or f"{socket.gethostname()}-{os.getpid()}"
    kafka_extra = settings.kafka_client_config()
    producer_cfg = producer_config(
        settings.kafka_bootstrap, client_id=f"aimesh-worker-{worker_id}", delivery_timeout_s=30.0, extra=kafka_extra
    )
    consumer_cfg = consumer_config(
        settings.kafka_bootstrap,
        group_id=settings.worker_group,
        client_id=f"aimesh-worker-{worker_id}",
        group_protocol=settings.worker_group_protocol,
        # A fetch the broker holds open (no new records) delays the next one after a resume: keep it short.
        extra={"fetch.wait.max.ms": 100, **kafka_extra},
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
    processed = 0
    triton_client = connect(settings.triton_url, metrics=metrics)
    async with AsyncProducer(producer_cfg) as progress, triton_client as triton, metrics_server:
        while True:
            worker = Worker(
                consumer_config=consumer_cfg,
                publisher=new_publisher(settings, producer_cfg, worker_id),
                progress=progress,
                triton=triton,
                tasks_topic=settings.tasks_topic,
                results_topic=settings.results_topic,
                dead_letter_topic=settings.dead_letter_topic,
                worker_id=worker_id,
                max_in_flight=settings.max_in_flight,
                max_batch_size=settings.max_batch_size,
                max_request_bytes=settings.max_request_bytes,
                inference_timeout_s=settings.inference_timeout_s,
                triton_retry=RetryPolicy(
                    initial_s=settings.retry_initial_s, max_s=settings.retry_max_s, budget_s=settings.retry_budget_s
                ),
                health_interval_s=settings.triton_health_interval_s,
                grace_s=settings.shutdown_grace_s,
                metrics=metrics,
                batch_tasks_topic=settings.batch_tasks_topic,
                cancel_topic=settings.cancel_topic,
                cancel_consumer_config=cancel_cfg,
                cancel_window_s=settings.cancel_window_s,
                idempotency_window_s=settings.idempotency_window_s,
                max_record_bytes=settings.max_record_bytes,
            )
            try:
                await worker.run(stop)
                break
            except ProducerWedged as e:
                processed += worker.processed
                if stop.is_set():
                    break
                # Start over with a new producer (same transactional.id: it fences the wedged one) and consumer.
                log.error("%s; starting over with a new producer and consumer", e)
        log.info("worker %s stopped after %d tasks", worker_id, processed + worker.processed)
        return worker


def main() -> None:
    runtime.run_service("worker", WorkerSettings(), serve)


if __name__ == "__main__":
    main()
