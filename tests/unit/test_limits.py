"""Limits that protect the gRPC services: message size, open WatchTask streams per connection and per tenant,
and the idle timeout of a stream. In-process servers on port 0."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from test_ingest_service import req, start_ingest
from test_tenant_isolation import wait_watchers

from aimesh.auth import Authenticator, hash_key
from aimesh.grpc_edge import GrpcServer
from aimesh.notifier.service import NotifierServicer, StreamLimits
from aimesh.notifier.store import TaskStore
from aimesh.settings import IngestSettings
from aimesh.v1 import ingest_pb2_grpc, notifier_pb2, notifier_pb2_grpc, result_pb2, task_pb2

KEYS = Authenticator.from_entries([("acme", hash_key("acme-key")), ("globex", hash_key("globex-key"))])
ACME = (("authorization", "Bearer acme-key"),)
GLOBEX = (("authorization", "Bearer globex-key"),)


async def test_a_message_over_the_limit_is_resource_exhausted() -> None:
    server, _ = await start_ingest(max_text_bytes=1 << 20, max_message_bytes=16 << 10)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = ingest_pb2_grpc.IngestServiceStub(channel)
            assert (await stub.SubmitTask(req("x" * (15 << 10)))).task_id
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.SubmitTask(req("x" * (17 << 10)))
    finally:
        await server.stop(0)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_ingest_settings_keep_the_largest_text_within_a_message() -> None:
    with pytest.raises(ValueError, match="AIMESH_MAX_MESSAGE_BYTES"):
        IngestSettings(max_text_bytes=8 << 20, max_message_bytes=4 << 20)
    assert (
        IngestSettings(max_text_bytes=8 << 20, max_message_bytes=9 << 20, max_record_bytes=8 << 20).max_message_bytes
        == 9 << 20
    )


def test_ingest_settings_keep_the_largest_text_within_a_record() -> None:
    with pytest.raises(ValueError, match="AIMESH_MAX_RECORD_BYTES"):
        IngestSettings(max_text_bytes=2_000_000, max_message_bytes=4 << 20, max_record_bytes=1_000_000)
    assert IngestSettings().max_text_bytes <= IngestSettings().max_record_bytes


@pytest.fixture
async def notifier(request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, TaskStore]]:
    """A notifier with small limits; its idle timeout (seconds) is the fixture's parameter, 60 by default."""
    store = TaskStore(retention_s=60)
    ready = asyncio.Event()
    ready.set()
    limits = StreamLimits(max_per_connection=2, max_per_tenant=3, idle_timeout_s=getattr(request, "param", 60.0))
    server = GrpcServer("127.0.0.1:0", ["aimesh.v1.NotifierService"], auth=KEYS)
    servicer = NotifierServicer(store, ready=ready, limits=limits)
    server.add(notifier_pb2_grpc.add_NotifierServiceServicer_to_server, servicer)
    await server.start()
    yield f"127.0.0.1:{server.port}", store
    await server.stop(0)


def watch(channel: grpc.aio.Channel, metadata, task_id: str | None = None):  # type: ignore[no-untyped-def]
    stub = notifier_pb2_grpc.NotifierServiceStub(channel)
    return stub.WatchTask(notifier_pb2.WatchTaskRequest(task_id=task_id or str(uuid.uuid4())), metadata=metadata)


async def refusal(stream) -> grpc.aio.AioRpcError:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stream.read()
    return info.value


async def test_open_streams_are_limited_per_connection_and_per_tenant(notifier) -> None:
    address, store = notifier
    # Each channel its own connection: gRPC otherwise shares one between channels to the same address.
    own_connection = [("grpc.use_local_subchannel_pool", 1)]
    async with (
        grpc.aio.insecure_channel(address, options=own_connection) as first,
        grpc.aio.insecure_channel(address, options=own_connection) as second,
        grpc.aio.insecure_channel(address, options=own_connection) as third,
    ):
        held = [watch(first, ACME), watch(first, ACME)]
        await wait_watchers(store, 2)
        error = await refusal(watch(first, ACME))  # a third stream on one connection
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "connection" in (error.details() or "") and "2" in (error.details() or "")
        status = rpc_status.from_call(error)
        quota = error_details_pb2.QuotaFailure()
        assert status is not None and any(d.Unpack(quota) for d in status.details)
        assert quota.violations[0].subject == "connection"

        held.append(watch(second, ACME))  # another connection: fine, the tenant's third stream
        await wait_watchers(store, 3)
        error = await refusal(watch(third, ACME))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "tenant" in (error.details() or "")
        held.append(watch(third, GLOBEX))  # another tenant: fine
        await wait_watchers(store, 4)

        held[0].cancel()  # a closed stream frees its place
        await wait_watchers(store, 3)
        held.append(watch(first, ACME))
        await wait_watchers(store, 4)
        for stream in held:
            stream.cancel()
    await wait_watchers(store, 0)


@pytest.mark.parametrize("notifier", [0.5], indirect=True)
async def test_a_stream_without_updates_ends_after_the_idle_timeout(notifier) -> None:
    address, store = notifier
    task_id = str(uuid.uuid4())
    async with grpc.aio.insecure_channel(address) as channel:
        started = time.monotonic()
        error = await refusal(watch(channel, ACME))
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "watch again" in (error.details() or "")
        assert 0.4 < time.monotonic() - started < 5

        # Updates keep a stream alive: each one restarts the idle clock.
        stream = watch(channel, ACME, task_id)
        await wait_watchers(store, 1)
        event = task_pb2.AITaskEvent(schema_version=1, task_id=task_id, model_name="sleep", tenant="acme")
        store.apply_task(event)
        assert (await stream.read()).state.status == result_pb2.TASK_STATUS_QUEUED
        await asyncio.sleep(0.3)
        store.apply_result(result_pb2.AIResultEvent(task_id=task_id, status=result_pb2.TASK_STATUS_RUNNING))
        assert (await stream.read()).state.status == result_pb2.TASK_STATUS_RUNNING
        await asyncio.sleep(0.3)
        store.apply_result(result_pb2.AIResultEvent(task_id=task_id, status=result_pb2.TASK_STATUS_SUCCEEDED))
        assert (await stream.read()).state.status == result_pb2.TASK_STATUS_SUCCEEDED
    await wait_watchers(store, 0)
