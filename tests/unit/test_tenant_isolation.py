"""Tenants in the notifier: a tenant sees only its own tasks, and another tenant's task is answered exactly like
a task that does not exist. The store directly, and the gRPC edge in process on port 0 with API keys on."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_status import rpc_status
from opentelemetry.instrumentation.grpc import aio_server_interceptor

from aimesh.auth import Authenticator, hash_key
from aimesh.grpc_edge import GrpcServer
from aimesh.notifier.service import NotifierServicer, StreamLimits
from aimesh.notifier.store import DENIED, TaskStore, Update
from aimesh.v1 import notifier_pb2, notifier_pb2_grpc, result_pb2, task_pb2

IDLE_S = 0.5  # the stream idle timeout: how long a watch of a task nobody may see stays open
KEYS = Authenticator.from_entries([("acme", hash_key("acme-key")), ("globex", hash_key("globex-key"))])
ACME = (("authorization", "Bearer acme-key"),)
GLOBEX = (("authorization", "Bearer globex-key"),)


def task(task_id: str, tenant: str) -> task_pb2.AITaskEvent:
    return task_pb2.AITaskEvent(schema_version=1, task_id=task_id, model_name="sleep", tenant=tenant)


def result(task_id: str, status: int, tenant: str = "") -> result_pb2.AIResultEvent:
    return result_pb2.AIResultEvent(schema_version=1, task_id=task_id, status=status, tenant=tenant)


@pytest.fixture
async def notifier() -> AsyncIterator[tuple[notifier_pb2_grpc.NotifierServiceStub, TaskStore]]:
    store = TaskStore(retention_s=60)
    ready = asyncio.Event()
    ready.set()
    # OpenTelemetry's interceptor in front, as with tracing on: it iterates streaming behaviours itself.
    server = GrpcServer(
        "127.0.0.1:0", ["aimesh.v1.NotifierService"], auth=KEYS, interceptors=[aio_server_interceptor()]
    )
    limits = StreamLimits(idle_timeout_s=IDLE_S)
    server.add(
        notifier_pb2_grpc.add_NotifierServiceServicer_to_server, NotifierServicer(store, ready=ready, limits=limits)
    )
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield notifier_pb2_grpc.NotifierServiceStub(channel), store
    await server.stop(0)


def answer(error: grpc.aio.AioRpcError) -> tuple[grpc.StatusCode, str | None, object]:
    """Everything a client can see of an error: code, message and the rich status details."""
    return error.code(), error.details(), rpc_status.from_call(error)


async def get_error(stub: notifier_pb2_grpc.NotifierServiceStub, task_id: str, metadata) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.GetTask(notifier_pb2.GetTaskRequest(task_id=task_id), metadata=metadata)
    return info.value


async def watch_error(stub: notifier_pb2_grpc.NotifierServiceStub, task_id: str, metadata) -> grpc.aio.AioRpcError:
    stream = stub.WatchTask(notifier_pb2.WatchTaskRequest(task_id=task_id), metadata=metadata)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for update in stream:
            pytest.fail(f"another tenant's update was delivered: {update}")
    return info.value


async def timed_watch_error(stub, task_id: str, metadata) -> tuple[grpc.aio.AioRpcError, float]:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    error = await watch_error(stub, task_id, metadata)
    return error, time.monotonic() - started


async def wait_watchers(store: TaskStore, count: int) -> None:
    for _ in range(100):
        if store.watcher_count() == count:
            return
        await asyncio.sleep(0.02)
    assert store.watcher_count() == count


# --- the store ----------------------------------------------------------------------------------------------


async def test_the_store_shows_a_task_only_to_its_tenant() -> None:
    store = TaskStore(retention_s=60)
    task_id = str(uuid.uuid4())
    mine, theirs = store.watch(task_id, "acme"), store.watch(task_id, "globex")
    store.apply_task(task(task_id, "acme"))
    assert store.get(task_id, "acme") is not None and store.get(task_id, "globex") is None
    assert isinstance(update := mine.get_nowait(), Update) and update.state.status == result_pb2.TASK_STATUS_QUEUED
    assert theirs.get_nowait() is DENIED and theirs.empty()
    store.apply_result(result(task_id, result_pb2.TASK_STATUS_SUCCEEDED, "acme"))
    assert theirs.empty()  # a denied watcher hears nothing more
    assert store.watch(task_id, "globex").get_nowait() is DENIED


async def test_updates_wait_until_the_tenant_is_known() -> None:
    store = TaskStore(retention_s=60)
    task_id = str(uuid.uuid4())
    mine, theirs = store.watch(task_id, "acme"), store.watch(task_id, "globex")
    store.apply_result(result(task_id, result_pb2.TASK_STATUS_RUNNING))  # a result without a tenant says nothing
    assert mine.empty() and theirs.empty()
    assert store.get(task_id, "acme") is None
    store.apply_task(task(task_id, "acme"))  # the task record, read later, names the tenant
    assert isinstance(update := mine.get_nowait(), Update) and update.state.status == result_pb2.TASK_STATUS_RUNNING
    assert mine.empty()  # the current state, once: the QUEUED of the late task record moves nothing back
    assert store.get(task_id, "acme") is not None
    assert theirs.get_nowait() is DENIED


async def test_a_result_carrying_the_tenant_is_enough() -> None:
    store = TaskStore(retention_s=60)
    task_id = str(uuid.uuid4())
    mine = store.watch(task_id, "acme")
    store.apply_result(result(task_id, result_pb2.TASK_STATUS_FAILED, "acme"))
    assert isinstance(update := mine.get_nowait(), Update) and update.state.status == result_pb2.TASK_STATUS_FAILED
    assert store.get(task_id, "globex") is None


async def test_task_records_without_a_tenant_are_the_default_tenants() -> None:
    store = TaskStore(retention_s=60, default_tenant="dev")
    task_id = str(uuid.uuid4())
    store.apply_task(task(task_id, ""))  # written before tenants existed
    assert store.get(task_id, "dev") is not None and store.get(task_id, "acme") is None


# --- the gRPC edge ------------------------------------------------------------------------------------------


async def test_get_task_of_another_tenant_answers_exactly_like_an_unknown_task(notifier) -> None:
    stub, store = notifier
    task_id = str(uuid.uuid4())
    unknown = answer(await get_error(stub, task_id, GLOBEX))
    store.apply_task(task(task_id, "acme"))
    assert (await stub.GetTask(notifier_pb2.GetTaskRequest(task_id=task_id), metadata=ACME)).state.task_id == task_id
    other_tenants = answer(await get_error(stub, task_id, GLOBEX))
    assert unknown[0] == grpc.StatusCode.NOT_FOUND
    assert other_tenants == unknown


async def test_watch_of_another_tenants_task_is_answered_like_an_unknown_task_in_the_same_time(notifier) -> None:
    stub, store = notifier
    known, nobodys = str(uuid.uuid4()), str(uuid.uuid4())
    store.apply_task(task(known, "acme"))
    store.apply_result(result(known, result_pb2.TASK_STATUS_RUNNING, "acme"))
    other, other_s = await timed_watch_error(stub, known, GLOBEX)
    unknown, unknown_s = await timed_watch_error(stub, nobodys, GLOBEX)
    assert other.code() == unknown.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # the idle timeout, for both
    assert answer(other) == answer(unknown)
    assert IDLE_S * 0.9 < other_s < IDLE_S * 4 and IDLE_S * 0.9 < unknown_s < IDLE_S * 4
    await wait_watchers(store, 0)


async def test_a_watched_task_found_to_be_another_tenants_goes_on_looking_unknown(notifier) -> None:
    stub, store = notifier
    later = str(uuid.uuid4())
    intruder = asyncio.create_task(timed_watch_error(stub, later, GLOBEX))
    owner = stub.WatchTask(notifier_pb2.WatchTaskRequest(task_id=later), metadata=ACME)
    await wait_watchers(store, 2)
    store.apply_result(result(later, result_pb2.TASK_STATUS_RUNNING))  # no tenant yet: nobody hears of it
    store.apply_task(task(later, "acme"))
    await wait_watchers(store, 1)  # the intruder's watcher is dropped; its stream waits on, as for no task
    store.apply_result(result(later, result_pb2.TASK_STATUS_SUCCEEDED, "acme"))
    statuses = [u.state.status async for u in owner]
    assert statuses == [result_pb2.TASK_STATUS_RUNNING, result_pb2.TASK_STATUS_SUCCEEDED]
    error, waited_s = await intruder
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED and waited_s > IDLE_S * 0.9
    await wait_watchers(store, 0)


async def test_the_notifier_needs_a_key_for_get_and_watch(notifier) -> None:
    stub, _ = notifier
    task_id = str(uuid.uuid4())
    assert (await get_error(stub, task_id, ())).code() == grpc.StatusCode.UNAUTHENTICATED
    assert (await watch_error(stub, task_id, (("authorization", "Bearer nope"),))).code() == (
        grpc.StatusCode.UNAUTHENTICATED
    )
