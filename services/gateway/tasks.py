"""The task routes: submit (one or a batch), get and cancel, each one gRPC call to ingest or the notifier."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Request, Response, Security
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyQuery, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from aimesh.settings import GatewaySettings
from aimesh.v1 import ingest_pb2, notifier_pb2

from .problems import PROBLEM_JSON, bad_request
from .protojson import JSON_MEDIA_TYPE, read_message, schema_name, to_json
from .upstream import Caller, Upstream

bearer = HTTPBearer(auto_error=False, description="An API key, forwarded to ingest and the notifier.")
# Browsers' EventSource and WebSocket cannot set headers: the stream routes take the key in the query too.
access_token = APIKeyQuery(
    name="access_token", auto_error=False, description="The API key, for clients that cannot set headers."
)


def caller(credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]) -> Caller:
    return Caller.bearer(credentials.credentials if credentials else None)


def stream_caller(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
    token: Annotated[str | None, Security(access_token)],
) -> Caller:
    return Caller.bearer(credentials.credentials if credentials else token)


class Links(BaseModel):
    """Where to follow the task (paths relative to the gateway): its state, its events, and the URL to DELETE
    to cancel it."""

    model_config = ConfigDict(populate_by_name=True)

    self_: str = Field(alias="self")
    events: str
    cancel: str


class Accepted(BaseModel):
    """An accepted task: ingest answered once Kafka acknowledged it."""

    taskId: str  # noqa: N815 - the JSON names are camelCase, as proto3 JSON's
    acceptedAt: str | None = None  # noqa: N815
    duplicate: bool
    links: Links


class AcceptedBatch(BaseModel):
    """Every task of a batch, in request order."""

    tasks: list[Accepted]


def task_path(task_id: str) -> str:
    return f"/v1/tasks/{task_id}"


def accepted(answer: ingest_pb2.SubmitTaskResponse) -> Accepted:
    path = task_path(answer.task_id)
    accepted_at = answer.accepted_at.ToJsonString() if answer.HasField("accepted_at") else None
    links = Links(self_=path, events=f"{path}/events", cancel=path)
    return Accepted(taskId=answer.task_id, acceptedAt=accepted_at, duplicate=answer.duplicate, links=links)


def proto_body(message: Any) -> dict[str, Any]:
    """The OpenAPI request body of a route that reads ``message`` (a generated class) as proto3 JSON."""
    ref = {"$ref": f"#/components/schemas/{schema_name(message.DESCRIPTOR)}"}
    return {"requestBody": {"required": True, "content": {JSON_MEDIA_TYPE: {"schema": ref}}}}


def proto_answer(message: Any, description: str) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{schema_name(message.DESCRIPTOR)}"}
    return {"description": description, "content": {JSON_MEDIA_TYPE: {"schema": ref}}}


PROBLEMS: dict[int | str, dict[str, Any]] = {
    "4XX": {
        "description": "The request failed",
        "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}},
    },
    "5XX": {
        "description": "The mesh failed",
        "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}},
    },
}

router = APIRouter(prefix="/v1", tags=["tasks"], responses=PROBLEMS)


def _upstream(request: Request) -> Upstream:
    upstream: Upstream = request.app.state.upstream
    return upstream


def _settings(request: Request) -> GatewaySettings:
    settings: GatewaySettings = request.app.state.settings
    return settings


@router.post("/tasks", status_code=202, openapi_extra=proto_body(ingest_pb2.SubmitTaskRequest))
async def submit_task(
    request: Request,
    response: Response,
    who: Annotated[Caller, Security(caller)],
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", max_length=128)] = None,
) -> Accepted:
    """Submit one task (a SubmitTaskRequest in proto3 JSON). Answers once ingest answered, that is once Kafka
    acknowledged the task. ``Idempotency-Key`` sets the request's idempotency key."""
    task = await read_message(request, ingest_pb2.SubmitTaskRequest, _settings(request).gateway_max_body_bytes)
    if idempotency_key is not None:
        if task.idempotency_key and task.idempotency_key != idempotency_key:
            raise bad_request("the Idempotency-Key header and the body's idempotencyKey differ", "idempotency_key")
        task.idempotency_key = idempotency_key
    upstream = _upstream(request)
    answer = accepted(await upstream.unary(upstream.ingest.SubmitTask, task, who))
    response.headers["Location"] = answer.links.self_
    return answer


@router.post("/tasks:batch", status_code=202, openapi_extra=proto_body(ingest_pb2.SubmitTasksRequest))
async def submit_tasks(
    request: Request,
    who: Annotated[Caller, Security(caller)],
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", include_in_schema=False)] = None,
) -> AcceptedBatch:
    """Submit a batch (a SubmitTasksRequest), all or nothing; each task's idempotency key is in the body."""
    if idempotency_key is not None:
        raise bad_request("a batch takes an idempotencyKey in each task of the body, not the header", "Idempotency-Key")
    batch = await read_message(request, ingest_pb2.SubmitTasksRequest, _settings(request).gateway_max_body_bytes)
    upstream = _upstream(request)
    answer = await upstream.unary(upstream.ingest.SubmitTasks, batch, who)
    return AcceptedBatch(tasks=[accepted(t) for t in answer.tasks])


@router.get(
    "/tasks/{task_id}",
    response_class=Response,
    responses={200: proto_answer(notifier_pb2.GetTaskResponse, "The task's current state")},
)
async def get_task(task_id: str, request: Request, who: Annotated[Caller, Security(caller)]) -> Response:
    """The task's current state. Another tenant's task is answered exactly as an unknown one (404)."""
    upstream = _upstream(request)
    answer = await upstream.unary(upstream.notifier.GetTask, notifier_pb2.GetTaskRequest(task_id=task_id), who)
    return JSONResponse(to_json(answer))


@router.delete(
    "/tasks/{task_id}",
    response_class=Response,
    responses={200: proto_answer(notifier_pb2.CancelTaskResponse, "What the cancellation did")},
)
async def cancel_task(task_id: str, request: Request, who: Annotated[Caller, Security(caller)]) -> Response:
    """Ask for the task to be cancelled: REQUESTED once Kafka acknowledged it, or ALREADY_ENDED."""
    upstream = _upstream(request)
    cancel = notifier_pb2.CancelTaskRequest(task_id=task_id)
    return JSONResponse(to_json(await upstream.unary(upstream.notifier.CancelTask, cancel, who)))
