"""The gateway's streams over real HTTP: Server-Sent Events of one task (ids, resume, heartbeats, errors) and
the WebSocket that watches many, against fake notifier servicers on a real grpc.aio server."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from client_fakes import Context, Failure, FakeNotifier, Fakes, story
from google.rpc import code_pb2
from sse_starlette.sse import AppStatus
from test_gateway import KEY, PROBLEM_JSON, Gateway, running_gateway, started
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Origin

from aimesh.auth import Authenticator, hash_key
from aimesh.devstack.ports import free_ports
from aimesh.gateway.__main__ import serve
from aimesh.settings import GatewaySettings
from aimesh.v1 import notifier_pb2

WAIT_S = 5.0  # a bound on every wait, so a broken stream fails the test instead of hanging it


class HoldingNotifier(FakeNotifier):
    """Holds the watch of each task in ``held`` open after its updates (a task still running), and reports each
    such watch the gateway cancelled in ``released``."""

    def __init__(self) -> None:
        super().__init__()
        self.held: set[str] = set()
        self.released: asyncio.Queue[str] = asyncio.Queue()

    async def WatchTask(  # noqa: N802 - the proto's method name
        self, request: notifier_pb2.WatchTaskRequest, context: Context
    ) -> AsyncIterator[notifier_pb2.WatchTaskResponse]:
        async for response in super().WatchTask(request, context):
            yield response
        if request.task_id in self.held:
            try:
                await asyncio.Event().wait()
            finally:
                self.released.put_nowait(request.task_id)


@pytest.fixture
async def gateway() -> AsyncIterator[Gateway]:
    fakes = Fakes()
    fakes.notifier = HoldingNotifier()
    async with started(fakes), running_gateway(fakes, gateway_heartbeat_s=0.05) as running:
        yield running


def notifier(gateway: Gateway) -> HoldingNotifier:
    assert isinstance(gateway.fakes.notifier, HoldingNotifier)
    return gateway.fakes.notifier


def a_story(gateway: Gateway, **kwargs: Any) -> str:
    task_id = str(uuid.uuid4())
    notifier(gateway).updates[task_id] = story(task_id, **kwargs)
    return task_id


@dataclass
class Event:
    name: str = "message"
    id: str | None = None
    data: str = ""
    comment: str = ""


async def events_of(lines: AsyncIterator[str]) -> AsyncIterator[Event]:
    """SSE parsing as a browser does it, comments (heartbeats) included as events of their own."""
    event = Event()
    async for line in lines:
        if not line:
            if event.data or event.comment:
                yield event
            event = Event()
        elif line.startswith(":"):
            yield Event(comment=line[1:].strip())
        else:
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                event.name = value
            elif field == "id":
                event.id = value
            elif field == "data":
                event.data += value


async def all_events(gateway: Gateway, path: str, **headers: str) -> list[Event]:
    async with asyncio.timeout(WAIT_S), gateway.http.stream("GET", path, headers=headers) as answer:
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/event-stream")
        return [e async for e in events_of(answer.aiter_lines()) if not e.comment]


async def test_every_update_is_an_event_whose_id_is_its_sequence_and_the_stream_ends_after_the_terminal_one(
    gateway: Gateway,
) -> None:
    task_id = a_story(gateway)

    events = await all_events(gateway, f"/v1/tasks/{task_id}/events")

    assert [e.name for e in events] == ["update"] * 7
    assert [e.id for e in events] == ["1", "2", "3", "4", "5", "6", "7"]
    states = [json.loads(e.data)["state"] for e in events]
    assert [s["sequence"] for s in states] == [1, 2, 3, 4, 5, 6, 7]
    assert states[-1]["status"] == "TASK_STATUS_SUCCEEDED"
    assert states[2]["result"]["output"]["tensors"][0]["stringData"] == ["Once"]


async def test_a_reconnect_with_last_event_id_resumes_after_it(gateway: Gateway) -> None:
    task_id = a_story(gateway)

    # A browser reconnects to the URL it first opened; the header carries the newer position and wins.
    events = await all_events(gateway, f"/v1/tasks/{task_id}/events?after_sequence=1", **{"Last-Event-ID": "4"})

    assert [e.id for e in events] == ["5", "6", "7"]
    assert notifier(gateway).watch_requests[-1].after_sequence == 4


async def test_after_sequence_in_the_query_resumes_a_first_connection(gateway: Gateway) -> None:
    task_id = a_story(gateway)

    events = await all_events(gateway, f"/v1/tasks/{task_id}/events?after_sequence=5")

    assert [e.id for e in events] == ["6", "7"]


async def test_resuming_past_the_terminal_update_answers_204_so_the_browser_stops(gateway: Gateway) -> None:
    task_id = a_story(gateway)

    answer = await gateway.http.get(f"/v1/tasks/{task_id}/events", headers={"Last-Event-ID": "7"})
    garbled = await gateway.http.get(f"/v1/tasks/{task_id}/events", headers={"Last-Event-ID": "seven"})

    assert answer.status_code == 204
    assert garbled.status_code == 400


async def test_an_idle_stream_carries_heartbeat_comments(gateway: Gateway) -> None:
    task_id = a_story(gateway)
    notifier(gateway).held.add(task_id)
    notifier(gateway).updates[task_id] = notifier(gateway).updates[task_id][:1]  # QUEUED, then nothing

    seen: list[Event] = []
    async with asyncio.timeout(WAIT_S), gateway.http.stream("GET", f"/v1/tasks/{task_id}/events") as answer:
        async for event in events_of(answer.aiter_lines()):
            seen.append(event)
            if event.comment:
                break

    assert seen[0].id == "1"
    assert seen[-1].comment.startswith("ping")
    async with asyncio.timeout(WAIT_S):
        assert await notifier(gateway).released.get() == task_id  # closing the stream ended the watch


async def test_a_refused_watch_is_a_problem_response(gateway: Gateway) -> None:
    notifier(gateway).drops.append((0, Failure(code_pb2.INVALID_ARGUMENT, "task_id: not a UUID")))

    answer = await gateway.http.get("/v1/tasks/not-a-uuid/events")

    assert answer.status_code == 400
    assert answer.headers["content-type"] == PROBLEM_JSON
    assert answer.json()["grpcStatus"] == "INVALID_ARGUMENT"


async def test_a_failure_after_the_first_event_is_an_error_event_then_the_end(gateway: Gateway) -> None:
    task_id = a_story(gateway)
    notifier(gateway).drops.append((2, Failure(code_pb2.DEADLINE_EXCEEDED, "no update for 600 s")))

    events = await all_events(gateway, f"/v1/tasks/{task_id}/events")

    assert [(e.name, e.id) for e in events] == [("update", "1"), ("update", "2"), ("error", None)]
    problem = json.loads(events[-1].data)
    assert (problem["status"], problem["grpcStatus"]) == (504, "DEADLINE_EXCEEDED")


async def test_browsers_pass_the_api_key_in_the_query() -> None:
    fakes = Fakes(auth=Authenticator.from_entries([("acme", hash_key(KEY))]))
    task_id = str(uuid.uuid4())
    fakes.notifier.updates[task_id] = story(task_id)
    async with started(fakes), running_gateway(fakes) as gateway:
        refused = await gateway.http.get(f"/v1/tasks/{task_id}/events")
        events = await all_events(gateway, f"/v1/tasks/{task_id}/events?access_token={KEY}")

    assert refused.status_code == 401
    assert len(events) == 7


# --- WebSocket ------------------------------------------------------------------------------------------------
async def receive(ws: ClientConnection) -> dict[str, Any]:
    async with asyncio.timeout(WAIT_S):
        message: dict[str, Any] = json.loads(await ws.recv())
    return message


def ws_url(gateway: Gateway) -> str:
    return gateway.url.replace("http://", "ws://") + "/v1/ws"


async def test_one_websocket_watches_three_tasks_and_unsubscribes(gateway: Gateway) -> None:
    done, resumed, running = a_story(gateway), a_story(gateway), a_story(gateway)
    notifier(gateway).held.add(running)
    notifier(gateway).updates[running] = notifier(gateway).updates[running][:2]
    async with connect(ws_url(gateway)) as ws:
        await ws.send(json.dumps({"subscribe": [done, resumed, running], "afterSequence": {resumed: 5}}))
        sequences: dict[str, list[int]] = {done: [], resumed: [], running: []}
        while len(sequences[done]) < 7 or len(sequences[resumed]) < 2 or len(sequences[running]) < 2:
            message = await receive(ws)
            sequences[message["taskId"]].append(message["state"]["sequence"])
        await ws.send(json.dumps({"unsubscribe": [running]}))
        async with asyncio.timeout(WAIT_S):
            assert await notifier(gateway).released.get() == running

    assert sequences == {done: [1, 2, 3, 4, 5, 6, 7], resumed: [6, 7], running: [1, 2]}
    assert gateway.metrics.open_streams.labels("watch")._value.get() == 0


async def test_a_failed_watch_is_reported_with_its_task_id(gateway: Gateway) -> None:
    notifier(gateway).drops.append((0, Failure(code_pb2.NOT_FOUND, "task not found")))
    async with connect(ws_url(gateway)) as ws:
        await ws.send(json.dumps({"subscribe": ["gone"]}))
        message = await receive(ws)

    assert message["taskId"] == "gone"
    assert (message["error"]["status"], message["error"]["grpcStatus"]) == (404, "NOT_FOUND")


async def test_a_message_that_is_not_a_command_is_answered_and_the_connection_stays(gateway: Gateway) -> None:
    task_id = a_story(gateway)
    async with connect(ws_url(gateway)) as ws:
        await ws.send("subscribe please")
        not_json = await receive(ws)
        await ws.send(json.dumps({"subscribe": task_id}))
        not_a_list = await receive(ws)
        await ws.send(json.dumps({"subscribe": [task_id]}))
        first = await receive(ws)

    assert not_json["error"]["status"] == not_a_list["error"]["status"] == 400
    assert first["state"]["sequence"] == 1


async def test_a_connection_watches_at_most_its_cap() -> None:
    fakes = Fakes()
    fakes.notifier = holding = HoldingNotifier()
    ids = [str(uuid.uuid4()) for _ in range(3)]
    for task_id in ids:
        holding.updates[task_id] = story(task_id)[:1]
        holding.held.add(task_id)
    async with started(fakes), running_gateway(fakes, gateway_max_ws_subscriptions=2) as gateway:
        async with connect(ws_url(gateway)) as ws:
            await ws.send(json.dumps({"subscribe": ids}))
            messages = [await receive(ws) for _ in range(3)]

    refused = [m for m in messages if "error" in m]
    assert [(m["taskId"], m["error"]["status"]) for m in refused] == [(ids[2], 429)]
    assert sorted(m["taskId"] for m in messages if "state" in m) == sorted(ids[:2])


async def test_a_websocket_from_a_foreign_origin_is_refused(gateway: Gateway) -> None:
    with pytest.raises(InvalidStatus) as refused:
        async with connect(ws_url(gateway), origin=Origin("http://evil.test")):
            pass

    assert refused.value.response.status_code == 403


async def test_stopping_the_service_ends_open_streams_without_waiting_out_the_grace_period() -> None:
    fakes = Fakes()
    fakes.notifier = holding = HoldingNotifier()
    task_id = str(uuid.uuid4())
    holding.updates[task_id] = story(task_id)[:1]
    holding.held.add(task_id)
    http_port, metrics_port = free_ports(2)
    stop = asyncio.Event()
    try:
        async with started(fakes), asyncio.timeout(WAIT_S), httpx.AsyncClient(timeout=WAIT_S) as http:
            settings = GatewaySettings(
                gateway_address=f"127.0.0.1:{http_port}",
                ingest_address=fakes.ingest_address,
                notifier_address=fakes.notifier_address,
                metrics_port=metrics_port,
                shutdown_grace_s=60,  # far longer than WAIT_S: the stream must end because it is told to
            )
            service = asyncio.create_task(serve(settings, stop))
            async with http.stream("GET", f"http://127.0.0.1:{http_port}/v1/tasks/{task_id}/events") as answer:
                events = events_of(answer.aiter_lines())
                assert (await anext(events)).id == "1"
                stop.set()
                rest = [e async for e in events if not e.comment]
            await service
            assert await holding.released.get() == task_id
    finally:
        AppStatus.should_exit = False  # sse-starlette's flag is process-wide: later tests' streams must not end

    assert rest == []
