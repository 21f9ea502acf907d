"""``GET /v1/ws``: many tasks watched on one WebSocket.

The client sends ``{"subscribe": [ids], "afterSequence": {id: n}}`` and ``{"unsubscribe": [ids]}``; the
server sends ``{"taskId": id, "state": TaskState}`` for each update and ``{"taskId": id, "error": problem}``
when a watch fails (a message it cannot read: ``{"error": problem}``). Each watched task is a WatchTask call
of its own, so tasks come and go without reopening a stream; a task is no longer watched once its terminal
update is sent. At most ``max_watches`` tasks per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from typing import Any
from urllib.parse import urlsplit

import grpc
from fastapi import APIRouter, WebSocket
from starlette.websockets import WebSocketDisconnect, WebSocketDisconnected

from aimesh.metrics import GatewayMetrics

from .events import MAX_SEQUENCE
from .problems import Problem, bad_request, from_rpc_error
from .protojson import parse_json, to_json
from .upstream import Caller, Upstream

router = APIRouter()

POLICY_VIOLATION = 1008  # WebSocket close code: an origin the gateway does not serve


@router.websocket("/v1/ws")
async def watch_many(websocket: WebSocket) -> None:
    app = websocket.app
    if not origin_allowed(websocket.headers.get("origin"), websocket.headers.get("host"), app.state.cors_origins):
        await websocket.close(POLICY_VIOLATION)  # before accept: the browser sees the handshake refused
        return
    try:
        caller = Caller.bearer(_key(websocket))
    except Problem as problem:
        await websocket.accept()
        await websocket.send_json({"error": problem.body()})
        await websocket.close(POLICY_VIOLATION)
        return
    await websocket.accept()
    metrics: GatewayMetrics = app.state.metrics
    session = WatchSession(
        websocket, app.state.upstream, caller, app.state.settings.gateway_max_ws_subscriptions, metrics
    )
    metrics.open_streams.labels("websocket").inc()
    try:
        await session.run()
    finally:
        metrics.open_streams.labels("websocket").dec()


def _key(websocket: WebSocket) -> str | None:
    scheme, _, key = websocket.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and key.strip():
        return key.strip()
    return websocket.query_params.get("access_token")


def origin_allowed(origin: str | None, host: str | None, allowed: list[str]) -> bool:
    """CORS does not cover WebSockets, so the handshake checks the page's origin itself: no Origin (not a
    browser), the gateway's own origin, or one of AIMESH_GATEWAY_CORS_ORIGINS."""
    if origin is None or "*" in allowed or origin in allowed:
        return True
    try:
        return urlsplit(origin).netloc == host
    except ValueError:  # not a URL ("http://[::1"): no page of the gateway's own
        return False


class WatchSession:
    """One connection's watches, by task id; each runs as an asyncio task that forwards its updates."""

    def __init__(
        self, websocket: WebSocket, upstream: Upstream, caller: Caller, max_watches: int, metrics: GatewayMetrics
    ) -> None:
        self._websocket = websocket
        self._upstream = upstream
        self._caller = caller
        self._max_watches = max_watches
        self._metrics = metrics
        self._watches: dict[str, asyncio.Task[None]] = {}
        self._send_lock = asyncio.Lock()  # watches send concurrently; frames must not interleave

    async def run(self) -> None:
        try:
            while True:
                message = await self._websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return
                await self._handle(message.get("text"))
        except WebSocketDisconnect:
            return
        finally:
            await self._stop_all()

    async def _handle(self, text: str | None) -> None:
        try:
            subscribe, after, unsubscribe = parse_command(text)
        except Problem as problem:
            await self.send({"error": problem.body()})
            return
        for task_id in unsubscribe:
            await self._unsubscribe(task_id)
        for task_id in subscribe:
            await self._subscribe(task_id, after.get(task_id, 0))

    async def _subscribe(self, task_id: str, after_sequence: int) -> None:
        if task_id in self._watches:
            return  # watched already: its updates are on their way
        if len(self._watches) >= self._max_watches:
            problem = Problem(429, f"this connection already watches {self._max_watches} tasks, the most it may")
            await self.send({"taskId": task_id, "error": problem.body()})
            return
        self._watches[task_id] = asyncio.create_task(self._watch(task_id, after_sequence))

    async def _unsubscribe(self, task_id: str) -> None:
        watch = self._watches.pop(task_id, None)
        if watch is not None:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch

    async def _watch(self, task_id: str, after_sequence: int) -> None:
        call = self._upstream.watch(task_id, after_sequence, self._caller)
        self._metrics.open_streams.labels("watch").inc()
        try:
            await self._forward(task_id, call)
        except (WebSocketDisconnect, WebSocketDisconnected):
            pass  # the connection closed under this send; run() sees it and stops every watch
        finally:
            call.cancel()
            self._metrics.open_streams.labels("watch").dec()
            if self._watches.get(task_id) is asyncio.current_task():
                del self._watches[task_id]

    async def _forward(self, task_id: str, call: grpc.aio.UnaryStreamCall[Any, Any]) -> None:
        try:
            async for update in call:
                await self.send({"taskId": task_id, "state": to_json(update.state)})
        except grpc.aio.AioRpcError as e:
            await self.send({"taskId": task_id, "error": from_rpc_error(e).body()})

    async def send(self, message: dict[str, Any]) -> None:
        async with self._send_lock:
            await self._websocket.send_text(json.dumps(message, separators=(",", ":")))

    async def _stop_all(self) -> None:
        for task_id in list(self._watches):
            await self._unsubscribe(task_id)


def parse_command(text: str | None) -> tuple[list[str], dict[str, int], list[str]]:
    """A client message as (tasks to watch, their resume points, tasks to stop watching); a 400 Problem if it
    is not one."""
    if text is None:
        raise bad_request("send JSON text messages")
    try:
        command = parse_json(text)
    except ValueError as e:
        raise bad_request(f"the message is not JSON: {e}") from None
    if not isinstance(command, dict) or not command.keys() <= {"subscribe", "afterSequence", "unsubscribe"}:
        raise bad_request('a message is {"subscribe": [ids], "afterSequence": {id: n}} or {"unsubscribe": [ids]}')
    subscribe = _ids(command.get("subscribe", []), "subscribe")
    unsubscribe = _ids(command.get("unsubscribe", []), "unsubscribe")
    after = command.get("afterSequence", {})
    if not isinstance(after, dict) or not all(_is_sequence(n) for n in after.values()):
        raise bad_request("afterSequence maps task ids to sequence numbers", "afterSequence")
    return subscribe, after, unsubscribe


def _ids(value: Any, name: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(i, str) and not _SURROGATE.search(i) for i in value):
        raise bad_request(f"{name} is a list of task ids", name)
    return value


# A JSON escape such as \ud800 reads as a lone surrogate, which no protobuf string (so no WatchTask) can carry.
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _is_sequence(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_SEQUENCE
