"""Slow and hostile subscribers at the notifier's gRPC edge, in process on port 0 with API keys on, fed through
its store: bounded stream buffers, a send timeout, a memory cap, the per-connection cap and task id spellings."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from opentelemetry.instrumentation.grpc import aio_server_interceptor

from aimesh.auth import Authenticator, hash_key
from aimesh.client import AsyncClient
from aimesh.grpc_edge import ConnectionPolicy, GrpcServer
from aimesh.metrics import NotifierMetrics
from aimesh.notifier.buffers import BufferLimits, StreamBuffer, SubscriptionMemory
from aimesh.notifier.service import Cancellations, NotifierServicer, StreamLimits
from aimesh.notifier.store import ENDED, TaskStore, Update
from aimesh.v1 import notifier_pb2, notifier_pb2_grpc, result_pb2, task_pb2

KEYS = Authenticator.from_entries([("acme", hash_key("acme-key")), ("globex", hash_key("globex-key"))])
ACME = (("authorization", "Bearer acme-key"),)
GLOBEX = (("authorization", "Bearer globex-key"),)
RUNNING, SUCCEEDED = result_pb2.TASK_STATUS_RUNNING, result_pb2.TASK_STATUS_SUCCEEDED
TOKEN_BYTES = 100_000
SEND_TIMEOUT_S = 0.5


@dataclass
class Notifier:
    stub: notifier_pb2_grpc.NotifierServiceStub
    store: TaskStore
    servicer: NotifierServicer
    metrics: NotifierMetrics
    port: int


class SilentProducer:
    async def produce(self, topic: str, *, key: str, value: bytes, headers: object = None) -> object:
        return None


async def start_notifier(
    limits: StreamLimits, connections: ConnectionPolicy | None = None
) -> tuple[GrpcServer, Notifier]:
    store = TaskStore(retention_s=60)
    ready = asyncio.Event()
    ready.set()
    metrics = NotifierMetrics()
    servicer = NotifierServicer(
        store,
        ready=ready,
        metrics=metrics,
        limits=limits,
        cancels=Cancellations(SilentProducer(), "cancels"),
        cancel_wait_s=0.3,
    )
    server = GrpcServer(
        "127.0.0.1:0",
        ["aimesh.v1.NotifierService"],
        auth=KEYS,
        interceptors=[aio_server_interceptor()],
        connections=connections,
    )
    server.add(notifier_pb2_grpc.add_NotifierServiceServicer_to_server, servicer)
    await server.start()
    return server, Notifier(None, store, servicer, metrics, server.port)  # type: ignore[arg-type]


@pytest.fixture
async def notifier(request: pytest.FixtureRequest) -> AsyncIterator[Notifier]:
    limits = getattr(request, "param", None) or StreamLimits(
        idle_timeout_s=30,
        send_timeout_s=SEND_TIMEOUT_S,
        buffer=BufferLimits(max_bytes=3 * (TOKEN_BYTES + 200), max_items=100),  # three outputs, not four
        max_total_buffer_bytes=64 << 20,
    )
    server, notifier = await start_notifier(limits)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{notifier.port}") as channel:
        notifier.stub = notifier_pb2_grpc.NotifierServiceStub(channel)
        yield notifier
    await server.stop(0)


def submitted(store: TaskStore, tenant: str = "acme") -> str:
    task_id = str(uuid.uuid4())
    store.apply_task(task_pb2.AITaskEvent(schema_version=1, task_id=task_id, model_name="generate", tenant=tenant))
    return task_id


def output(task_id: str, sequence: int, *, status: int = RUNNING, size: int = TOKEN_BYTES) -> result_pb2.AIResultEvent:
    event = result_pb2.AIResultEvent(
        schema_version=1, task_id=task_id, status=status, sequence=sequence, partial=status == RUNNING, tenant="acme"
    )
    event.output.tensors.add(name="TEXT", datatype="BYTES", shape=[1], string_data=["x" * size])
    return event


async def until(condition, timeout_s: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def held(notifier: Notifier) -> tuple[int, int]:
    """What the notifier holds for streams: store watchers and buffered bytes."""
    return notifier.store.watcher_count(), notifier.servicer.memory.used_bytes


# --- buffers ------------------------------------------------------------------------------------------------


def update_of(size: int) -> Update:
    state = notifier_pb2.TaskState(task_id="t")
    state.result.output.tensors.add(string_data=["x" * size])
    return Update(state)


async def test_a_stream_buffer_holds_exactly_its_bytes_then_takes_nothing_more() -> None:
    update = update_of(1000)
    memory = SubscriptionMemory(1 << 20)
    for max_bytes, fits in ((3 * update.size_bytes, 3), (3 * update.size_bytes - 1, 2)):
        buffer = StreamBuffer(BufferLimits(max_bytes=max_bytes, max_items=100), memory)
        for _ in range(5):
            buffer.offer("t", update)
        assert (len(buffer), buffer.size_bytes, buffer.full) == (fits, fits * update.size_bytes, True)
        assert memory.used_bytes == fits * update.size_bytes
        buffer.offer("t", ENDED)  # nothing after it was full, not even a control item
        assert [await buffer.next() for _ in range(fits + 1)] == [("t", update)] * fits + [None]
        assert memory.used_bytes == 0
    counted = StreamBuffer(BufferLimits(max_bytes=1 << 20, max_items=2), memory)
    for _ in range(3):
        counted.offer("t", update)
    assert len(counted) == 2 and counted.full


async def test_an_empty_buffer_takes_one_update_over_its_bound_but_never_past_the_total() -> None:
    big = update_of(5000)
    memory = SubscriptionMemory(big.size_bytes + 10)
    first = StreamBuffer(BufferLimits(max_bytes=100, max_items=10), memory)
    first.offer("t", big)
    assert len(first) == 1 and memory.used_bytes == big.size_bytes
    second = StreamBuffer(BufferLimits(max_bytes=1 << 20, max_items=10), memory)
    second.offer("t", big)
    assert len(second) == 0 and second.full and memory.used_bytes == big.size_bytes
    first.close()
    assert memory.used_bytes == 0


async def test_every_watcher_of_a_task_is_handed_the_same_update_objects() -> None:
    store = TaskStore(retention_s=60)
    task_id = submitted(store)
    store.apply_result(output(task_id, 3))
    got: list[list[Update]] = [[], []]
    for i, seen in enumerate(got):
        store.subscribe(task_id, i, seen.append, "acme")  # type: ignore[arg-type]
    store.apply_result(output(task_id, 4, status=SUCCEEDED))
    assert len(got[0]) == len(got[1]) == 2  # the partial output so far, then the terminal update
    assert all(a is b for a, b in zip(got[0], got[1], strict=True))


# --- streams ------------------------------------------------------------------------------------------------


async def test_a_stream_that_falls_behind_sends_what_it_holds_ends_resource_exhausted_and_resumes_without_gap(
    notifier: Notifier,
) -> None:
    task_id = submitted(notifier.store)
    stream = notifier.stub.WatchTask(notifier_pb2.WatchTaskRequest(task_id=task_id, after_sequence=1), metadata=ACME)
    await until(lambda: notifier.store.watcher_count() == 1)
    for sequence in range(3, 9):  # six outputs at once: three fit the stream's buffer
        notifier.store.apply_result(output(task_id, sequence))
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for response in stream:
            received.append(response.state.sequence)
    assert received == [3, 4, 5]
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "after_sequence" in (info.value.details() or "") and f"{task_id}: 5" in (info.value.details() or "")
    status = rpc_status.from_call(info.value)
    reason = error_details_pb2.ErrorInfo()
    assert status is not None and status.details[0].Unpack(reason) and reason.reason == "STREAM_BEHIND"
    await until(lambda: held(notifier) == (0, 0))

    notifier.store.apply_result(output(task_id, 9, status=SUCCEEDED, size=10))
    resumed = notifier.stub.WatchTask(notifier_pb2.WatchTaskRequest(task_id=task_id, after_sequence=5), metadata=ACME)
    rest = []
    with pytest.raises(grpc.aio.AioRpcError):  # the kept history, three at a time again
        async for response in resumed:
            rest.append(response.state.sequence)
    last = notifier.stub.WatchTask(
        notifier_pb2.WatchTaskRequest(task_id=task_id, after_sequence=rest[-1]), metadata=ACME
    )
    rest += [response.state.sequence async for response in last]
    assert rest == [6, 7, 8, 9]


async def test_the_client_library_resumes_a_stream_that_fell_behind(notifier: Notifier) -> None:
    task_id = submitted(notifier.store)
    for sequence in range(3, 10):
        notifier.store.apply_result(output(task_id, sequence))
    notifier.store.apply_result(output(task_id, 10, status=SUCCEEDED, size=10))
    async with AsyncClient("127.0.0.1:1", f"127.0.0.1:{notifier.port}", api_key="acme-key") as client:
        sequences = [state.sequence async for state in client.watch(task_id, after_sequence=1, timeout_s=10)]
    assert sequences == list(range(3, 11))


async def test_a_client_that_never_reads_is_cut_off_within_the_send_timeout_and_freed(notifier: Notifier) -> None:
    task_id = submitted(notifier.store)
    stream = notifier.stub.WatchTask(notifier_pb2.WatchTaskRequest(task_id=task_id, after_sequence=1), metadata=ACME)
    # and never a read
    await until(lambda: notifier.store.watcher_count() == 1)
    # Fed two at a time, within the buffer, while the stream keeps up: far more than the HTTP/2 windows take.
    sequence, stalled, deadline = 3, None, time.monotonic() + 30
    while notifier.store.watcher_count():
        assert time.monotonic() < deadline, "the stream was never cut off"
        if notifier.servicer.memory.used_bytes == 0:
            stalled = None
            for _ in range(2):
                notifier.store.apply_result(output(task_id, sequence))
                sequence += 1
        elif stalled is None:
            stalled = time.monotonic()  # updates wait: the write in progress does not complete
        await asyncio.sleep(0.01)
    assert stalled is not None and time.monotonic() - stalled < SEND_TIMEOUT_S * 4
    assert held(notifier) == (0, 0)
    assert notifier.metrics.registry.get_sample_value("aimesh_notifier_active_subscriptions") == 0
    stream.cancel()


async def test_new_streams_are_refused_with_quota_failure_while_the_buffers_are_full(notifier: Notifier) -> None:
    memory = notifier.servicer.memory
    task_id = submitted(notifier.store)
    memory.take(memory.max_bytes - 3 * (TOKEN_BYTES + 200) + 1)  # as slow streams would: less than one stream's room
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await notifier.stub.WatchTask(notifier_pb2.WatchTaskRequest(task_id=task_id), metadata=ACME).read()
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    status = rpc_status.from_call(info.value)
    quota, retry = error_details_pb2.QuotaFailure(), error_details_pb2.RetryInfo()
    assert status is not None and status.details[1].Unpack(quota) and status.details[2].Unpack(retry)
    assert quota.violations[0].subject == "notifier" and notifier.store.watcher_count() == 0
    memory.give(1)
    assert (
        await notifier.stub.WatchTask(notifier_pb2.WatchTaskRequest(task_id=task_id), metadata=ACME).read()
    ).state.sequence == 1


@pytest.mark.parametrize("notifier", [StreamLimits(max_per_connection=2, max_per_tenant=100)], indirect=True)
async def test_the_connection_cap_counts_each_tenant_on_a_shared_connection_apart(notifier: Notifier) -> None:
    # One connection carrying two tenants' calls, as a proxy's connection does.
    acme = [notifier.stub.WatchTask(notifier_pb2.WatchTaskRequest(task_id=submitted(notifier.store)), metadata=ACME)]
    acme.append(
        notifier.stub.WatchTask(notifier_pb2.WatchTaskRequest(task_id=submitted(notifier.store)), metadata=ACME)
    )
    for stream in acme:
        await stream.read()
    globex_task = submitted(notifier.store, "globex")
    globex = notifier.stub.WatchTask(notifier_pb2.WatchTaskRequest(task_id=globex_task), metadata=GLOBEX)
    assert (await globex.read()).state.task_id == globex_task
    third = notifier.stub.WatchTask(notifier_pb2.WatchTaskRequest(task_id=submitted(notifier.store)), metadata=ACME)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await third.read()
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "connection" in (info.value.details() or "")
    for stream in (*acme, globex):
        stream.cancel()


async def test_a_connection_past_its_maximum_age_is_closed_after_the_grace() -> None:
    server, notifier = await start_notifier(
        StreamLimits(idle_timeout_s=60), ConnectionPolicy(max_age_s=0.3, max_age_grace_s=0.3)
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{notifier.port}") as channel:
            stub = notifier_pb2_grpc.NotifierServiceStub(channel)
            stream = stub.WatchTask(notifier_pb2.WatchTaskRequest(task_id=str(uuid.uuid4())), metadata=ACME)
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stream.read()
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() - started < 5
            await until(lambda: notifier.store.watcher_count() == 0)
    finally:
        await server.stop(0)


# --- task ids -----------------------------------------------------------------------------------------------


def spellings(task_id: str) -> list[str]:
    hexits = uuid.UUID(task_id).hex
    return [task_id.upper(), f"{{{task_id}}}", f"urn:uuid:{task_id}", hexits]


async def test_every_method_refuses_other_spellings_of_a_task_id(notifier: Notifier) -> None:
    task_id = submitted(notifier.store)
    stub = notifier.stub
    for spelling in spellings(task_id):
        calls = {
            "GetTask": stub.GetTask(notifier_pb2.GetTaskRequest(task_id=spelling), metadata=ACME),
            "CancelTask": stub.CancelTask(notifier_pb2.CancelTaskRequest(task_id=spelling), metadata=ACME),
            "WatchTask": stub.WatchTask(notifier_pb2.WatchTaskRequest(task_id=spelling), metadata=ACME).read(),
            "WatchTasks": stub.WatchTasks(
                notifier_pb2.WatchTasksRequest(tasks=[notifier_pb2.WatchTaskRequest(task_id=spelling)]), metadata=ACME
            ).read(),
        }
        for method, call in calls.items():
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, spelling)
            assert "canonical" in (info.value.details() or "") or method == "WatchTasks"
    assert (await stub.GetTask(notifier_pb2.GetTaskRequest(task_id=task_id), metadata=ACME)).state.task_id == task_id
    assert notifier.store.watcher_count() == 0
