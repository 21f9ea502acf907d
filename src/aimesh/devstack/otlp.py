"""An OTLP/gRPC trace receiver for tests and benchmarks: the services export to it, the caller reads what arrived."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from aimesh.devstack.ports import free_ports


def _value(v: common_pb2.AnyValue) -> object:
    which = v.WhichOneof("value")
    return getattr(v, which) if which else None


@dataclass(frozen=True)
class ExportedSpan:
    service: str
    span: trace_pb2.Span
    attributes: dict[str, object] = field(hash=False)

    @property
    def name(self) -> str:
        return self.span.name

    @property
    def trace_id(self) -> str:
        return self.span.trace_id.hex()

    @property
    def span_id(self) -> str:
        return self.span.span_id.hex()

    @property
    def parent_id(self) -> str:
        return self.span.parent_span_id.hex()


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spans: list[ExportedSpan] = []
        (self.port,) = free_ports(1)
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)  # type: ignore[no-untyped-call]
        self._server.add_insecure_port(f"127.0.0.1:{self.port}")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._server.start()

    def stop(self) -> None:
        self._server.stop(0)

    def Export(  # noqa: N802 - the OTLP method name
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        with self._lock:
            for resource_spans in request.resource_spans:
                resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
                service = str(resource.get("service.name", ""))
                for scope in resource_spans.scope_spans:
                    for span in scope.spans:
                        attributes = {a.key: _value(a.value) for a in span.attributes}
                        self._spans.append(ExportedSpan(service, span, attributes))
        return trace_service_pb2.ExportTraceServiceResponse()

    def trace(self, trace_id: str) -> list[ExportedSpan]:
        with self._lock:
            return [s for s in self._spans if s.trace_id == trace_id]

    def wait_for(
        self,
        trace_id: str,
        names: set[str],
        timeout_s: float = 30.0,
        until: Callable[[list[ExportedSpan]], bool] = lambda spans: True,
    ) -> list[ExportedSpan]:
        """The spans of one trace, once every span name in ``names`` has arrived and ``until`` holds for them (or
        the time is up)."""
        deadline = time.monotonic() + timeout_s
        while True:
            spans = self.trace(trace_id)
            if (names <= {s.name for s in spans} and until(spans)) or time.monotonic() > deadline:
                return spans
            time.sleep(0.1)


@contextmanager
def receiver_process() -> Iterator[str]:
    """A receiver in a process of its own, as a collector is: the spans it decodes cost the caller no CPU time (a
    benchmark's client, say). Yields its endpoint; what it receives is not read back."""
    process = subprocess.Popen(
        [sys.executable, "-m", "aimesh.devstack.otlp"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert process.stdin is not None and process.stdout is not None
    try:
        yield process.stdout.readline().strip()
    finally:
        process.stdin.close()  # the receiver's signal to stop
        process.wait(10)


def main() -> None:
    """Serve a receiver, print its endpoint, stop when standard input closes."""
    receiver = OtlpReceiver()
    receiver.start()
    print(receiver.endpoint, flush=True)
    sys.stdin.read()
    receiver.stop()


if __name__ == "__main__":
    main()
