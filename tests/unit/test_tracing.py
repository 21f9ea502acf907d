"""Trace context crosses a Kafka hop in record headers: the consumer's span is a child of the producer's."""

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from test_triton_pool import FakeServer, pool_of

from aimesh import events, tracing
from aimesh.kafka import Headers


@pytest.fixture(scope="module")
def exporter() -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use_provider(provider)
    return exporter


def test_process_span_continues_the_trace_of_the_send_span(exporter: InMemorySpanExporter) -> None:
    headers: Headers = events.task_headers()
    with tracing.send_span("aimesh.tasks", "task-1", headers):
        pass
    assert any(key == "traceparent" for key, _ in headers)
    with tracing.process_span("aimesh.tasks", key="task-1", partition=3, offset=42, group="g", headers=headers):
        pass
    send, process = exporter.get_finished_spans()
    assert (send.name, send.kind) == ("send aimesh.tasks", SpanKind.PRODUCER)
    assert (process.name, process.kind) == ("process aimesh.tasks", SpanKind.CONSUMER)
    assert process.context.trace_id == send.context.trace_id
    assert process.parent is not None and process.parent.span_id == send.context.span_id
    assert process.attributes["messaging.destination.partition.id"] == "3"
    assert process.attributes["messaging.kafka.offset"] == 42
    assert process.attributes["messaging.consumer.group.name"] == "g"


def test_missing_or_garbled_context_starts_a_new_trace(exporter: InMemorySpanExporter) -> None:
    exporter.clear()
    with tracing.process_span(
        "aimesh.tasks", key="k", partition=0, offset=0, group="g", headers=[("traceparent", b"\xff garbage")]
    ):
        pass
    (span,) = exporter.get_finished_spans()
    assert span.parent is None


async def test_an_infer_span_names_the_triton_endpoint_the_pool_sent_the_call_to(
    exporter: InMemorySpanExporter,
) -> None:
    first, second = FakeServer("10.0.0.1:8001"), FakeServer("10.0.0.2:8001")
    first.down = True
    pool = pool_of(first, second)
    exporter.clear()
    with tracing.infer_span("sleep", server_address=pool.url, batch_items=1, task_id="t"):
        await pool.infer_batch("sleep", ["x"], timeout_s=5.0)
    (span,) = exporter.get_finished_spans()
    assert (span.attributes["server.address"], span.attributes["server.port"]) == ("10.0.0.2", 8001)
