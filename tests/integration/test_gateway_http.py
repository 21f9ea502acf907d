"""The HTTP gateway end to end with a plain HTTP client (httpx) and a WebSocket client (websockets), against the
session's real mesh: 202 with Location, GET, Server-Sent Events to the terminal update, a dropped stream resumed
with Last-Event-ID, one WebSocket watching three tasks, cancellation, and the problem+json errors (401 from a
gateway in front of an ingest and a notifier with API keys, started beside the mesh)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect

from aimesh.auth import hash_key, new_key
from aimesh.devstack.ports import free_ports
from aimesh.devstack.stack import Stack

# seed 1 streams at least 20 tokens for it (test_cancellation checks), so a stream lasts long enough to watch.
from .test_streaming import PROMPT

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

PROBLEM_JSON = "application/problem+json"
TERMINAL = {"TASK_STATUS_SUCCEEDED", "TASK_STATUS_FAILED", "TASK_STATUS_EXPIRED", "TASK_STATUS_CANCELLED"}
# Long enough to drop and resume a stream, or cancel one, while tokens still come: 30 tokens, 50 ms apart.
SLOW_GENERATE = {"max_tokens": "30", "seed": "1", "token_delay_ms": "50"}


@dataclass(frozen=True)
class SseEvent:
    event: str
    id: str
    data: str

    @property
    def state(self) -> dict[str, Any]:
        state: dict[str, Any] = json.loads(self.data)["state"]
        return state


async def sse_events(response: httpx.Response) -> AsyncIterator[SseEvent]:
    """The events of a text/event-stream body as the HTML standard parses them; comments (heartbeats) skipped."""
    fields: dict[str, list[str]] = {}
    async for line in response.aiter_lines():
        if not line:
            if "data" in fields:
                yield SseEvent(
                    event=(fields.get("event") or ["message"])[-1],
                    id=(fields.get("id") or [""])[-1],
                    data="\n".join(fields["data"]),
                )
            fields = {}
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        fields.setdefault(name, []).append(value.removeprefix(" "))


def text_of(state: Mapping[str, Any]) -> str:
    tensors = state.get("result", {}).get("output", {}).get("tensors", [])
    return "".join(s for t in tensors if t.get("name") == "TEXT" for s in t.get("stringData", []))


def problem_of(response: httpx.Response, status: int) -> dict[str, Any]:
    """The problem object of ``response``, asserting it is one with ``status``."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM_JSON), response.headers
    problem: dict[str, Any] = response.json()
    assert problem["status"] == status and problem["title"] and problem["detail"], problem
    return problem


@pytest.fixture
async def http(mesh: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=mesh.gateway_url, timeout=30) as client:
        yield client


async def submit(
    http: httpx.AsyncClient,
    model: str,
    text: str,
    parameters: Mapping[str, str] | None = None,
    *,
    headers: Mapping[str, str] | None = None,
) -> httpx.Response:
    body = {"modelName": model, "input": {"text": text}, "parameters": dict(parameters or {})}
    return await http.post("/v1/tasks", json=body, headers=headers)


async def submitted(http: httpx.AsyncClient, model: str, text: str, parameters: Mapping[str, str] | None = None) -> str:
    response = await submit(http, model, text, parameters)
    assert response.status_code == 202, response.text
    task_id: str = response.json()["taskId"]
    return task_id


async def read_events(
    http: httpx.AsyncClient,
    task_id: str,
    *,
    headers: Mapping[str, str] | None = None,
    params: Mapping[str, str] | None = None,
    stop_after: int | None = None,
) -> list[SseEvent]:
    """The task's update events until the stream ends (or, with ``stop_after``, until that many partial updates
    came, dropping the connection there)."""
    events: list[SseEvent] = []
    url = f"/v1/tasks/{task_id}/events"
    async with http.stream("GET", url, headers=headers, params=params, timeout=60) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        async for event in sse_events(response):
            assert event.event == "update", event
            events.append(event)
            partials = sum(bool(e.state.get("result", {}).get("partial")) for e in events)
            if stop_after is not None and partials >= stop_after:
                break
    return events


# --- submit, get, stream ---------------------------------------------------------------------------------------
async def test_submit_answers_202_with_location_and_get_returns_the_state(http: httpx.AsyncClient) -> None:
    key = str(uuid.uuid4())
    response = await submit(http, "sentiment", "What a great day", headers={"Idempotency-Key": key})

    assert response.status_code == 202, response.text
    body = response.json()
    task_id = body["taskId"]
    assert uuid.UUID(task_id) and body["duplicate"] is False and body["acceptedAt"]
    assert response.headers["location"].endswith(f"/v1/tasks/{task_id}")
    assert body["links"]["self"].endswith(f"/v1/tasks/{task_id}")
    assert body["links"]["events"].endswith(f"/v1/tasks/{task_id}/events")

    got = await http.get(response.headers["location"])
    assert got.status_code == 200, got.text
    state = got.json()["state"]
    assert state["taskId"] == task_id and state["modelName"] == "sentiment"
    assert state["status"] in {"TASK_STATUS_QUEUED", "TASK_STATUS_RUNNING", "TASK_STATUS_SUCCEEDED"}

    again = await submit(http, "sentiment", "What a great day", headers={"Idempotency-Key": key})
    assert again.status_code == 202 and again.json()["taskId"] == task_id and again.json()["duplicate"] is True


async def test_events_stream_every_update_numbered_by_sequence_and_end_after_the_terminal_one(
    http: httpx.AsyncClient,
) -> None:
    task_id = await submitted(http, "generate", PROMPT, {"max_tokens": "16", "seed": "1", "token_delay_ms": "30"})

    events = await read_events(http, task_id)

    states = [e.state for e in events]
    ids = [int(e.id) for e in events]
    assert ids == [s["sequence"] for s in states] and ids == sorted(set(ids)), ids
    final = states[-1]
    assert final["status"] == "TASK_STATUS_SUCCEEDED" and all(s["status"] not in TERMINAL for s in states[:-1])
    partials = [s for s in states if s.get("result", {}).get("partial")]
    assert partials, "generate streamed no partial update"
    assert [s["sequence"] for s in partials] == list(range(3, final["sequence"])), "a partial update is missing"
    assert "".join(text_of(s) for s in partials) == text_of(final) != ""


async def test_a_dropped_stream_resumed_with_last_event_id_misses_and_repeats_nothing(http: httpx.AsyncClient) -> None:
    task_id = await submitted(http, "generate", PROMPT, SLOW_GENERATE)

    before = await read_events(http, task_id, stop_after=3)  # the connection drops here
    after = await read_events(http, task_id, headers={"Last-Event-ID": before[-1].id})

    assert int(after[0].id) == int(before[-1].id) + 1, "the resumed stream has a gap"
    assert any(e.state.get("result", {}).get("partial") for e in after), "the stream was not dropped mid-way"
    states = [e.state for e in before + after]
    sequences = [s["sequence"] for s in states]
    assert sequences == sorted(set(sequences)), f"an update came twice or out of order: {sequences}"
    final = states[-1]
    assert final["status"] == "TASK_STATUS_SUCCEEDED"
    partials = [s for s in states if s.get("result", {}).get("partial")]
    assert [s["sequence"] for s in partials] == list(range(3, final["sequence"]))
    assert "".join(text_of(s) for s in partials) == text_of(final)


async def test_a_stream_resumed_after_the_terminal_update_answers_204(http: httpx.AsyncClient) -> None:
    task_id = await submitted(http, "sentiment", "What a great day")
    [*_, final] = await read_events(http, task_id)

    # A browser that saw everything reconnects at the end: 204, the one answer that stops an EventSource.
    resumed = await http.get(f"/v1/tasks/{task_id}/events", headers={"Last-Event-ID": final.id}, timeout=10)

    assert resumed.status_code == 204 and resumed.content == b""


# --- WebSocket -------------------------------------------------------------------------------------------------
async def test_one_websocket_watches_three_tasks_to_their_ends(mesh: Stack, http: httpx.AsyncClient) -> None:
    task_ids = [
        await submitted(http, "sleep", "one", {"delay_ms": "200"}),
        await submitted(http, "sentiment", "What a great day"),
        await submitted(http, "generate", PROMPT, {"max_tokens": "8", "seed": "1"}),
    ]
    updates: dict[str, list[dict[str, Any]]] = {task_id: [] for task_id in task_ids}
    ws_url = mesh.gateway_url.replace("http://", "ws://") + "/v1/ws"

    async with asyncio.timeout(60), connect(ws_url) as ws:
        # After QUEUED (1): every kept update from RUNNING on, even of a task that ended before the subscription.
        await ws.send(json.dumps({"subscribe": task_ids, "afterSequence": dict.fromkeys(task_ids, 1)}))
        while not all(u and u[-1]["status"] in TERMINAL for u in updates.values()):
            message = json.loads(await ws.recv())
            assert "error" not in message, message
            updates[message["taskId"]].append(message["state"])

    for task_id, states in updates.items():
        assert states[-1]["status"] == "TASK_STATUS_SUCCEEDED" and states[-1]["taskId"] == task_id
        sequences = [s["sequence"] for s in states]
        assert sequences == list(range(2, states[-1]["sequence"] + 1)), (task_id, sequences)
    generated = updates[task_ids[2]]
    partials = [s for s in generated if s.get("result", {}).get("partial")]
    assert "".join(text_of(s) for s in partials) == text_of(generated[-1])


async def test_a_task_unsubscribed_from_a_websocket_sends_nothing_more(mesh: Stack, http: httpx.AsyncClient) -> None:
    dropped = await submitted(http, "sleep", "dropped", {"delay_ms": "1500"})
    kept = await submitted(http, "sleep", "kept", {"delay_ms": "2500"})
    ws_url = mesh.gateway_url.replace("http://", "ws://") + "/v1/ws"
    seen: list[str] = []

    async with asyncio.timeout(60), connect(ws_url) as ws:
        await ws.send(json.dumps({"subscribe": [dropped, kept]}))
        while dropped not in seen:  # its first update: the subscription is live
            seen.append(json.loads(await ws.recv())["taskId"])
        await ws.send(json.dumps({"unsubscribe": [dropped]}))
        unsubscribed_at = len(seen)
        while True:  # until the kept task, which ends a second after the dropped one, has ended
            message = json.loads(await ws.recv())
            seen.append(message["taskId"])
            if message["taskId"] == kept and message["state"]["status"] in TERMINAL:
                break

    ended = (await http.get(f"/v1/tasks/{dropped}")).json()["state"]
    assert ended["status"] == "TASK_STATUS_SUCCEEDED", "the unsubscribed task had not ended: nothing proven"
    assert dropped not in seen[unsubscribed_at + 1 :], seen  # one update may have been in flight already


# --- cancellation ----------------------------------------------------------------------------------------------
async def test_delete_cancels_a_running_task_and_its_stream_ends_cancelled(http: httpx.AsyncClient) -> None:
    task_id = await submitted(http, "generate", PROMPT, {"max_tokens": "200", "seed": "1", "token_delay_ms": "100"})
    states: list[dict[str, Any]] = []
    cancelled: httpx.Response | None = None

    async with http.stream("GET", f"/v1/tasks/{task_id}/events", timeout=60) as response:
        async for event in sse_events(response):
            states.append(event.state)
            if cancelled is None and event.state.get("result", {}).get("partial"):  # running: cancel it now
                cancelled = await http.delete(f"/v1/tasks/{task_id}")

    assert cancelled is not None and cancelled.status_code in (200, 202), cancelled and cancelled.text
    final = states[-1]
    assert final["status"] == "TASK_STATUS_CANCELLED", final
    assert "cancelled by the client while it ran" in final["result"]["error"]["message"]
    partials = [s for s in states if s.get("result", {}).get("partial")]
    assert len(partials) < 200 and text_of(final) == "".join(text_of(s) for s in partials)
    assert (await http.get(f"/v1/tasks/{task_id}")).json()["state"]["status"] == "TASK_STATUS_CANCELLED"
    again = await http.delete(f"/v1/tasks/{task_id}")  # an ended task: answered, nothing more happens
    assert again.status_code == 200 and again.json()["state"]["status"] == "TASK_STATUS_CANCELLED", again.text


# --- errors ----------------------------------------------------------------------------------------------------
async def test_an_unknown_task_is_404_on_get_and_delete(http: httpx.AsyncClient) -> None:
    unknown = str(uuid.uuid4())

    problem_of(await http.get(f"/v1/tasks/{unknown}"), 404)
    problem_of(await http.delete(f"/v1/tasks/{unknown}"), 404)


async def test_a_task_id_that_is_not_a_uuid_is_400(http: httpx.AsyncClient) -> None:
    problem = problem_of(await http.get("/v1/tasks/not-a-task"), 400)

    assert problem["violations"], problem


async def test_a_parameter_outside_the_models_limits_is_400_with_the_violation(http: httpx.AsyncClient) -> None:
    problem = problem_of(await submit(http, "generate", PROMPT, {"max_tokens": "100000"}), 400)

    [violation] = problem["violations"]
    assert "max_tokens" in violation["field"] and "512" in violation["description"], violation


async def test_an_unknown_model_is_404_and_a_blank_input_400(http: httpx.AsyncClient) -> None:
    problem_of(await submit(http, "no-such-model", PROMPT), 404)
    problem = problem_of(await submit(http, "sentiment", "   "), 400)
    assert any("input" in v["field"] for v in problem["violations"]), problem


async def test_a_body_over_the_limit_is_413_and_the_gateway_stays_up(http: httpx.AsyncClient) -> None:
    huge = "x" * (5 << 20)  # the default limit is 4 MiB

    problem_of(await submit(http, "sentiment", huge), 413)
    # The client's next calls, on the same kept-alive connection once uvicorn has read the rest of the body: the
    # body's last read once counted as head bytes and got a stray 400 sent, which the next call read as its answer.
    for _ in range(3):
        assert (await http.get("/healthz")).status_code == 200


async def test_a_body_that_is_not_json_is_400_or_415(http: httpx.AsyncClient) -> None:
    problem_of(await http.post("/v1/tasks", content=b"{not json", headers={"Content-Type": "application/json"}), 400)
    problem_of(await http.post("/v1/tasks", content=b"text", headers={"Content-Type": "text/plain"}), 415)


# --- API keys: a gateway in front of an ingest and a notifier that ask for them --------------------------------
RATE_LIMITED = "initech"  # a tenant whose ingest quota is one task per 100 s


@dataclass(frozen=True)
class KeyedGateway:
    url: str
    keys: dict[str, str]  # tenant -> API key

    def headers(self, tenant: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[tenant]}"}


@pytest.fixture(scope="module")
def keyed(mesh: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeyedGateway]:
    keys = {"acme": new_key(), "globex": new_key(), RATE_LIMITED: new_key()}
    keys_file: Path = tmp_path_factory.mktemp("gateway-keys") / "keys.txt"
    keys_file.write_text("".join(f"{tenant}:{hash_key(key)}\n" for tenant, key in keys.items()))
    ingest_port, notifier_port, gateway_port = free_ports(3)
    ingest, notifier = f"127.0.0.1:{ingest_port}", f"127.0.0.1:{notifier_port}"
    auth = {"AIMESH_AUTH": "on", "AIMESH_API_KEYS_FILE": str(keys_file)}
    upstream = {"AIMESH_INGEST_ADDRESS": ingest, "AIMESH_NOTIFIER_ADDRESS": notifier}
    names = ("ingest-keyed", "notifier-keyed", "gateway-keyed")
    quota = {"AIMESH_TENANT_RATE_OVERRIDES": f"{RATE_LIMITED}=0.01:1"}  # one task, then one per 100 s
    mesh.start_service(names[0], "aimesh.ingest", {**auth, **upstream, **quota})
    mesh.start_service(names[1], "aimesh.notifier", {**auth, **upstream})
    mesh.start_service(names[2], "aimesh.gateway", {**upstream, "AIMESH_GATEWAY_ADDRESS": f"127.0.0.1:{gateway_port}"})
    try:
        mesh.wait_grpc_healthy(ingest, names[0])
        mesh.wait_grpc_healthy(notifier, names[1])
        url = f"http://127.0.0.1:{gateway_port}"
        mesh.wait_http_healthy(f"{url}/healthz", names[2])
        yield KeyedGateway(url, keys)
    finally:
        for name in names:
            mesh.services.pop(name).stop()


async def test_a_missing_or_unknown_api_key_is_401_on_every_route(keyed: KeyedGateway) -> None:
    async with httpx.AsyncClient(base_url=keyed.url, timeout=30) as http:
        task_id = str(uuid.uuid4())
        wrong = {"Authorization": f"Bearer {new_key()}"}
        for headers in ({}, wrong):
            problem_of(await submit(http, "sentiment", "hello", headers=headers), 401)
            problem_of(await http.get(f"/v1/tasks/{task_id}", headers=headers), 401)
            problem_of(await http.delete(f"/v1/tasks/{task_id}", headers=headers), 401)
        events = await http.get(f"/v1/tasks/{task_id}/events", params={"access_token": new_key()})
        problem_of(events, 401)


async def test_a_key_is_taken_from_the_header_or_the_query_and_another_tenants_task_is_unknown(
    keyed: KeyedGateway,
) -> None:
    async with httpx.AsyncClient(base_url=keyed.url, timeout=30) as http:
        response = await submit(http, "sentiment", "What a great day", headers=keyed.headers("acme"))
        assert response.status_code == 202, response.text
        task_id = response.json()["taskId"]

        # EventSource cannot send headers: the key comes as a query parameter.
        events = await read_events(http, task_id, params={"access_token": keyed.keys["acme"]})
        assert events[-1].state["status"] == "TASK_STATUS_SUCCEEDED"
        mine = await http.get(f"/v1/tasks/{task_id}", headers=keyed.headers("acme"))
        assert mine.status_code == 200 and mine.json()["state"]["taskId"] == task_id

        other_id = str(uuid.uuid4())
        theirs = problem_of(await http.get(f"/v1/tasks/{task_id}", headers=keyed.headers("globex")), 404)
        unknown = problem_of(await http.get(f"/v1/tasks/{other_id}", headers=keyed.headers("globex")), 404)
        assert json.dumps(theirs).replace(task_id, "<id>") == json.dumps(unknown).replace(other_id, "<id>")


async def test_a_tenant_over_its_rate_quota_gets_429_with_retry_after(keyed: KeyedGateway) -> None:
    async with httpx.AsyncClient(base_url=keyed.url, timeout=30) as http:
        first = await submit(http, "sentiment", "hello", headers=keyed.headers(RATE_LIMITED))
        assert first.status_code == 202, first.text

        refused = await submit(http, "sentiment", "hello again", headers=keyed.headers(RATE_LIMITED))

        problem = problem_of(refused, 429)
        assert problem["grpcStatus"] == "RESOURCE_EXHAUSTED", problem
        assert 1 <= int(refused.headers["Retry-After"]) <= 100


async def test_an_ingest_that_cannot_be_reached_is_503_with_retry_after(mesh: Stack) -> None:
    (nobody_port, gateway_port) = free_ports(2)
    upstream = {
        "AIMESH_INGEST_ADDRESS": f"127.0.0.1:{nobody_port}",  # nothing listens there
        "AIMESH_NOTIFIER_ADDRESS": mesh.notifier_address,
        "AIMESH_GATEWAY_ADDRESS": f"127.0.0.1:{gateway_port}",
    }
    gateway = mesh.start_service("gateway-no-ingest", "aimesh.gateway", upstream)
    url = f"http://127.0.0.1:{gateway_port}"
    try:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            health = await until_listening(http, "/healthz")
            problem_of(health, 503)  # not ready: one of the services behind it is down

            refused = await submit(http, "sentiment", "hello")

        problem = problem_of(refused, 503)
        assert problem["grpcStatus"] == "UNAVAILABLE", problem
        assert int(refused.headers["Retry-After"]) >= 1
    finally:
        mesh.services.pop("gateway-no-ingest")
        gateway.stop()


async def until_listening(http: httpx.AsyncClient, path: str, timeout_s: float = 30.0) -> httpx.Response:
    """The first answer to GET ``path`` once the gateway accepts connections."""
    async with asyncio.timeout(timeout_s):
        while True:
            try:
                return await http.get(path)
            except httpx.ConnectError:
                await asyncio.sleep(0.1)
