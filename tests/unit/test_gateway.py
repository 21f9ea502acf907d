"""The HTTP gateway's task routes and errors, over real HTTP: the app on uvicorn in this event loop, calling fake
ingest and notifier servicers on real grpc.aio servers (tests/unit/client_fakes.py)."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from client_fakes import UNAVAILABLE, Failure, Fakes, backlog_too_long, story
from google.rpc import code_pb2, error_details_pb2
from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, TracerProvider
from sse_starlette.sse import AppStatus

from aimesh import runtime
from aimesh.auth import Authenticator, hash_key
from aimesh.gateway.__main__ import GatewayServer, listen, uvicorn_config
from aimesh.gateway.app import create_app
from aimesh.gateway.openapi import CHECKED_IN, render
from aimesh.gateway.telemetry import RedactAccessToken
from aimesh.lifecycle import Parts
from aimesh.metrics import GatewayMetrics
from aimesh.settings import GatewaySettings
from aimesh.v1 import ingest_pb2

PROBLEM_JSON = "application/problem+json"
KEY = "aimesh-test-key"
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"


@dataclass
class Gateway:
    url: str
    http: httpx.AsyncClient
    fakes: Fakes
    metrics: GatewayMetrics


@asynccontextmanager
async def running_gateway(
    fakes: Fakes, static_dir: Path | None = None, tracer_provider: TracerProvider | None = None, **settings: Any
) -> AsyncIterator[Gateway]:
    """The gateway on a socket bound before uvicorn starts, so the first request waits in the backlog instead
    of the test polling for readiness."""
    config = GatewaySettings(ingest_address=fakes.ingest_address, notifier_address=fakes.notifier_address, **settings)
    metrics = GatewayMetrics()
    listener = listen("127.0.0.1:0")
    server = GatewayServer(
        uvicorn_config(
            create_app(config, metrics=metrics, static_dir=static_dir, tracer_provider=tracer_provider), config
        )
    )
    serving = asyncio.create_task(server.serve(sockets=[listener]))
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    try:
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            yield Gateway(url, http, fakes, metrics)
    finally:
        server.should_exit = True
        await serving


@asynccontextmanager
async def started(fakes: Fakes) -> AsyncIterator[Fakes]:
    await fakes.start()
    try:
        yield fakes
    finally:
        await fakes.stop()


@pytest.fixture
async def gateway() -> AsyncIterator[Gateway]:
    async with started(Fakes()) as fakes, running_gateway(fakes) as running:
        yield running


def a_task(**fields: Any) -> dict[str, Any]:
    return {"modelName": "sentiment", "input": {"text": "What a great day"}, **fields}


async def test_submit_answers_202_with_location_once_ingest_answered(gateway: Gateway) -> None:
    headers = {
        "Idempotency-Key": "key-1",
        "Authorization": f"Bearer {KEY}",
        "traceparent": f"00-{TRACE_ID}-b7ad6b7169203331-01",
    }
    answer = await gateway.http.post("/v1/tasks", json=a_task(parameters={"sentences": "2"}), headers=headers)

    assert answer.status_code == 202
    body = answer.json()
    task_id = body["taskId"]
    assert answer.headers["location"] == f"/v1/tasks/{task_id}"
    assert body["duplicate"] is False
    assert body["links"] == {
        "self": f"/v1/tasks/{task_id}",
        "events": f"/v1/tasks/{task_id}/events",
        "cancel": f"/v1/tasks/{task_id}",
    }
    [request] = gateway.fakes.ingest.requests
    assert isinstance(request, ingest_pb2.SubmitTaskRequest)
    assert (request.model_name, request.idempotency_key, dict(request.parameters)) == (
        "sentiment",
        "key-1",
        {"sentences": "2"},
    )
    [metadata] = gateway.fakes.ingest.metadata
    assert metadata["authorization"] == f"Bearer {KEY}"
    assert TRACE_ID in str(metadata["traceparent"])  # ingest's span joins the caller's trace


async def test_the_gateway_span_joins_the_callers_trace_and_parents_the_grpc_call() -> None:
    exporter = InMemorySpanExporter()
    provider = SdkTracerProvider()  # the test's own: the global provider can be set only once per process
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    caller_span = "b7ad6b7169203331"
    async with started(Fakes()) as fakes, running_gateway(fakes, tracer_provider=provider) as gateway:
        headers = {"traceparent": f"00-{TRACE_ID}-{caller_span}-01"}
        submitted = await gateway.http.post("/v1/tasks", json=a_task(), headers=headers)

    [span] = exporter.get_finished_spans()
    context = span.get_span_context()
    assert (span.name, span.kind, span.attributes["http.response.status_code"]) == (
        "POST /v1/tasks",
        SpanKind.SERVER,
        202,
    )
    assert span.parent is not None and f"{span.parent.span_id:016x}" == caller_span
    assert f"{context.trace_id:032x}" == TRACE_ID
    assert submitted.status_code == 202
    # ingest's SERVER span will be a child of the gateway's span, in the caller's trace.
    assert fakes.ingest.metadata[0]["traceparent"] == f"00-{TRACE_ID}-{context.span_id:016x}-01"


async def test_a_repeated_idempotency_key_answers_the_first_task_as_a_duplicate(gateway: Gateway) -> None:
    first = await gateway.http.post("/v1/tasks", json=a_task(), headers={"Idempotency-Key": "again"})
    # proto3 JSON's snake_case names are accepted too.
    second = await gateway.http.post(
        "/v1/tasks", json={"model_name": "sentiment", "input": {"text": "x"}}, headers={"Idempotency-Key": "again"}
    )

    assert (first.status_code, second.status_code) == (202, 202)
    assert second.json()["taskId"] == first.json()["taskId"]
    assert second.json()["duplicate"] is True


async def test_batch_submit_answers_every_task_in_order(gateway: Gateway) -> None:
    gateway.fakes.ingest.task_ids = ["id-a", "id-b"]
    batch = {"tasks": [a_task(idempotencyKey="a"), a_task(idempotencyKey="b", priority="PRIORITY_BATCH")]}

    answer = await gateway.http.post("/v1/tasks:batch", json=batch)
    with_header = await gateway.http.post("/v1/tasks:batch", json=batch, headers={"Idempotency-Key": "k"})

    assert answer.status_code == 202
    assert with_header.status_code == 400  # keys belong to the tasks: one header cannot say which
    assert [t["taskId"] for t in answer.json()["tasks"]] == ["id-a", "id-b"]
    assert answer.json()["tasks"][1]["links"]["events"] == "/v1/tasks/id-b/events"
    [request] = gateway.fakes.ingest.requests
    assert isinstance(request, ingest_pb2.SubmitTasksRequest)
    assert [t.idempotency_key for t in request.tasks] == ["a", "b"]


async def test_get_answers_the_state_and_delete_cancels(gateway: Gateway) -> None:
    task_id = str(uuid.uuid4())
    gateway.fakes.notifier.updates[task_id] = story(task_id)[:2]

    state = await gateway.http.get(f"/v1/tasks/{task_id}")
    cancel = await gateway.http.delete(f"/v1/tasks/{task_id}")

    assert state.status_code == 200
    assert state.json()["state"]["status"] == "TASK_STATUS_RUNNING"
    assert state.json()["state"]["sequence"] == 2
    assert cancel.status_code == 200
    assert cancel.json()["outcome"] == "CANCEL_OUTCOME_REQUESTED"
    assert gateway.fakes.notifier.cancelled == [task_id]


def bad_text() -> Failure:
    violation = error_details_pb2.BadRequest.FieldViolation(field="input.text", description="must not be empty")
    return Failure(
        code_pb2.INVALID_ARGUMENT,
        "input.text: must not be empty",
        [error_details_pb2.BadRequest(field_violations=[violation])],
    )


@pytest.mark.parametrize(
    ("failure", "status", "retry_after"),
    [
        (bad_text(), 400, None),
        (Failure(code_pb2.PERMISSION_DENIED, "not yours"), 403, None),
        (Failure(code_pb2.NOT_FOUND, "model 'nope' is not served here"), 404, None),
        (Failure(code_pb2.FAILED_PRECONDITION, "the deadline has passed"), 422, None),
        (backlog_too_long(2.5), 429, "3"),
        (Failure(code_pb2.RESOURCE_EXHAUSTED, "message too large"), 429, None),
        (UNAVAILABLE, 503, "1"),
        (Failure(code_pb2.DEADLINE_EXCEEDED, "too slow"), 504, None),
    ],
)
async def test_grpc_statuses_become_problems(
    gateway: Gateway, failure: Failure, status: int, retry_after: str | None
) -> None:
    gateway.fakes.ingest.failures.append(failure)

    answer = await gateway.http.post("/v1/tasks", json=a_task())

    assert answer.status_code == status
    assert answer.headers["content-type"] == PROBLEM_JSON
    assert answer.headers.get("retry-after") == retry_after
    problem = answer.json()
    assert problem["status"] == status
    assert problem["detail"] == failure.message
    assert problem["grpcStatus"] == code_pb2.Code.Name(failure.code)
    assert problem["type"].startswith("urn:aimesh:problem:")


async def test_a_field_violation_and_a_retry_reason_reach_the_problem(gateway: Gateway) -> None:
    gateway.fakes.ingest.failures += [bad_text(), backlog_too_long(1.0)]

    invalid = (await gateway.http.post("/v1/tasks", json=a_task())).json()
    backlog = (await gateway.http.post("/v1/tasks", json=a_task())).json()

    assert invalid["violations"] == [{"field": "input.text", "description": "must not be empty"}]
    assert (backlog["reason"], backlog["retryAfterS"]) == ("BACKLOG_TOO_LONG", 1)


async def test_an_unknown_task_is_404_like_another_tenants(gateway: Gateway) -> None:
    answer = await gateway.http.get(f"/v1/tasks/{uuid.uuid4()}")

    assert answer.status_code == 404
    assert answer.json()["grpcStatus"] == "NOT_FOUND"


async def test_api_keys_are_checked_by_the_servers_behind() -> None:
    auth = Authenticator.from_entries([("acme", hash_key(KEY))])
    async with started(Fakes(auth=auth)) as fakes, running_gateway(fakes) as gateway:
        missing = await gateway.http.post("/v1/tasks", json=a_task())
        wrong = await gateway.http.post("/v1/tasks", json=a_task(), headers={"Authorization": "Bearer nope"})
        right = await gateway.http.post("/v1/tasks", json=a_task(), headers={"Authorization": f"Bearer {KEY}"})
        garbled = await gateway.http.post("/v1/tasks", json=a_task(), headers={"Authorization": b"Bearer k\xe9"})

    assert (missing.status_code, wrong.status_code, right.status_code, garbled.status_code) == (401, 401, 202, 401)
    assert missing.json()["grpcStatus"] == "UNAUTHENTICATED"


async def test_bodies_the_gateway_refuses_never_reach_ingest() -> None:
    async with started(Fakes()) as fakes, running_gateway(fakes, gateway_max_body_bytes=1024) as gateway:
        post = gateway.http.post
        answers = {
            "too large": await post("/v1/tasks", json=a_task(input={"text": "x" * 2000})),
            "too large, chunked": await post("/v1/tasks", content=_chunks(b"{" + b" " * 2000 + b"}"), headers=_JSON),
            "wrong type": await post("/v1/tasks", content=b"{}", headers={"Content-Type": "text/plain"}),
            "no type": await post("/v1/tasks", content=b"{}"),
            "malformed": await post("/v1/tasks", content=b'{"modelName": ', headers=_JSON),
            "not utf-8": await post("/v1/tasks", content=b'{"modelName": "\xff"}', headers=_JSON),
            "not an object": await post("/v1/tasks", content=b"[1]", headers=_JSON),
            "unknown field": await post("/v1/tasks", json=a_task(colour="blue")),
            "wrong field type": await post("/v1/tasks", json=a_task(input="text")),
            "key too long": await post("/v1/tasks", json=a_task(), headers={"Idempotency-Key": "k" * 129}),
            "keys differ": await post("/v1/tasks", json=a_task(idempotencyKey="a"), headers={"Idempotency-Key": "b"}),
        }
        assert fakes.ingest.requests == []

    statuses = {name: a.status_code for name, a in answers.items()}
    assert statuses == {
        "too large": 413,
        "too large, chunked": 413,
        "wrong type": 415,
        "no type": 415,
        "malformed": 400,
        "not utf-8": 400,
        "not an object": 400,
        "unknown field": 400,
        "wrong field type": 400,
        "key too long": 400,
        "keys differ": 400,
    }
    assert all(a.headers["content-type"] == PROBLEM_JSON for a in answers.values())
    assert answers["key too long"].json()["violations"][0]["field"] == "header.Idempotency-Key"
    assert "colour" in answers["unknown field"].json()["detail"]


_JSON = {"Content-Type": "application/json"}


async def _chunks(body: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(body), 256):
        yield body[start : start + 256]


async def test_unknown_routes_and_methods_are_problems(gateway: Gateway) -> None:
    unknown = await gateway.http.get("/v1/nothing-here")
    wrong_method = await gateway.http.put("/v1/tasks")

    assert (unknown.status_code, wrong_method.status_code) == (404, 405)
    assert unknown.headers["content-type"] == wrong_method.headers["content-type"] == PROBLEM_JSON


async def test_the_page_is_served_at_the_root_beside_the_api(tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("<h1>aimesh</h1>")
    async with started(Fakes()) as fakes, running_gateway(fakes, static_dir=tmp_path) as gateway:
        page = await gateway.http.get("/")
        missing = await gateway.http.get("/missing.js")
        api = await gateway.http.post("/v1/tasks", json=a_task())

    assert (page.status_code, page.text) == (200, "<h1>aimesh</h1>")
    assert page.headers["content-type"].startswith("text/html")
    assert (missing.status_code, missing.headers["content-type"]) == (404, PROBLEM_JSON)
    assert api.status_code == 202


async def test_healthz_is_ready_only_while_ingest_and_the_notifier_serve(gateway: Gateway) -> None:
    ready = await gateway.http.get("/healthz")
    await gateway.fakes._servers[1].set_serving(False)
    not_ready = await gateway.http.get("/healthz")

    assert ready.status_code == 200
    assert ready.json() == {"status": "SERVING", "ingest": "SERVING", "notifier": "SERVING"}
    assert not_ready.status_code == 503
    assert not_ready.json()["notifier"] == "NOT_SERVING"


async def test_cors_allows_only_the_configured_origins() -> None:
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    async with started(Fakes()) as fakes, running_gateway(fakes, gateway_cors_origins="http://page.test") as gateway:
        allowed = await gateway.http.options("/v1/tasks", headers={"Origin": "http://page.test", **preflight})
        refused = await gateway.http.options("/v1/tasks", headers={"Origin": "http://evil.test", **preflight})
        submitted = await gateway.http.post("/v1/tasks", json=a_task(), headers={"Origin": "http://page.test"})

    assert allowed.headers["access-control-allow-origin"] == "http://page.test"
    assert "access-control-allow-origin" not in refused.headers
    assert "location" in submitted.headers["access-control-expose-headers"].lower()


async def test_requests_are_counted_by_route_template_and_status(gateway: Gateway) -> None:
    await gateway.http.get(f"/v1/tasks/{uuid.uuid4()}")

    requests = gateway.metrics.requests.labels("/v1/tasks/{task_id}", "GET", "404")
    assert requests._value.get() == 1


async def test_the_served_openapi_document_is_the_checked_in_one(gateway: Gateway) -> None:
    """Regenerate with `python -m aimesh.gateway.openapi` after changing a route or a proto."""
    served = (await gateway.http.get("/openapi.json")).json()
    checked_in = await asyncio.to_thread(Path(CHECKED_IN).read_text)

    assert served == json.loads(checked_in)
    assert render() == checked_in
    assert {"/v1/tasks", "/v1/tasks:batch", "/v1/tasks/{task_id}", "/v1/tasks/{task_id}/events"} <= served[
        "paths"
    ].keys()


def test_the_access_log_never_shows_an_access_token() -> None:
    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        "",
        0,
        '%s - "%s %s"',
        ("1.2.3.4", "GET", "/v1/ws?access_token=secret&x=1"),
        None,
    )

    RedactAccessToken().filter(record)

    assert "secret" not in record.getMessage()
    assert "access_token=***&x=1" in record.getMessage()


def test_connections_to_the_gateway_send_small_answers_at_once() -> None:
    # Without TCP_NODELAY a small answer on a kept-alive connection waited for the client's delayed ACK (~40 ms).
    listener = listen("127.0.0.1:0")
    with listener, socket.create_connection(listener.getsockname()):
        accepted, _ = listener.accept()
        with accepted:
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


@pytest.fixture
def http_server() -> Iterator[GatewayServer]:
    """The gateway's HTTP server as its main builds it, on a free port. Stopping uvicorn as its SIGTERM handler
    would sets sse-starlette's process-wide exit flag: it is reset after, or later tests' streams would end."""
    config = GatewaySettings()
    yield GatewayServer(uvicorn_config(create_app(config, metrics=GatewayMetrics()), config), listen("127.0.0.1:0"))
    AppStatus.should_exit = False


async def test_the_http_server_is_a_part_whose_end_unasked_is_reported_as_a_death(http_server: GatewayServer) -> None:
    lifeline = runtime.Lifeline()
    async with Parts(lifeline) as parts:
        await parts.start(http_server)
        http_server.should_exit = True  # uvicorn ends its serve loop without stop() having asked
        with pytest.raises(runtime.ComponentDied) as died:
            await asyncio.wait_for(lifeline.wait_for(asyncio.Event()), 10)
    assert died.value.component == "http-server"
    await http_server.stop()  # stopping a part twice is safe


async def test_the_http_server_stopped_as_a_part_is_no_death(http_server: GatewayServer) -> None:
    lifeline = runtime.Lifeline()
    async with Parts(lifeline) as parts:
        await parts.start(http_server)
    assert lifeline.death is None
