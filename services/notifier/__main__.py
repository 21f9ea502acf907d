"""Run the notifier: ``python -m aimesh.notifier`` or ``aimesh-notifier``."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import tempfile

from aimesh import runtime
from aimesh.auth import Authenticator
from aimesh.grpc_edge import GrpcServer
from aimesh.kafka import consumer_config, producer_config
from aimesh.kafka_producer import AsyncProducer
from aimesh.lifecycle import Parts, TaskPart
from aimesh.metrics import MetricsServer, NotifierMetrics, new_registry
from aimesh.objects import ObjectStore, ObjectSweeper
from aimesh.settings import NotifierSettings
from aimesh.v1 import notifier_pb2, notifier_pb2_grpc, result_pb2

from .directory import DirectoryRefresher, PartitionDirectory
from .downloads import Downloads
from .feed import Decoded, Feed, Offsets
from .forwarding import Forwarder
from .service import Cancellations, NotifierServicer, StreamLimits
from .state_db import RocksStateDb
from .store import EXPIRE_BATCH, TaskStore

log = logging.getLogger("aimesh.notifier")


async def serve(settings: NotifierSettings, stop: asyncio.Event) -> None:
    """Serve until ``stop`` is set; raise ``runtime.ComponentDied`` (health NOT_SERVING first) if the feed's
    thread or the retention sweeper dies. Health is NOT_SERVING until the task history is read. Whatever was started
    is stopped however this ends, a server that cannot bind its address included."""
    authenticator = Authenticator.from_settings(settings)  # before anything starts: bad keys stop here
    lifeline = runtime.Lifeline()
    async with Parts(lifeline) as parts:
        store = await _open_store(settings, parts)  # closed last, once everything that writes to it has stopped
        await _serve(settings, authenticator, store, parts, lifeline, stop)
        log.info("stopping: closing streams within %.1fs", settings.shutdown_grace_s)


async def _open_store(settings: NotifierSettings, parts: Parts) -> TaskStore:
    """The task store, in ``AIMESH_NOTIFIER_STATE_DIR`` or a temporary folder, its tasks past retention forgotten:
    closed (the folder removed after it) when ``parts`` stop."""
    state_dir = settings.notifier_state_dir
    if not state_dir:
        temporary = tempfile.TemporaryDirectory("-notifier")
        parts.close_on_stop("state-dir", temporary.cleanup)
        state_dir = temporary.name
    store = TaskStore(
        settings.retention_s,
        default_tenant=settings.default_tenant,
        max_updates_per_task=settings.max_updates_per_task,
        cache_tasks=settings.notifier_cache_tasks,
        db=RocksStateDb(state_dir, cache_bytes=settings.notifier_state_cache_bytes),
    )
    parts.close_on_stop("task-store", store.close)
    # Whatever the state holds past the retention window went while the notifier was stopped.
    expired = await _expire_all(store)
    log.info("task state in %s: %d tasks (%d past retention forgotten)", state_dir, len(store), expired)
    return store


async def _serve(
    settings: NotifierSettings,
    authenticator: Authenticator,
    store: TaskStore,
    parts: Parts,
    lifeline: runtime.Lifeline,
    stop: asyncio.Event,
) -> None:
    metrics = NotifierMetrics(new_registry())
    metrics.tasks_known.set_function(lambda: len(store))
    group = settings.notifier_group or f"aimesh-notifier-{socket.gethostname()}-{os.getpid()}"
    directory = PartitionDirectory(settings.advertised_address) if settings.notifier_partitioned else None
    feed = _feed(settings, group, store, directory, metrics)
    producer = _cancel_producer(settings, group)
    forwarder = Forwarder.from_settings(settings)
    object_store = ObjectStore.of(settings)
    servicer = NotifierServicer(
        store,
        ready=feed.caught_up,
        metrics=metrics,
        limits=StreamLimits.of(settings),
        cancels=Cancellations(producer, settings.cancel_topic, settings.publish_timeout_s),
        ownership=directory,
        forwarder=forwarder,
        downloads=Downloads(object_store),
    )
    # Each part is stopped, last started first, however serving ends; the ports are bound first, so a port in use
    # stops the notifier before any thread starts.
    server = await parts.start(  # NOT_SERVING until the history is read
        GrpcServer.of_service(
            settings,
            settings.notifier_address,
            notifier_pb2.DESCRIPTOR.services_by_name["NotifierService"],
            notifier_pb2_grpc.add_NotifierServiceServicer_to_server,
            servicer,
            auth=authenticator,
            grace_s=settings.shutdown_grace_s,
            serving=False,
        )
    )
    await parts.start(MetricsServer(settings.metrics_host, settings.metrics_port, metrics.registry))
    await parts.start(producer)
    parts.close_on_stop("forwarder", forwarder.close)
    await parts.start(feed)
    if directory is not None:
        await parts.start(_refresher(settings, group, directory))
    await parts.start(TaskPart("retention-sweeper", lambda: _sweep(store, settings.retention_s)))
    if object_store is not None:  # objects expire with their tasks: every replica sweeps, deletes are idempotent
        await parts.start(ObjectSweeper.of(object_store, settings))
    # Once all is up, open streams are closed first (stop is idempotent), while the feed still feeds them.
    parts.close_on_stop("streams", server.stop)
    await _serve_until_stopped(server, lifeline, feed, stop, store)


def _cancel_producer(settings: NotifierSettings, group: str) -> AsyncProducer:
    """Cancellations are published durably, as ingest publishes tasks: the answer follows the broker's ack."""
    config = producer_config(
        settings.kafka_bootstrap,
        client_id=f"{group}-cancel",
        delivery_timeout_s=settings.publish_timeout_s,
        extra=settings.kafka_client_config(),
    )
    return AsyncProducer(config, name="kafka-cancel-producer")


def _refresher(settings: NotifierSettings, group: str, directory: PartitionDirectory) -> DirectoryRefresher:
    config = consumer_config(
        settings.kafka_bootstrap, group_id=group, client_id=f"{group}-directory", extra=settings.kafka_client_config()
    )
    return DirectoryRefresher(config, topic=settings.results_topic, directory=directory)


async def _serve_until_stopped(
    server: GrpcServer, lifeline: runtime.Lifeline, feed: Feed, stop: asyncio.Event, store: TaskStore
) -> None:
    try:
        await lifeline.wait_for(feed.caught_up, stop)
        if stop.is_set():
            return
        await server.set_serving(True)
        log.info("notifier ready: %d tasks known", len(store))
        await lifeline.wait_for(stop)
    except runtime.ComponentDied:
        await server.set_serving(False)  # at once: stopping the rest takes a while
        raise


def _feed(
    settings: NotifierSettings,
    group: str,
    store: TaskStore,
    directory: PartitionDirectory | None,
    metrics: NotifierMetrics,
) -> Feed:
    def deliver(batch: list[Decoded], offsets: Offsets) -> None:
        for decoded in batch:
            if isinstance(decoded.event, result_pb2.AIResultEvent):
                if store.apply_result(decoded.event, decoded.trace):
                    metrics.repeated_results.inc()
            else:
                store.apply_task(decoded.event)
        store.flush(offsets)

    def moved(partitions: set[int]) -> None:
        if directory is not None:
            told = store.moved(partitions, directory.partitions)
            log.info("partitions %s moved away: %d watchers follow them to their new owner", sorted(partitions), told)

    return Feed(
        consumer_config(
            settings.kafka_bootstrap,
            group_id=group,
            client_id=group,
            # Partitioned replicas: the broker's range assignor gives a member the same partitions of every topic
            # with as many partitions (a task's record and its results land on one replica), and moves only the
            # partitions that must move.
            group_protocol="classic" if directory is None else "consumer",
            # Measured on the local broker, record produced until this consumer returns it: p50 7.0 ms with
            # librdkafka's default 500 ms, 4.0 ms with 100 ms (the worker's setting too).
            # Prefetch at most 8 MiB (librdkafka's default is 64): reading a retention window from scratch, the feed
            # waits for the event loop, and what librdkafka holds meanwhile is resident. Measured with 200,000
            # retained tasks: peak resident memory 334 MB with the default, 260 MB with this.
            extra={"fetch.wait.max.ms": 100, "queued.max.messages.kbytes": 8192, **settings.kafka_client_config()},
        ),
        tasks_topics=(settings.tasks_topic, settings.batch_tasks_topic),
        results_topic=settings.results_topic,
        history_s=settings.retention_s,
        deliver=deliver,
        loop=asyncio.get_running_loop(),
        saved_offsets=store.saved_offsets(),
        saved_cluster=store.cluster_id(),
        on_new_cluster=store.reset,
        directory=directory,
        on_moved=moved,
    )


async def _sweep(store: TaskStore, retention_s: float) -> None:
    interval = min(60.0, max(1.0, retention_s / 10))
    while True:
        await asyncio.sleep(interval)
        dropped = await _expire_all(store)
        if dropped:
            log.debug("forgot %d tasks past retention", dropped)


async def _expire_all(store: TaskStore) -> int:
    """Forget every task past retention, one write of EXPIRE_BATCH at a time with streams served in between."""
    dropped = 0
    while (count := store.expire()) == EXPIRE_BATCH:
        dropped += count
        await asyncio.sleep(0)
    return dropped + count


def main() -> None:
    runtime.run_service("notifier", NotifierSettings(), serve)


if __name__ == "__main__":
    main()
