"""The gateway's spans and metrics, as one ASGI middleware, and the access log without API keys.

Each request gets a SERVER span, a child of the caller's ``traceparent`` if it sent one; the gRPC calls it
makes carry the span's context (``Caller.metadata``), so ingest's span, and the task's whole trace below it,
hang under the gateway's. Spans and metrics are named by the route template, never the path with its task id.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, TracerProvider
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from aimesh.metrics import GatewayMetrics
from aimesh.tracing import TASK_ID

UNMATCHED_ROUTE = "unmatched"  # a static file, or a path no route serves: one label, not one per path


class Telemetry:
    """ASGI middleware: a span and the request metrics around every HTTP request and WebSocket connection."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics, tracer_provider: TracerProvider | None = None) -> None:
        self._app = app
        self._metrics = metrics
        self._tracer = trace.get_tracer("aimesh", tracer_provider=tracer_provider)  # None: the global provider

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self._app(scope, receive, send)
            return
        method = scope.get("method", "GET") if scope["type"] == "http" else "WEBSOCKET"
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        status = {"code": "websocket" if scope["type"] == "websocket" else "500"}

        async def send_noting_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = str(message["status"])
            await send(message)

        started = time.monotonic()
        with self._tracer.start_as_current_span(
            method, context=propagate.extract(headers), kind=SpanKind.SERVER
        ) as span:
            try:
                await self._app(scope, receive, send_noting_status)
            finally:
                route = _route(scope)
                span.update_name(f"{method} {route}")
                span.set_attributes(_attributes(scope, method, route, status["code"]))
                self._metrics.requests.labels(route, method, status["code"]).inc()
                self._metrics.request_seconds.labels(route, method).observe(time.monotonic() - started)


def _route(scope: Scope) -> str:
    route = scope.get("route")
    return str(getattr(route, "path", UNMATCHED_ROUTE))


def _attributes(scope: Scope, method: str, route: str, status: str) -> dict[str, Any]:
    attributes: dict[str, Any] = {"http.request.method": method, "http.route": route}
    if status.isdigit():
        attributes["http.response.status_code"] = int(status)
    task_id = scope.get("path_params", {}).get("task_id")
    if task_id:
        attributes[TASK_ID] = task_id
    return attributes


_ACCESS_TOKEN = re.compile(r"(access_token=)[^&\s]*")


class RedactAccessToken(logging.Filter):
    """Blanks ``access_token`` in uvicorn's access log lines: the API key of a browser's stream is in the URL."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_ACCESS_TOKEN.sub(r"\1***", a) if isinstance(a, str) else a for a in record.args)
        return True
