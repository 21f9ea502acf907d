"""Run the ingest service: ``python -m aimesh.ingest`` or ``aimesh-ingest``."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from contextlib import AsyncExitStack

from aimesh import runtime, tracing
from aimesh.auth import Authenticator
from aimesh.background import BackgroundThread
from aimesh.grpc_edge import ConnectionPolicy, GrpcServer, ServerTls
from aimesh.kafka import AsyncProducer, producer_config
from aimesh.metrics import IngestMetrics, MetricsServer, new_registry
from aimesh.settings import IngestSettings
from aimesh.v1 import ingest_pb2, ingest_pb2_grpc

from .admission import Admission, AdmissionMonitor, KafkaLagSource
from .idempotency import IdempotencyKeys
from .parameters import ParameterCatalog
from .quotas import InFlightTasks, RateLimit, RateQuotas, ResultsReader
from .record_finder import KafkaRecordFinder
from .service import IngestServicer
from .validation import Limits

log = logging.getLogger("aimesh.ingest")

#: How long librdkafka keeps trying to deliver a task record. Far longer than AIMESH_PUBLISH_TIMEOUT_S, after which
#: the client is answered UNAVAILABLE with the record in doubt: a record that times out while its request is in flight
#: makes the idempotent producer bump its epoch and send the other in-flight records again, which the broker then
#: cannot tell from new ones (librdkafka#4953). A broker SIGKILLed in a three-broker cluster held acks=all writes for
#: its fencing time and so duplicated task records (tests/fault/test_broker_cluster.py). A minute outlasts a
#: broker's fencing and a leader election. Never more than half AIMESH_IDEMPOTENCY_TTL_S: a key in doubt must outlive
#: its record's last chance to land, or a retry with it would publish a second task.
MESSAGE_TIMEOUT_S = 60.0


def ingest_producer_config(settings: IngestSettings) -> dict[str, object]:
    return producer_config(
        settings.kafka_bootstrap,
        client_id=f"aimesh-ingest-{socket.gethostname()}-{os.getpid()}",
        delivery_timeout_s=settings.publish_timeout_s,
        message_timeout_s=max(settings.publish_timeout_s, min(MESSAGE_TIMEOUT_S, settings.idempotency_ttl_s / 2)),
        # The producer's own limit is the one ingest checks records against (AIMESH_KAFKA_CONFIG may still set it).
        extra={"message.max.bytes": settings.max_record_bytes, **settings.kafka_client_config()},
    )


async def serve(settings: IngestSettings, stop: asyncio.Event) -> None:
    authenticator = Authenticator.from_settings(settings)  # before anything starts: bad keys stop here
    catalog = (
        ParameterCatalog.from_file(settings.model_parameters_file)
        if settings.model_parameters_file
        else ParameterCatalog.built_in()
    )
    config = ingest_producer_config(settings)
    metrics = IngestMetrics(new_registry(), models=settings.model_names)
    metrics_server = MetricsServer(settings.metrics_host, settings.metrics_port, metrics.registry)
    kafka = {"bootstrap.servers": settings.kafka_bootstrap, **settings.kafka_client_config()}
    # Estimates older than a few measurements are not used: admission fails open while the broker is unreachable.
    admission = Admission(settings.admission_max_wait_s, stale_after_s=max(3 * settings.admission_interval_s, 3.0))
    in_flight = InFlightTasks(settings.tenant_max_concurrent, settings.max_concurrent_overrides)
    rate_quotas = RateQuotas(
        RateLimit.of(settings.tenant_rate_per_s, settings.tenant_rate_burst),
        {tenant: RateLimit.of(rate, burst) for tenant, (rate, burst) in settings.rate_overrides.items()},
    )
    lifeline = runtime.Lifeline()
    readers: list[BackgroundThread] = []
    async with AsyncExitStack() as running:
        producer = await running.enter_async_context(AsyncProducer(config))
        finder = KafkaRecordFinder({**kafka, "client.id": f"{config['client.id']}-finder"})
        running.callback(finder.close)
        await running.enter_async_context(metrics_server)
        if admission.enabled:
            source = KafkaLagSource({**kafka, "client.id": f"{config['client.id']}-admission"}, settings.worker_group)
            topics = [settings.tasks_topic, settings.batch_tasks_topic]
            monitor = AdmissionMonitor(
                source,
                admission,
                topics,
                interval_s=settings.admission_interval_s,
                stalled_backlog=settings.admission_stalled_backlog,
                metrics=metrics,
                window_s=max(10.0, 5 * settings.admission_interval_s),
            )
            readers.append(monitor)
        if in_flight.enabled:
            reader = ResultsReader(
                {**kafka, "client.id": f"{config['client.id']}-results"}, settings.results_topic, in_flight
            )
            readers.append(reader)
        for thread in readers:
            thread.on_death = lifeline.report  # a reader that died must not leave ingest looking healthy
            await running.enter_async_context(thread)
        servicer = IngestServicer(
            producer,
            tasks_topic=settings.tasks_topic,
            batch_tasks_topic=settings.batch_tasks_topic,
            limits=Limits(
                models=settings.model_names,
                max_text_bytes=settings.max_text_bytes,
                max_deadline_s=settings.max_deadline_s,
                parameters=catalog,
            ),
            max_record_bytes=settings.max_record_bytes,
            record_finder=finder,
            max_batch_tasks=settings.max_batch_tasks,
            publish_timeout_s=settings.publish_timeout_s,
            idempotency=IdempotencyKeys(settings.idempotency_ttl_s),
            metrics=metrics,
            admission=admission,
            rate_quotas=rate_quotas,
            in_flight=in_flight,
        )
        server = GrpcServer(
            settings.ingest_address,
            [ingest_pb2.DESCRIPTOR.services_by_name["IngestService"].full_name],
            max_message_bytes=settings.max_message_bytes,
            interceptors=tracing.server_interceptors(),
            auth=authenticator,
            tls=ServerTls.from_settings(settings),
            connections=ConnectionPolicy.from_settings(settings),
        )
        server.add(ingest_pb2_grpc.add_IngestServiceServicer_to_server, servicer)
        await server.start()
        try:
            await lifeline.wait_for(stop)
        except runtime.ComponentDied:
            await server.set_serving(False)
            await server.stop(settings.shutdown_grace_s)
            raise
        log.info("stopping: draining in-flight calls for up to %.1fs", settings.shutdown_grace_s)
        await server.stop(settings.shutdown_grace_s)


def main() -> None:
    runtime.run_service("ingest", IngestSettings(), serve)


if __name__ == "__main__":
    main()
