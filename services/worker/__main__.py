"""Run the inference worker: ``python -m aimesh.worker`` or ``aimesh-worker``."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any

from aimesh import runtime
from aimesh.kafka import consumer_config, producer_config
from aimesh.kafka_producer import AsyncProducer
from aimesh.lifecycle import Parts, run_until
from aimesh.metrics import MetricsServer, WorkerMetrics, new_registry
from aimesh.retry import RetryPolicy
from aimesh.settings import WorkerSettings

from .acknowledged import AcknowledgedPublisher, acknowledged_config
from .options import WorkerOptions
from .transactions import Publisher, TransactionalPublisher, transactional_config
from .triton_pool import connect
from .worker import Worker

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


@dataclass(frozen=True)
class KafkaConfigs:
    """The worker's Kafka clients: the producers' settings, the group member's, the cancellations reader's."""

    producer: dict[str, Any]
    consumer: dict[str, Any]
    cancels: dict[str, Any]

    @classmethod
    def of(cls, settings: WorkerSettings, worker_id: str) -> KafkaConfigs:
        extra = settings.kafka_client_config()
        client_id = f"aimesh-worker-{worker_id}"
        producer = producer_config(settings.kafka_bootstrap, client_id=client_id, delivery_timeout_s=30.0, extra=extra)
        consumer = consumer_config(
            settings.kafka_bootstrap,
            group_id=settings.worker_group,
            client_id=client_id,
            group_protocol=settings.worker_group_protocol,
            # A fetch the broker holds open (no new records) delays the next one after a resume: keep it short.
            extra={"fetch.wait.max.ms": 100, **extra},
        )
        # The cancellations reader assigns every partition itself and commits nothing: the group id is never joined.
        cancels = consumer_config(
            settings.kafka_bootstrap,
            group_id=f"aimesh-worker-cancels-{worker_id}",
            client_id=f"{client_id}-cancels",
            extra={"fetch.wait.max.ms": 100, **extra},
        )
        return cls(producer, consumer, cancels)


async def serve(settings: WorkerSettings, stop: asyncio.Event) -> Worker:
    """Run workers until ``stop``: a new one (a new producer and consumer) whenever one's producer wedged; raise
    ``ComponentDied`` if any other part of one died. Returns the last worker."""
    worker_id = settings.worker_id or f"{socket.gethostname()}-{os.getpid()}"
    configs = KafkaConfigs.of(settings, worker_id)
    metrics = WorkerMetrics(new_registry())
    async with Parts() as parts:
        progress = await parts.start(AsyncProducer(configs.producer, name="kafka-progress-producer"))
        triton = connect(settings.triton_url, metrics=metrics)
        parts.close_on_stop("triton-client", triton.close)
        await parts.start(MetricsServer(settings.metrics_host, settings.metrics_port, metrics.registry))
        processed = 0
        while True:
            worker = Worker(
                WorkerOptions.of(settings, worker_id),
                consumer_config=configs.consumer,
                publisher=new_publisher(settings, configs.producer, worker_id),
                progress=progress,
                triton=triton,
                triton_retry=RetryPolicy(
                    initial_s=settings.retry_initial_s, max_s=settings.retry_max_s, budget_s=settings.retry_budget_s
                ),
                metrics=metrics,
                cancel_consumer_config=configs.cancels,
            )
            try:
                await run_until(stop, worker)
                break
            except runtime.ComponentDied as e:
                if not worker.wedged:
                    raise
                processed += worker.processed
                if stop.is_set():
                    break
                # Start over with a new producer (same transactional.id: it fences the wedged one) and consumer.
                log.error("%s; starting over with a new producer and consumer", e.__cause__)
        log.info("worker %s stopped after %d tasks", worker_id, processed + worker.processed)
        return worker


def main() -> None:
    runtime.run_service("worker", WorkerSettings(), serve)


if __name__ == "__main__":
    main()
