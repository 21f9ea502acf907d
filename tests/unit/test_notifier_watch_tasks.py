"""WatchTask resume and WatchTasks at the notifier's gRPC edge, in process on port 0 with API keys on, fed
through its store (the Kafka feed is the seam)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from opentelemetry.instrumentation.grpc import aio_server_interceptor

from aimesh.auth import Authenticator, hash_key
from aimesh.grpc_edge import GrpcServer
from aimesh.notifier.service import NotifierServicer, StreamLimits
from aimesh.notifier.store import TaskStore
from aimesh.v1 import notifier_pb2, notifier_pb2_grpc, result_pb2, task_pb2

KEYS = Authenticator.from_entries([("acme", hash_key("acme-key")), ("globex", hash_key("globex-key"))])
ACME = (("authorization", "Bearer acme-key"),)
RUNNING, SUCCEEDED = result_pb2.TASK_STATUS_RUNNING, result_pb2.TASK_STATUS_SUCCEEDED
LIMIT = 4  # subscriptions per connection


@pytest.fixture
async def notifier() -> AsyncIterator[tuple[notifier_pb2_grpc.NotifierServiceStub, TaskStore]]:
    store = TaskStore(retention_s=60)
    ready = asyncio.Event()
    ready.set()
    limits = StreamLimits(max_per_connection=LIMIT, max_per_tenant=100, idle_timeout_s=1.0)
    server = GrpcServer(
        "127.0.0.1:0", ["aimesh.v1.NotifierService"], auth=KEYS, interceptors=[aio_server_interceptor()]
    )
    server.add(
        notifier_pb2_grpc.add_NotifierServiceServicer_to_server, NotifierServicer(store, ready=ready, limits=limits)
    )
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield notifier_pb2_grpc.NotifierServiceStub(channel), store
    await server.stop(0)


def submitted(store: TaskStore, tenant: str = "acme") -> str:
    task_id = str(uuid.uuid4())
    store.apply_task(task_pb2.AITaskEvent(schema_version=1, task_id=task_id, model_name="generate", tenant=tenant))
    return task_id


def update(
    task_id: str, status: int, sequence: int, token: str = "", *, partial: bool = False
) -> result_pb2.AIResultEvent:
    event = result_pb2.AIResultEvent(
        schema_version=1, task_id=task_id, status=status, sequence=sequence, partial=partial, tenant="acme"
    )
    if token:
        event.output.tensors.add(name="TEXT", datatype="BYTES", shape=[1], string_data=[token])
    return event


async def wait_watchers(store: TaskStore, count: int) -> None:
    for _ in range(100):
        if store.watcher_count() == count:
            return
        await asyncio.sleep(0.02)
    assert store.watcher_count() == count


def watch_tasks(stub: notifier_pb2_grpc.NotifierServiceStub, *tasks: tuple[str, int]):  # type: ignore[no-untyped-def]
    request = notifier_pb2.WatchTasksRequest(
        tasks=[notifier_pb2.WatchTaskRequest(task_id=t, after_sequence=after) for t, after in tasks]
    )
    return stub.WatchTasks(request, metadata=ACME)


async def test_a_dropped_watch_resumes_after_its_last_sequence_with_no_gap_or_repeat(notifier) -> None:
    stub, store = notifier
    task_id = submitted(store)
    first = stub.WatchTask(notifier_pb2.WatchTaskRequest(task_id=task_id), metadata=ACME)
    seen = [(await first.read()).state]
    store.apply_result(update(task_id, RUNNING, 2))
    store.apply_result(update(task_id, RUNNING, 3, " one", partial=True))
    seen += [(await first.read()).state, (await first.read()).state]
    first.cancel()  # the connection drops
    await wait_watchers(store, 0)
    store.apply_result(update(task_id, RUNNING, 4, " two", partial=True))
    store.apply_result(update(task_id, RUNNING, 4, " two", partial=True))  # a rerun's duplicate
    resumed = stub.WatchTask(
        notifier_pb2.WatchTaskRequest(task_id=task_id, after_sequence=seen[-1].sequence), metadata=ACME
    )
    await wait_watchers(store, 1)
    store.apply_result(update(task_id, SUCCEEDED, 5, " one two"))
    seen += [u.state async for u in resumed]
    assert [s.sequence for s in seen] == [1, 2, 3, 4, 5]
    assert [s.result.partial for s in seen] == [False, False, True, True, False]
    assert seen[-1].status == SUCCEEDED and seen[-1].result.output.tensors[0].string_data == [" one two"]
    await wait_watchers(store, 0)


async def test_watch_tasks_delivers_every_tasks_updates_and_ends_after_the_last_terminal(notifier) -> None:
    stub, store = notifier
    ids = [submitted(store) for _ in range(3)]
    stream = watch_tasks(stub, (ids[0], 0), (ids[1], 1), (ids[2], 0))
    await wait_watchers(store, 3)
    for i, task_id in enumerate(ids):
        store.apply_result(update(task_id, RUNNING, 2))
        store.apply_result(update(task_id, SUCCEEDED, 3, f"r{i}"))
    got = [(u.state.task_id, u.state.sequence) async for u in stream]
    for task_id, after in zip(ids, (0, 1, 0), strict=True):
        mine = [seq for t, seq in got if t == task_id]
        assert mine == ([1, 2, 3] if after == 0 else [2, 3])
    await wait_watchers(store, 0)


async def test_watch_tasks_of_tasks_that_ended_long_ago_and_after_their_end(notifier) -> None:
    stub, store = notifier
    done, seen_done = submitted(store), submitted(store)
    for task_id in (done, seen_done):
        store.apply_result(update(task_id, SUCCEEDED, 3, "x"))
    # The terminal state of one, nothing of the other (the client saw its end already); then the stream ends.
    got = [(u.state.task_id, u.state.sequence) async for u in watch_tasks(stub, (done, 0), (seen_done, 3))]
    assert got == [(done, 3)]


async def test_watch_tasks_refuses_bad_requests_with_invalid_argument(notifier) -> None:
    stub, store = notifier
    task_id = submitted(store)
    bad_requests = {
        "tasks": [],
        "tasks[1].task_id": [(task_id, 0), (task_id, 2)],
        "tasks[0].task_id": [("not-a-uuid", 0)],
    }
    for field, tasks in bad_requests.items():
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await watch_tasks(stub, *tasks).read()
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        status = rpc_status.from_call(info.value)
        bad = error_details_pb2.BadRequest()
        assert status is not None and status.details[0].Unpack(bad)
        assert bad.field_violations[0].field == field
    too_many = [(str(uuid.uuid4()), 0) for _ in range(LIMIT + 1)]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await watch_tasks(stub, *too_many).read()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and str(LIMIT) in (info.value.details() or "")
    assert store.watcher_count() == 0


async def test_each_watched_task_counts_against_the_limits_until_it_ends(notifier) -> None:
    stub, store = notifier
    ids = [submitted(store) for _ in range(3)]
    many = watch_tasks(stub, *[(t, 1) for t in ids])  # three of the connection's four places
    await wait_watchers(store, 3)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await watch_tasks(stub, (submitted(store), 0), (submitted(store), 0)).read()
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    store.apply_result(update(ids[0], SUCCEEDED, 3, "x"))  # an ended task frees its place at once
    assert (await many.read()).state.task_id == ids[0]
    await wait_watchers(store, 2)
    pair = watch_tasks(stub, (submitted(store), 0), (submitted(store), 0))
    assert (await pair.read()).state.sequence == 1
    pair.cancel()
    many.cancel()
    await wait_watchers(store, 0)


async def test_watch_tasks_treats_another_tenants_task_as_an_unknown_one(notifier) -> None:
    stub, store = notifier

    async def watched_with(other: str) -> tuple[list[str], grpc.StatusCode, float]:
        mine = submitted(store)
        stream = watch_tasks(stub, (mine, 0), (other, 0))
        started, seen = time.monotonic(), []
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for item in stream:
                seen.append(item.state.task_id)
                store.apply_result(update(mine, SUCCEEDED, 3, "x"))
        return seen, info.value.code(), time.monotonic() - started

    theirs = await watched_with(submitted(store, "globex"))
    unknown = await watched_with(str(uuid.uuid4()))
    # Both: my task to its end, then the stream waits on the other until the idle timeout (1 s).
    assert len(theirs[0]) == len(unknown[0]) == 2
    assert theirs[1] == unknown[1] == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0.9 < theirs[2] < 4 and 0.9 < unknown[2] < 4
    await wait_watchers(store, 0)


async def test_watch_tasks_ends_after_the_idle_timeout(notifier) -> None:
    stub, store = notifier
    stream = watch_tasks(stub, (str(uuid.uuid4()), 0), (str(uuid.uuid4()), 0))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stream.read()
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "after_sequence" in (info.value.details() or "")
    await wait_watchers(store, 0)
