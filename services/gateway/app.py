"""The gateway's ASGI application: the routes, problem responses for every error, CORS, telemetry, health,
the OpenAPI document and the web page."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from opentelemetry.trace import TracerProvider
from starlette.exceptions import HTTPException

from aimesh.metrics import GatewayMetrics
from aimesh.settings import GatewaySettings
from aimesh.v1 import ingest_pb2, notifier_pb2

from . import events, tasks, websocket
from .problems import Problem, on_http_error, on_problem, on_validation_error
from .protojson import message_schemas
from .telemetry import Telemetry
from .upstream import Upstream

STATIC_DIR = Path(__file__).parent / "static"
TITLE = "aimesh gateway"
VERSION = "1"
DESCRIPTION = (
    "HTTP/JSON and streaming access to aimesh: submit tasks (202 once Kafka acknowledged them), follow them "
    "over Server-Sent Events or a WebSocket, get and cancel them. Bodies are the aimesh.v1 protobuf messages "
    "in proto3 JSON. Errors are application/problem+json (RFC 9457)."
)


def create_app(
    settings: GatewaySettings,
    *,
    metrics: GatewayMetrics | None = None,
    static_dir: Path | None = STATIC_DIR,
    tracer_provider: TracerProvider | None = None,
) -> FastAPI:
    """The application; its lifespan opens the channels to ingest and the notifier and closes them. Spans go to
    ``tracer_provider`` (None: the global one, which ``aimesh.tracing.configure`` installs)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with Upstream.from_settings(settings) as upstream:
            app.state.upstream = upstream
            yield

    # FastAPI's own /openapi.json is a plain Starlette route, which telemetry cannot name: served below instead.
    app = FastAPI(title=TITLE, version=VERSION, description=DESCRIPTION, lifespan=lifespan, openapi_url=None)
    app.state.settings = settings
    app.state.metrics = metrics if metrics is not None else GatewayMetrics()
    app.state.cors_origins = settings.cors_origins
    for router in (tasks.router, events.router, websocket.router):
        app.include_router(router)
    app.add_api_route("/healthz", healthz, methods=["GET"], tags=["health"], responses=tasks.PROBLEMS)
    app.add_api_route("/openapi.json", lambda: openapi_document(app), methods=["GET"], include_in_schema=False)
    _add_error_handlers(app)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "Last-Event-ID"],
            expose_headers=["Location", "Retry-After"],
        )
    app.add_middleware(
        Telemetry, metrics=app.state.metrics, tracer_provider=tracer_provider
    )  # outermost: refusals are measured too
    if static_dir is not None and static_dir.is_dir():
        app.mount("/", StaticFiles(directory=static_dir, html=True), name="static")  # last: it matches every path
    return app


def _add_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(Problem, on_problem)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)


async def on_unexpected(_request: Request, _error: Exception) -> JSONResponse:
    """A bug's 500, still a problem object (Starlette logs the traceback)."""
    return Problem(500, "the gateway failed to answer this request").response()


async def healthz(request: Request) -> dict[str, str]:
    """Ready when ingest and the notifier both answer their health checks SERVING; else 503."""
    upstream: Upstream = request.app.state.upstream
    statuses = await upstream.health()
    if any(s != "SERVING" for s in statuses.values()):
        detail = ", ".join(f"{name} {s}" for name, s in statuses.items())
        raise Problem(503, f"not ready: {detail}", retry_after_s=1, extra=statuses)
    return {"status": "SERVING", **statuses}


def openapi_document(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document of the routes, with the protobuf messages' schemas and the problem object added."""
    if app.openapi_schema is None:
        document = get_openapi(title=TITLE, version=VERSION, description=DESCRIPTION, routes=app.routes)
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        schemas.update(
            message_schemas(
                ingest_pb2.SubmitTaskRequest.DESCRIPTOR,
                ingest_pb2.SubmitTasksRequest.DESCRIPTOR,
                notifier_pb2.GetTaskResponse.DESCRIPTOR,
                notifier_pb2.CancelTaskResponse.DESCRIPTOR,
                notifier_pb2.WatchTaskResponse.DESCRIPTOR,
            )
        )
        schemas["Problem"] = PROBLEM_SCHEMA
        document["components"]["schemas"] = dict(sorted(schemas.items()))
        app.openapi_schema = document
    return app.openapi_schema


PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "An RFC 9457 problem; grpcStatus names the gRPC status of the call that failed.",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string", "example": "urn:aimesh:problem:invalid-argument"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "grpcStatus": {"type": "string", "example": "INVALID_ARGUMENT"},
        "violations": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"field": {"type": "string"}, "description": {"type": "string"}},
            },
        },
        "reason": {"type": "string", "description": "The google.rpc.ErrorInfo reason, e.g. BACKLOG_TOO_LONG"},
        "retryAfterS": {"type": "integer", "description": "As the Retry-After header"},
    },
}
