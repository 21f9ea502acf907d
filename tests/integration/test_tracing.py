"""One trace per task across every process and Kafka hop, exported over OTLP to a receiver the test owns."""

from __future__ import annotations

import grpc
import pytest
from opentelemetry.instrumentation.grpc import aio_client_interceptors
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from aimesh.devstack.otlp import ExportedSpan, OtlpReceiver
from aimesh.devstack.stack import Stack
from aimesh.v1 import ingest_pb2, ingest_pb2_grpc, notifier_pb2, notifier_pb2_grpc, result_pb2, task_pb2

pytestmark = pytest.mark.integration

Kind = trace_pb2.Span.SpanKind
ERROR = trace_pb2.Status.StatusCode.STATUS_CODE_ERROR

SUBMIT = "/aimesh.v1.IngestService/SubmitTask"
TASK_PATH = {
    SUBMIT,
    "send aimesh.tasks",
    "process aimesh.tasks",
    "send aimesh.results",
    "process aimesh.results",
    "deliver update",
}


async def run_traced_task(mesh: Stack, model: str) -> tuple[str, str, list[int]]:
    """Submit through a traced client and watch to the end: (trace id, client span id, statuses seen)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    interceptors = aio_client_interceptors(tracer_provider=provider)
    async with grpc.aio.insecure_channel(mesh.ingest_address, interceptors=interceptors) as ingest_channel:
        reply = await ingest_pb2_grpc.IngestServiceStub(ingest_channel).SubmitTask(
            ingest_pb2.SubmitTaskRequest(model_name=model, input=task_pb2.TaskInput(text="trace me")), timeout=30
        )
    async with grpc.aio.insecure_channel(mesh.notifier_address) as notifier_channel:
        stream = notifier_pb2_grpc.NotifierServiceStub(notifier_channel).WatchTask(
            notifier_pb2.WatchTaskRequest(task_id=reply.task_id), timeout=60
        )
        statuses = [update.state.status async for update in stream]
    (client_span,) = [s for s in exporter.get_finished_spans() if s.name == SUBMIT]
    return f"{client_span.context.trace_id:032x}", f"{client_span.context.span_id:016x}", statuses


def delivered_terminal(spans: list[ExportedSpan]) -> bool:
    return any(
        s.name == "deliver update" and s.attributes.get("aimesh.task.status") == "TASK_STATUS_SUCCEEDED" for s in spans
    )


def only(spans: list[ExportedSpan], name: str, service: str) -> ExportedSpan:
    found = [s for s in spans if s.name == name and s.service == service]
    assert found, f"no {name!r} span from {service}: {[(s.service, s.name) for s in spans]}"
    return found[0]


async def test_a_task_is_one_trace_across_ingest_kafka_worker_triton_and_notifier(
    mesh: Stack, otlp_receiver: OtlpReceiver
) -> None:
    trace_id, client_span_id, statuses = await run_traced_task(mesh, "sleep")
    assert statuses[-1] == result_pb2.TASK_STATUS_SUCCEEDED
    # Each process exports in batches: wait for the terminal delivery too, not just some "deliver update".
    spans = otlp_receiver.wait_for(trace_id, TASK_PATH | {"infer sleep"}, until=delivered_terminal)
    assert {s.service for s in spans} == {"aimesh-ingest", "aimesh-worker", "aimesh-notifier"}

    server = only(spans, SUBMIT, "aimesh-ingest")
    assert server.span.kind == Kind.SPAN_KIND_SERVER and server.parent_id == client_span_id

    send_task = only(spans, "send aimesh.tasks", "aimesh-ingest")
    assert send_task.span.kind == Kind.SPAN_KIND_PRODUCER and send_task.parent_id == server.span_id
    task_id = send_task.attributes["aimesh.task_id"]
    assert send_task.attributes["messaging.kafka.message.key"] == task_id
    assert send_task.attributes["messaging.system"] == "kafka"

    process_task = only(spans, "process aimesh.tasks", "aimesh-worker")
    assert process_task.span.kind == Kind.SPAN_KIND_CONSUMER and process_task.parent_id == send_task.span_id
    assert process_task.attributes["messaging.destination.name"] == "aimesh.tasks"
    assert process_task.attributes["messaging.consumer.group.name"] == "aimesh-workers"
    assert {"messaging.destination.partition.id", "messaging.kafka.offset"} <= process_task.attributes.keys()
    # The gap between the producer's end and the consumer's start is the time the task waited in Kafka.
    assert process_task.span.start_time_unix_nano >= send_task.span.start_time_unix_nano

    infer = only(spans, "infer sleep", "aimesh-worker")
    assert infer.span.kind == Kind.SPAN_KIND_CLIENT and infer.parent_id == process_task.span_id
    assert infer.attributes["aimesh.model.name"] == "sleep"
    assert infer.attributes["aimesh.inference.batch_items"] == 1

    sends = [s for s in spans if s.name == "send aimesh.results"]
    assert len(sends) == 2 and all(s.parent_id == process_task.span_id for s in sends)  # RUNNING, then the result
    processed = [s for s in spans if s.name == "process aimesh.results"]
    assert {p.parent_id for p in processed} <= {s.span_id for s in sends}
    assert all(p.span.kind == Kind.SPAN_KIND_CONSUMER for p in processed)

    deliveries = [s for s in spans if s.name == "deliver update"]
    terminal = [d for d in deliveries if d.attributes["aimesh.task.status"] == "TASK_STATUS_SUCCEEDED"]
    assert len(terminal) == 1 and terminal[0].parent_id in {p.span_id for p in processed}
    # Linked to the subscriber's WatchTask call, which is a trace of its own.
    assert len(terminal[0].span.links) == 1


async def test_a_failed_task_trace_says_why(mesh: Stack, otlp_receiver: OtlpReceiver) -> None:
    trace_id, _, statuses = await run_traced_task(mesh, "ghost")
    assert statuses[-1] == result_pb2.TASK_STATUS_FAILED
    spans = otlp_receiver.wait_for(trace_id, TASK_PATH | {"infer ghost"})
    process_task = only(spans, "process aimesh.tasks", "aimesh-worker")
    assert process_task.span.status.code == ERROR
    failure = [e for e in process_task.span.events if e.name == "task.failed"]
    assert failure, [e.name for e in process_task.span.events]
    reasons = {a.key: a.value.string_value for a in failure[0].attributes}
    assert reasons["aimesh.error.code"] == "ERROR_CODE_MODEL_NOT_FOUND"
    infer = only(spans, "infer ghost", "aimesh-worker")
    assert infer.span.status.code == ERROR
    assert any(e.name == "exception" for e in infer.span.events)
