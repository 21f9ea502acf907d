"""Run the notifier: ``python -m aimesh.notifier`` or ``aimesh-notifier``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable

from aimesh import runtime, tracing
from aimesh.auth import Authenticator
from aimesh.grpc_edge import GrpcServer, ServerTls
from aimesh.kafka import AsyncProducer, consumer_config, producer_config
from aimesh.metrics import MetricsServer, NotifierMetrics, new_registry
from aimesh.settings import NotifierSettings
from aimesh.v1 import notifier_pb2, notifier_pb2_grpc, result_pb2

from .feed import Decoded, Feed
from .service import Cancellations, NotifierServicer, StreamLimits
from .store import TaskStore

log = logging.getLogger("aimesh.notifier")


async def serve(settings: NotifierSettings, stop: asyncio.Event) -> None:
    authenticator = Authenticator.from_settings(settings)  # before anything starts: bad keys stop here
    store = TaskStore(
        settings.retention_s,
        default_tenant=settings.default_tenant,
        max_updates_per_task=settings.max_updates_per_task,
    )
    metrics = NotifierMetrics(new_registry())
    metrics.tasks_known.set_function(lambda: len(store))
    metrics_server = MetricsServer(settings.metrics_host, settings.metrics_port, metrics.registry)

    def deliver(batch: list[Decoded]) -> None:
        for decoded in batch:
            if isinstance(decoded.event, result_pb2.AIResultEvent):
                store.apply_result(decoded.event, decoded.trace)
            else:
                store.apply_task(decoded.event)

    group = settings.notifier_group or f"aimesh-notifier-{socket.gethostname()}-{os.getpid()}"
    feed = Feed(
        consumer_config(
            settings.kafka_bootstrap,
            group_id=group,
            client_id=group,
            # Measured on the local broker, record produced until this consumer returns it: p50 7.0 ms with
            # librdkafka's default 500 ms, 4.0 ms with 100 ms (the worker's setting too).
            extra={"fetch.wait.max.ms": 100, **settings.kafka_client_config()},
        ),
        tasks_topics=(settings.tasks_topic, settings.batch_tasks_topic),
        results_topic=settings.results_topic,
        history_s=settings.retention_s,
        deliver=deliver,
        loop=asyncio.get_running_loop(),
    )
    server = GrpcServer(
        settings.notifier_address,
        [notifier_pb2.DESCRIPTOR.services_by_name["NotifierService"].full_name],
        max_message_bytes=settings.max_message_bytes,
        interceptors=tracing.server_interceptors(),
        auth=authenticator,
        tls=ServerTls.from_settings(settings),
    )
    limits = StreamLimits(
        max_per_connection=settings.max_subscriptions_per_connection,
        max_per_tenant=settings.max_subscriptions_per_tenant,
        idle_timeout_s=settings.stream_idle_timeout_s,
    )
    # Cancellations are published durably, as ingest publishes tasks: the answer follows the broker's ack.
    producer = AsyncProducer(
        producer_config(
            settings.kafka_bootstrap,
            client_id=f"{group}-cancel",
            delivery_timeout_s=settings.publish_timeout_s,
            extra=settings.kafka_client_config(),
        )
    )
    cancels = Cancellations(producer, settings.cancel_topic, settings.publish_timeout_s)
    servicer = NotifierServicer(store, ready=feed.caught_up, metrics=metrics, limits=limits, cancels=cancels)
    server.add(notifier_pb2_grpc.add_NotifierServiceServicer_to_server, servicer)
    producer.start()
    feed.start()
    await server.start()
    # NOT_SERVING until the history is read: GetTask would otherwise deny tasks it has not reached yet.
    await server.set_serving(False)
    sweeper = asyncio.create_task(_sweep(store, settings.retention_s))
    metrics_server.start()
    try:
        await _wait_first(feed.caught_up.wait(), stop.wait())
        if feed.failed is not None:
            raise RuntimeError("the notifier's Kafka feed failed") from feed.failed
        if not stop.is_set():
            await server.set_serving(True)
            log.info("notifier ready: %d tasks known", len(store))
            await stop.wait()
    finally:
        log.info("stopping: closing streams within %.1fs", settings.shutdown_grace_s)
        sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sweeper
        await server.stop(settings.shutdown_grace_s)
        await producer.stop()
        await feed.stop()
        await metrics_server.stop()


async def _wait_first(*aws: Awaitable[object]) -> None:
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


async def _sweep(store: TaskStore, retention_s: float) -> None:
    interval = min(60.0, max(1.0, retention_s / 10))
    while True:
        await asyncio.sleep(interval)
        dropped = store.expire()
        if dropped:
            log.debug("forgot %d tasks past retention", dropped)


def main() -> None:
    runtime.run_service("notifier", NotifierSettings(), serve)


if __name__ == "__main__":
    main()
