"""``GET /v1/tasks/{task_id}/events``: a task's WatchTask stream as Server-Sent Events.

Each update is an ``update`` event whose ``id`` is its sequence number, so a browser's automatic reconnect
(``Last-Event-ID``) resumes after the last update it saw: no gap, no repeat. The first update is awaited
before the answer starts, so a watch the notifier refuses is an ordinary problem response; a failure after it
is an ``error`` event carrying the problem, and the stream ends.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Annotated, Any

import grpc
from fastapi import APIRouter, Header, Query, Request, Response, Security
from sse_starlette import EventSourceResponse, ServerSentEvent

from aimesh.metrics import GatewayMetrics

from .problems import bad_request, from_rpc_error
from .protojson import to_json
from .tasks import PROBLEMS, stream_caller
from .upstream import Caller, Upstream

MAX_SEQUENCE = 2**32 - 1  # WatchTaskRequest.after_sequence is a uint32
EVENT_STREAM = "text/event-stream"

router = APIRouter(prefix="/v1", tags=["tasks"], responses=PROBLEMS)


def resume_point(last_event_id: str | None, after_sequence: int | None) -> int:
    """Where to resume: ``Last-Event-ID`` wins over the query, because a browser reconnects to the URL it
    first opened (its ``after_sequence`` included) and sends the newer position in the header."""
    if last_event_id is None:
        return after_sequence or 0
    # ASCII digits only: str.isdigit() also takes "²" (a latin-1 header byte), which int() refuses.
    position = last_event_id.strip()
    if not _SEQUENCE.fullmatch(position) or int(position) > MAX_SEQUENCE:
        raise bad_request("Last-Event-ID must be the sequence number of an update", "Last-Event-ID")
    return int(position)


_SEQUENCE = re.compile(r"[0-9]{1,10}")  # MAX_SEQUENCE has 10 digits


@router.get(
    "/tasks/{task_id}/events",
    response_class=Response,
    responses={
        200: {
            "description": "The task's updates, as `update` events",
            "content": {EVENT_STREAM: {"schema": {"type": "string"}}},
        },
        204: {"description": "Nothing after Last-Event-ID: the task had ended (an EventSource stops reconnecting)"},
    },
)
async def task_events(
    task_id: str,
    request: Request,
    who: Annotated[Caller, Security(stream_caller)],
    after_sequence: Annotated[int | None, Query(ge=0, le=MAX_SEQUENCE)] = None,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> Response:
    """Stream the task's updates to the terminal one. Each `update` event's data is a WatchTaskResponse in
    proto3 JSON (schema `aimesh_v1_WatchTaskResponse`); heartbeat comments keep idle proxies from closing it."""
    upstream: Upstream = request.app.state.upstream
    call = upstream.watch(task_id, resume_point(last_event_id, after_sequence), who)
    try:
        first = await call.read()
    except grpc.aio.AioRpcError as e:
        raise from_rpc_error(e) from e
    except BaseException:
        call.cancel()  # the client left before the first update
        raise
    if first is grpc.aio.EOF:
        # Resumed at or past the terminal update: 204 is what tells an EventSource to stop reconnecting.
        return Response(status_code=204)
    metrics: GatewayMetrics = request.app.state.metrics
    return EventSourceResponse(
        _events(call, first, metrics),
        ping=request.app.state.settings.gateway_heartbeat_s,
        # Proxies that buffer (nginx) would hold every event back until the stream ends.
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _events(
    call: grpc.aio.UnaryStreamCall[Any, Any], first: object, metrics: GatewayMetrics
) -> AsyncIterator[ServerSentEvent]:
    metrics.open_streams.labels("sse").inc()
    try:
        update: Any = first
        while update is not grpc.aio.EOF:
            yield update_event(update)
            update = await call.read()
    except grpc.aio.AioRpcError as e:
        yield ServerSentEvent(data=_line(from_rpc_error(e).body()), event="error")
    finally:
        call.cancel()  # the client went away first: the notifier frees the subscription
        metrics.open_streams.labels("sse").dec()


def update_event(update: Any) -> ServerSentEvent:
    return ServerSentEvent(data=_line(to_json(update)), event="update", id=str(update.state.sequence))


def _line(body: dict[str, Any]) -> str:
    # ASCII only: a raw U+2028 in a token would be split into two data lines by the event encoder.
    return json.dumps(body, separators=(",", ":"))
