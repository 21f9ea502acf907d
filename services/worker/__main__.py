"""Run the inference worker: ``python -m aimesh.worker`` or ``aimesh-worker``."""

from __future__ import annotations

import asyncio
import logging
import os
import socket

from aimesh import runtime
from aimesh.kafka import AsyncProducer, consumer_config, producer_config
from aimesh.metrics import MetricsServer, WorkerMetrics, new_registry
from aimesh.retry import RetryPolicy
from aimesh.settings import WorkerSettings

from .inference import TritonInference
from .worker import Worker

log = logging.getLogger("aimesh.worker")


async def serve(settings: WorkerSettings, stop: asyncio.Event) -> Worker:
    worker_id = settings.worker_id or f"{socket.gethostname()}-{os.getpid()}"
    producer_cfg = producer_config(
        settings.kafka_bootstrap, client_id=f"aimesh-worker-{worker_id}", delivery_timeout_s=30.0
    )
    consumer_cfg = consumer_config(
        settings.kafka_bootstrap, group_id=settings.worker_group, client_id=f"aimesh-worker-{worker_id}"
    )
    metrics = WorkerMetrics(new_registry())
    metrics_server = MetricsServer(settings.metrics_host, settings.metrics_port, metrics.registry)
    async with AsyncProducer(producer_cfg) as producer, TritonInference(settings.triton_url) as triton, metrics_server:
        worker = Worker(
            consumer_config=consumer_cfg,
            producer=producer,
            triton=triton,
            tasks_topic=settings.tasks_topic,
            results_topic=settings.results_topic,
            worker_id=worker_id,
            max_in_flight=settings.max_in_flight,
            inference_timeout_s=settings.inference_timeout_s,
            triton_retry=RetryPolicy(
                initial_s=settings.retry_initial_s, max_s=settings.retry_max_s, budget_s=settings.retry_budget_s
            ),
            grace_s=settings.shutdown_grace_s,
            metrics=metrics,
        )
        await worker.run(stop)
        log.info("worker %s stopped after %d tasks", worker_id, worker.processed)
        return worker


def main() -> None:
    runtime.run_service("worker", WorkerSettings(), serve)


if __name__ == "__main__":
    main()
