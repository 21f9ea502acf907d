"""Run the ingest service: ``python -m aimesh.ingest`` or ``aimesh-ingest``."""

from __future__ import annotations

import asyncio
import logging
import os
import socket

from aimesh import runtime
from aimesh.auth import Authenticator
from aimesh.grpc_edge import GrpcServer
from aimesh.kafka import producer_config
from aimesh.kafka_producer import AsyncProducer
from aimesh.lifecycle import Parts
from aimesh.metrics import IngestMetrics, MetricsServer, new_registry
from aimesh.objects import ObjectStore
from aimesh.settings import IngestSettings
from aimesh.v1 import ingest_pb2, ingest_pb2_grpc

from .admission import Admission, AdmissionMonitor, KafkaLagSource
from .claim_check import ClaimCheck
from .idempotency import IdempotencyKeys
from .parameters import ParameterCatalog
from .quotas import InFlightTasks, RateLimit, RateQuotas, ResultsReader
from .record_finder import KafkaRecordFinder
from .service import IngestServicer
from .signatures import SignatureReader, Signatures, fetch_from_triton
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
    """Serve until ``stop`` is set, then let calls in flight finish within ``AIMESH_SHUTDOWN_GRACE_S``; if a reader
    thread dies first, turn health NOT_SERVING, stop, and raise ``runtime.ComponentDied``."""
    authenticator = Authenticator.from_settings(settings)  # before anything starts: bad keys stop here
    metrics = IngestMetrics(new_registry(), models=settings.model_names)
    config = ingest_producer_config(settings)
    lifeline = runtime.Lifeline()
    async with Parts(lifeline) as parts:
        producer = await parts.start(AsyncProducer(config, name="kafka-task-producer"))
        finder = KafkaRecordFinder(_client_config(settings, f"{config['client.id']}-finder"))
        parts.close_on_stop("record-finder", finder.close)
        await parts.start(MetricsServer(settings.metrics_host, settings.metrics_port, metrics.registry))
        admission = await _admission(settings, metrics, parts, f"{config['client.id']}-admission")
        in_flight = await _in_flight(settings, parts, f"{config['client.id']}-results")
        signatures = await _signatures(settings, parts)
        servicer = IngestServicer(
            producer,
            tasks_topic=settings.tasks_topic,
            batch_tasks_topic=settings.batch_tasks_topic,
            limits=_limits(settings, signatures),
            max_record_bytes=settings.max_record_bytes,
            record_finder=finder,
            max_batch_tasks=settings.max_batch_tasks,
            publish_timeout_s=settings.publish_timeout_s,
            idempotency=IdempotencyKeys(settings.idempotency_ttl_s),
            metrics=metrics,
            admission=admission,
            rate_quotas=RateQuotas(
                RateLimit.of(settings.tenant_rate_per_s, settings.tenant_rate_burst),
                {tenant: RateLimit.of(rate, burst) for tenant, (rate, burst) in settings.rate_overrides.items()},
            ),
            in_flight=in_flight,
            claim_check=ClaimCheck(
                ObjectStore.of(settings),
                inline_limit_bytes=settings.inline_limit_bytes,
                max_object_bytes=settings.max_object_bytes,
            ),
        )
        server = await parts.start(
            GrpcServer.of_service(
                settings,
                settings.ingest_address,
                ingest_pb2.DESCRIPTOR.services_by_name["IngestService"],
                ingest_pb2_grpc.add_IngestServiceServicer_to_server,
                servicer,
                auth=authenticator,
                grace_s=settings.shutdown_grace_s,
            )
        )
        try:
            await lifeline.wait_for(stop)
        except runtime.ComponentDied:
            await server.set_serving(False)  # at once: stopping the rest takes a while
            raise
        log.info("stopping: draining in-flight calls for up to %.1fs", settings.shutdown_grace_s)


def _client_config(settings: IngestSettings, client_id: str) -> dict[str, object]:
    return {"bootstrap.servers": settings.kafka_bootstrap, **settings.kafka_client_config(), "client.id": client_id}


def _limits(settings: IngestSettings, signatures: Signatures) -> Limits:
    catalog = (
        ParameterCatalog.from_file(settings.model_parameters_file)
        if settings.model_parameters_file
        else ParameterCatalog.built_in()
    )
    return Limits(
        models=settings.model_names,
        max_text_bytes=settings.max_text_bytes,
        max_deadline_s=settings.max_deadline_s,
        parameters=catalog,
        signatures=signatures,
    )


async def _admission(settings: IngestSettings, metrics: IngestMetrics, parts: Parts, client_id: str) -> Admission:
    """Admission control, and (when it is on) the monitor of the workers' backlog it decides by, started."""
    # Estimates older than a few measurements are not used: admission fails open while the broker is unreachable.
    admission = Admission(settings.admission_max_wait_s, stale_after_s=max(3 * settings.admission_interval_s, 3.0))
    if admission.enabled:
        source = KafkaLagSource(_client_config(settings, client_id), settings.worker_group)
        monitor = AdmissionMonitor(
            source,
            admission,
            [settings.tasks_topic, settings.batch_tasks_topic],
            interval_s=settings.admission_interval_s,
            stalled_backlog=settings.admission_stalled_backlog,
            metrics=metrics,
            window_s=max(10.0, 5 * settings.admission_interval_s),
        )
        await parts.start(monitor)  # a reader that died must not leave ingest looking healthy: see Parts
    return admission


async def _signatures(settings: IngestSettings, parts: Parts) -> Signatures:
    """The models' signatures, and (when Triton's model metadata is read) the reader that keeps them, started."""
    signatures = Signatures()
    if settings.model_metadata_url:
        fetch = fetch_from_triton(settings.model_metadata_url)
        await parts.start(
            SignatureReader(signatures, settings.model_names, fetch, interval_s=settings.model_metadata_interval_s)
        )
    return signatures


async def _in_flight(settings: IngestSettings, parts: Parts, client_id: str) -> InFlightTasks:
    """The per-tenant count of unfinished tasks, and (when a limit is set) the results reader that keeps it."""
    in_flight = InFlightTasks(settings.tenant_max_concurrent, settings.max_concurrent_overrides)
    if in_flight.enabled:
        await parts.start(ResultsReader(_client_config(settings, client_id), settings.results_topic, in_flight))
    return in_flight


def main() -> None:
    runtime.run_service("ingest", IngestSettings(), serve)


if __name__ == "__main__":
    main()
