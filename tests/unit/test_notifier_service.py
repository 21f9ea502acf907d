"""The notifier gRPC edge in process on port 0, fed through its store (the Kafka feed is the seam)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest

from aimesh.grpc_edge import GrpcServer
from aimesh.notifier.service import NotifierServicer
from aimesh.notifier.store import TaskStore
from aimesh.v1 import notifier_pb2, notifier_pb2_grpc, result_pb2, task_pb2


@pytest.fixture
async def notifier() -> AsyncIterator[tuple[notifier_pb2_grpc.NotifierServiceStub, TaskStore, asyncio.Event]]:
    store = TaskStore(retention_s=60)
    ready = asyncio.Event()
    ready.set()
    server = GrpcServer("127.0.0.1:0", ["aimesh.v1.NotifierService"])
    server.add(notifier_pb2_grpc.add_NotifierServiceServicer_to_server, NotifierServicer(store, ready=ready))
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield notifier_pb2_grpc.NotifierServiceStub(channel), store, ready
    await server.stop(0)


def task(task_id: str) -> task_pb2.AITaskEvent:
    return task_pb2.AITaskEvent(schema_version=1, task_id=task_id, model_name="sleep")


def result(task_id: str, status: int, tenant: str = "default") -> result_pb2.AIResultEvent:
    return result_pb2.AIResultEvent(schema_version=1, task_id=task_id, status=status, worker_id="w", tenant=tenant)


async def test_watch_streams_updates_and_ends_after_the_terminal_one(notifier) -> None:
    stub, store, _ = notifier
    task_id = str(uuid.uuid4())
    stream = stub.WatchTask(notifier_pb2.WatchTaskRequest(task_id=task_id))

    async def feed() -> None:
        await asyncio.sleep(0.1)
        store.apply_task(task(task_id))
        store.apply_result(result(task_id, result_pb2.TASK_STATUS_RUNNING))
        store.apply_result(result(task_id, result_pb2.TASK_STATUS_SUCCEEDED))
        store.apply_result(result(task_id, result_pb2.TASK_STATUS_SUCCEEDED))  # a duplicate: not sent

    feeding = asyncio.create_task(feed())
    statuses = [update.state.status async for update in stream]
    await feeding
    assert statuses == [
        result_pb2.TASK_STATUS_QUEUED,
        result_pb2.TASK_STATUS_RUNNING,
        result_pb2.TASK_STATUS_SUCCEEDED,
    ]
    assert store.watcher_count() == 0


async def test_many_subscribers_each_get_the_result_and_cancel_frees_them(notifier) -> None:
    stub, store, _ = notifier
    task_id = str(uuid.uuid4())
    streams = [stub.WatchTask(notifier_pb2.WatchTaskRequest(task_id=task_id)) for _ in range(5)]
    abandoned = stub.WatchTask(notifier_pb2.WatchTaskRequest(task_id=str(uuid.uuid4())))
    for _ in range(50):
        if store.watcher_count() == 6:
            break
        await asyncio.sleep(0.02)
    assert store.watcher_count() == 6
    abandoned.cancel()
    store.apply_result(result(task_id, result_pb2.TASK_STATUS_FAILED))
    for stream in streams:
        updates = [u async for u in stream]
        assert [u.state.status for u in updates] == [result_pb2.TASK_STATUS_FAILED]
    for _ in range(50):
        if store.watcher_count() == 0:
            break
        await asyncio.sleep(0.02)
    assert store.watcher_count() == 0


async def test_get_task_answers_state_not_found_and_invalid_argument(notifier) -> None:
    stub, store, ready = notifier
    task_id = str(uuid.uuid4())
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.GetTask(notifier_pb2.GetTaskRequest(task_id=task_id))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    store.apply_task(task(task_id))
    reply = await stub.GetTask(notifier_pb2.GetTaskRequest(task_id=task_id))
    assert reply.state.status == result_pb2.TASK_STATUS_QUEUED and reply.state.model_name == "sleep"
    for bad in ("", "not-a-uuid"):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetTask(notifier_pb2.GetTaskRequest(task_id=bad))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    ready.clear()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.GetTask(notifier_pb2.GetTaskRequest(task_id=task_id))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
