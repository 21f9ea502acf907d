"""A request body that is not the method's message gets INVALID_ARGUMENT, on unary and streaming methods."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from aimesh.grpc_edge import GrpcServer
from aimesh.v1 import ingest_pb2, ingest_pb2_grpc, notifier_pb2, notifier_pb2_grpc

# A field 1 (task_id / model_name) declared length-delimited whose length runs past the end of the body.
TRUNCATED = b"\x0a\x05ab"


class Ingest(ingest_pb2_grpc.IngestServiceServicer):
    async def SubmitTask(self, request: Any, context: Any) -> ingest_pb2.SubmitTaskResponse:
        return ingest_pb2.SubmitTaskResponse(task_id=f"got {request.model_name}")


class Notifier(notifier_pb2_grpc.NotifierServiceServicer):
    async def WatchTask(self, request: Any, context: Any) -> AsyncIterator[notifier_pb2.WatchTaskResponse]:
        yield notifier_pb2.WatchTaskResponse(state=notifier_pb2.TaskState(task_id=request.task_id))


@pytest.fixture
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    server = GrpcServer("127.0.0.1:0", ["aimesh.v1.IngestService", "aimesh.v1.NotifierService"])
    server.add(ingest_pb2_grpc.add_IngestServiceServicer_to_server, Ingest())
    server.add(notifier_pb2_grpc.add_NotifierServiceServicer_to_server, Notifier())
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield channel
    await server.stop(0)


def _raw(channel: grpc.aio.Channel, method: str, streaming: bool) -> Any:
    make = channel.unary_stream if streaming else channel.unary_unary
    return make(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)


async def test_a_unary_method_answers_invalid_argument_naming_the_message(channel: grpc.aio.Channel) -> None:
    call = _raw(channel, "/aimesh.v1.IngestService/SubmitTask", streaming=False)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call(TRUNCATED, timeout=5)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "aimesh.v1.SubmitTaskRequest" in (raised.value.details() or "")
    status = rpc_status.from_call(raised.value)  # type: ignore[arg-type]
    assert status is not None
    bad_request = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad_request)
    assert "aimesh.v1.SubmitTaskRequest" in bad_request.field_violations[0].description


async def test_a_streaming_method_answers_invalid_argument(channel: grpc.aio.Channel) -> None:
    call = _raw(channel, "/aimesh.v1.NotifierService/WatchTask", streaming=True)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in call(TRUNCATED, timeout=5):
            pass
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "aimesh.v1.WatchTaskRequest" in (raised.value.details() or "")


async def test_well_formed_requests_still_reach_the_servicer(channel: grpc.aio.Channel) -> None:
    call = _raw(channel, "/aimesh.v1.IngestService/SubmitTask", streaming=False)
    reply = ingest_pb2.SubmitTaskResponse.FromString(
        await call(ingest_pb2.SubmitTaskRequest(model_name="m").SerializeToString(), timeout=5)
    )
    assert reply.task_id == "got m"
    stream = _raw(channel, "/aimesh.v1.NotifierService/WatchTask", streaming=True)
    replies = [r async for r in stream(notifier_pb2.WatchTaskRequest(task_id="t").SerializeToString(), timeout=5)]
    assert notifier_pb2.WatchTaskResponse.FromString(replies[0]).state.task_id == "t"
