"""OpenTelemetry across the Kafka hops: W3C trace context travels in record headers, and each hop opens a
messaging span named by the OpenTelemetry messaging conventions (``send <topic>``, ``process <topic>``).

Without a configured SDK the OpenTelemetry API is a no-op, so tracing off costs next to nothing.
Telemetry never raises into the data path: propagation problems only lose the trace link.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import Getter, Setter
from opentelemetry.trace import Span, SpanKind

from aimesh.kafka import Headers

log = logging.getLogger(__name__)

_TRACER_NAME = "aimesh"


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


def configure(service_name: str) -> None:
    """Install the SDK tracer provider when the standard ``OTEL_TRACES_EXPORTER`` asks for an exporter.

    ``console`` prints spans to stdout; anything else is left to the OpenTelemetry distro the operator
    installs. Unset (the default) keeps the no-op API.
    """
    exporter_name = os.environ.get("OTEL_TRACES_EXPORTER", "none")
    if exporter_name in ("", "none"):
        return
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    resource = Resource.create({SERVICE_NAME: os.environ.get("OTEL_SERVICE_NAME", service_name)})
    provider = TracerProvider(resource=resource)
    if exporter_name == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    else:
        log.warning("OTEL_TRACES_EXPORTER=%s is not built in; spans are not exported", exporter_name)
    trace.set_tracer_provider(provider)


def _tracer() -> trace.Tracer:
    return trace.get_tracer(_TRACER_NAME)


def _messaging_attributes(topic: str, key: str) -> dict[str, str]:
    return {
        "messaging.system": "kafka",
        "messaging.operation.type": "send",
        "messaging.destination.name": topic,
        "messaging.kafka.message.key": key,
    }


@contextmanager
def send_span(topic: str, key: str, headers: Headers) -> Iterator[Span]:
    """A PRODUCER span around publishing one record; its context is injected into ``headers``."""
    with _tracer().start_as_current_span(
        f"send {topic}", kind=SpanKind.PRODUCER, attributes=_messaging_attributes(topic, key)
    ) as span:
        propagate.inject(headers, setter=_SETTER)
        yield span


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
    parent = propagate.extract(list(headers or ()), getter=_GETTER)
    attributes: dict[str, str | int] = {
        "messaging.system": "kafka",
        "messaging.operation.type": "process",
        "messaging.destination.name": topic,
        "messaging.destination.partition.id": str(partition),
        "messaging.kafka.offset": offset,
        "messaging.consumer.group.name": group,
        "messaging.kafka.message.key": key,
    }
    token = otel_context.attach(parent)
    try:
        with _tracer().start_as_current_span(f"process {topic}", kind=SpanKind.CONSUMER, attributes=attributes) as span:
            yield span
    finally:
        otel_context.detach(token)
