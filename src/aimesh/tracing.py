"""OpenTelemetry across the Kafka hops: W3C trace context travels in record headers, and each hop opens a
messaging span named by the OpenTelemetry messaging conventions (``send <topic>``, ``process <topic>``).

``configure`` installs the SDK from the standard ``OTEL_*`` environment variables. Without an exporter the
OpenTelemetry API stays a no-op, so tracing off costs next to nothing. Telemetry never raises into the
data path: a propagation problem only loses the trace link.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import Getter, Setter
from opentelemetry.trace import Link, Span, SpanContext, SpanKind, Status, StatusCode

from aimesh.kafka import Headers

log = logging.getLogger(__name__)

_TRACER_NAME = "aimesh"
TASK_ID = "aimesh.task_id"

_provider: Any = None
# Whether spans are recorded: asked of the global tracer provider once, then cached (the OpenTelemetry API's own
# lookup reads the environment on every call while none is set, a measurable share of a busy worker's time). The
# global provider can be set only once; ``configure`` and ``use_provider`` set it and drop the cached answer.
_recording_cached: bool | None = None


class _HeaderSetter(Setter[Headers]):
    def set(self, carrier: Headers, key: str, value: str) -> None:
        carrier.append((key, value.encode("ascii", "replace")))


class _HeaderGetter(Getter[Headers]):
    def get(self, carrier: Headers, key: str) -> list[str] | None:
        values = [v if isinstance(v, str) else v.decode("ascii", "replace") for k, v in carrier if k == key and v]
        return values or None

    def keys(self, carrier: Headers) -> list[str]:
        return [k for k, _ in carrier]


_SETTER = _HeaderSetter()
_GETTER = _HeaderGetter()


def _exporter_names() -> list[str]:
    """``OTEL_TRACES_EXPORTER`` as a list; unset means OTLP when an OTLP endpoint is configured, else none."""
    raw = os.environ.get("OTEL_TRACES_EXPORTER")
    if raw is None:
        configured = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
            "OTEL_EXPORTER_OTLP_ENDPOINT"
        )
        return ["otlp"] if configured else []
    return [name.strip() for name in raw.split(",") if name.strip() and name.strip() != "none"]


def configure(service_name: str) -> bool:
    """Install the SDK tracer provider if the environment asks for an exporter; return whether it did.

    Honoured: ``OTEL_SDK_DISABLED``, ``OTEL_TRACES_EXPORTER`` (``otlp``, ``console``, ``none``),
    ``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT`` / ``_PROTOCOL`` (``grpc`` or ``http/protobuf``, the default),
    ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER[_ARG]``, ``OTEL_BSP_*``.
    """
    global _provider
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    names = _exporter_names()
    if not names:
        return False
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

    resource = Resource.create({SERVICE_NAME: os.environ.get("OTEL_SERVICE_NAME") or service_name})
    provider = TracerProvider(resource=resource)  # the sampler comes from OTEL_TRACES_SAMPLER
    for name in names:
        exporter: SpanExporter
        if name == "console":
            exporter = ConsoleSpanExporter()
        elif name == "otlp":
            exporter = _otlp_exporter()
        else:
            log.warning("OTEL_TRACES_EXPORTER=%s is not supported; use otlp, console or none", name)
            continue
        provider.add_span_processor(BatchSpanProcessor(exporter))
    use_provider(provider)
    _provider = provider
    return True


def use_provider(provider: trace.TracerProvider) -> None:
    """Install ``provider`` as the global tracer provider (once per process, as OpenTelemetry allows): aimesh's
    spans go to it from now on. Use this rather than ``trace.set_tracer_provider``, which aimesh would not notice
    once it has found no provider."""
    global _recording_cached
    trace.set_tracer_provider(provider)
    _recording_cached = None


def _otlp_exporter() -> Any:
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
    )
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    return HttpExporter()


def shutdown() -> None:
    """Export what is buffered and stop the exporters (at process exit)."""
    global _provider
    if _provider is not None:
        _provider.shutdown()
        _provider = None


def enabled() -> bool:
    return _provider is not None


def server_interceptors() -> list[Any]:
    """gRPC aio server interceptors that open a SERVER span per call (none when tracing is off).

    Health checks and reflection are left out: they would bury the task spans.
    """
    if not enabled():
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

    quiet = filters.any_of(
        filters.service_name("grpc.health.v1.Health"),
        filters.service_prefix("grpc.reflection."),
    )
    return [aio_server_interceptor(filter_=filters.negate(quiet))]  # type: ignore[no-untyped-call]


def _recording() -> bool:
    """Whether a tracer provider that records spans is installed (by ``configure`` or ``use_provider``, or from
    ``OTEL_PYTHON_TRACER_PROVIDER`` at start-up)."""
    global _recording_cached
    if _recording_cached is None:
        provider = trace.get_tracer_provider()
        _recording_cached = not isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)
    return _recording_cached


def _tracer() -> trace.Tracer:
    return trace.get_tracer(_TRACER_NAME)


@contextmanager
def send_span(topic: str, key: str, headers: Headers) -> Iterator[Span]:
    """A PRODUCER span around publishing one record; its context is injected into ``headers``."""
    if not _recording():
        # No spans to record: skip building one (a measurable share of a busy worker's time), but pass on the
        # context in hand, as a no-op span would.
        propagate.inject(headers, setter=_SETTER)
        yield trace.get_current_span()
        return
    attributes = {
        "messaging.system": "kafka",
        "messaging.operation.type": "send",
        "messaging.operation.name": "send",
        "messaging.destination.name": topic,
        "messaging.kafka.message.key": key,
        TASK_ID: key,
    }
    with _tracer().start_as_current_span(f"send {topic}", kind=SpanKind.PRODUCER, attributes=attributes) as span:
        propagate.inject(headers, setter=_SETTER)
        yield span


def context_from(headers: Headers | None) -> otel_context.Context:
    """The trace context a producer put into a record's headers (an empty context if none)."""
    return propagate.extract(list(headers or ()), getter=_GETTER)


@contextmanager
def process_span(
    topic: str,
    *,
    key: str,
    partition: int,
    offset: int,
    group: str,
    headers: Headers | None,
) -> Iterator[Span]:
    """A CONSUMER span for processing one record, child of the producer's context from the headers."""
    token = otel_context.attach(context_from(headers))
    try:
        if not _recording():  # as in send_span: the producer's context stays current, no span is built
            yield trace.get_current_span()
            return
        attributes: dict[str, str | int] = {
            "messaging.system": "kafka",
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.destination.name": topic,
            "messaging.destination.partition.id": str(partition),
            "messaging.kafka.offset": offset,
            "messaging.consumer.group.name": group,
            "messaging.kafka.message.key": key,
            TASK_ID: key,
        }
        with _tracer().start_as_current_span(f"process {topic}", kind=SpanKind.CONSUMER, attributes=attributes) as span:
            yield span
    finally:
        otel_context.detach(token)


@contextmanager
def infer_span(model: str, *, server_address: str, batch_items: int, task_id: str) -> Iterator[Span]:
    """A CLIENT span for one Triton inference call. ``server_address``: the Triton target, or a list of them that
    the call picks from (the worker's pool then names the one it used: ``set_server_address``)."""
    if not _recording():
        yield trace.get_current_span()
        return
    attributes: dict[str, str | int] = {
        "rpc.system": "grpc",
        "rpc.service": "inference.GRPCInferenceService",
        "rpc.method": "ModelInfer",
        "aimesh.model.name": model,
        "aimesh.inference.batch_items": batch_items,
        TASK_ID: task_id,
        **_server_attributes(server_address),
    }
    with _tracer().start_as_current_span(f"infer {model}", kind=SpanKind.CLIENT, attributes=attributes) as span:
        yield span


def set_server_address(address: str) -> None:
    """Name on the current span the server a call went to (``host:port``), once the call has picked it."""
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes(_server_attributes(address))


def _server_attributes(address: str) -> dict[str, str | int]:
    host, _, port = address.rpartition(":")
    if not port.isdigit() or "," in address:
        return {"server.address": address}
    return {"server.address": host, "server.port": int(port)}


@contextmanager
def deliver_span(task_id: str, parent: SpanContext | None, *, status: str) -> Iterator[Span]:
    """The notifier handing one update to one subscriber: a child of the span that read the result, linked
    to the subscriber's own call (the current span)."""
    watcher = trace.get_current_span().get_span_context()
    links = [Link(watcher)] if watcher.is_valid else []
    context = trace.set_span_in_context(trace.NonRecordingSpan(parent)) if parent and parent.is_valid else None
    attributes = {TASK_ID: task_id, "aimesh.task.status": status}
    # Not made current: the caller yields inside this block (an async generator), and a context attached
    # before a yield cannot be detached if the client drops the stream there.
    span = _tracer().start_span(
        "deliver update", context=context, kind=SpanKind.INTERNAL, links=links, attributes=attributes
    )
    try:
        yield span
    finally:
        span.end()


def current_span_context() -> SpanContext:
    return trace.get_current_span().get_span_context()


def event(name: str, attributes: dict[str, str | int | float | bool] | None = None) -> None:
    """Add an event to the current span (retries, dead letters, expiry)."""
    trace.get_current_span().add_event(name, attributes or {})


def fail(description: str, attributes: dict[str, str | int | float | bool] | None = None) -> None:
    """Mark the current span as failed, with an event saying why, so a failed task's trace explains itself."""
    span = trace.get_current_span()
    span.add_event("task.failed", {"reason": description, **(attributes or {})})
    span.set_status(Status(StatusCode.ERROR, description))


def trace_ids() -> tuple[str, str] | None:
    """The current (trace id, span id) in hex, for log lines; None outside a recorded span."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"


def grpc_metadata() -> dict[str, str]:
    """The current trace context as gRPC metadata, for calls made through clients we cannot intercept."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier
