"""Per-tenant quotas: the token bucket, the in-flight count, their settings, and the gRPC answers, with a fake
clock; ingest's results reader against a real broker is in tests/integration/test_admission.py."""

from __future__ import annotations

import threading

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from pydantic import ValidationError
from test_ingest_service import req, start_ingest

from aimesh.auth import Authenticator
from aimesh.ingest.quotas import InFlightTasks, RateLimit, RateQuotas, TokenBucket
from aimesh.metrics import IngestMetrics
from aimesh.settings import IngestSettings
from aimesh.v1 import ingest_pb2, ingest_pb2_grpc


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_allows_its_burst_then_its_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(RateLimit.of(2.0, burst=5), clock)
    assert [bucket.take(1) for _ in range(5)] == [0.0] * 5
    assert bucket.take(1) == pytest.approx(0.5)  # one token every half second
    clock.now += 0.5
    assert bucket.take(1) == 0.0
    assert bucket.take(2) == pytest.approx(1.0)  # all or nothing: none taken
    clock.now += 100
    assert bucket.take(5) == 0.0 and bucket.take(1) > 0  # refilled to the burst, not beyond


def test_a_batch_larger_than_the_burst_waits_for_a_full_bucket_and_leaves_it_in_debt() -> None:
    clock = Clock()
    bucket = TokenBucket(RateLimit.of(10.0, burst=10), clock)
    assert bucket.take(4) == 0.0
    assert bucket.take(25) == pytest.approx(0.4)  # until the bucket is full again
    clock.now += 0.4
    assert bucket.take(25) == 0.0
    assert bucket.take(1) == pytest.approx(1.6)  # 15 tokens of debt, then one more


def test_burst_0_means_one_seconds_worth() -> None:
    assert RateLimit.of(2.5).burst == 3
    assert RateLimit.of(0.2).burst == 1
    assert RateLimit.of(7, 30).burst == 30


def test_rate_quotas_are_per_tenant_with_overrides_and_0_is_unlimited() -> None:
    clock = Clock()
    quotas = RateQuotas(RateLimit.of(1.0, 1), {"big": RateLimit.of(100.0, 100), "free": RateLimit.of(0.0)}, clock=clock)
    assert quotas.take("a", 1) == 0.0 and quotas.take("a", 1) > 0
    assert quotas.take("b", 1) == 0.0  # a bucket of its own
    assert quotas.take("big", 100) == 0.0
    assert all(quotas.take("free", 1000) == 0.0 for _ in range(10))
    assert RateQuotas(RateLimit.of(0.0)).take("anyone", 10**6) == 0.0


def test_in_flight_tasks_hold_slots_until_their_result() -> None:
    tasks = InFlightTasks(3, {"vip": 0})
    first = tasks.reserve("a", 2)
    assert first is not None
    first.bind("t1")
    first.bind("t2")
    first.release()
    assert tasks.reserve("a", 2) is None  # 2 + 2 > 3: nothing held
    assert tasks.count("a") == 2
    tasks.finished("t1")
    tasks.finished("t1")  # a repeat is harmless
    tasks.finished("someone-elses")
    assert tasks.count("a") == 1
    second = tasks.reserve("a", 2)
    assert second is not None and tasks.count("a") == 3
    second.bind("t3")
    second.release()  # one slot unused (a duplicate, say): freed
    assert tasks.count("a") == 2
    second.unbind("t3")  # not accepted after all
    assert tasks.count("a") == 1 and len(tasks) == 1
    assert tasks.reserve("vip", 10_000) is not None  # 0: unlimited
    assert tasks.enabled and not InFlightTasks(0).enabled and InFlightTasks(0, {"x": 1}).enabled


def test_in_flight_tasks_are_forgotten_after_their_ttl() -> None:
    clock = Clock()
    tasks = InFlightTasks(1, ttl_s=60, clock=clock)
    held = tasks.reserve("a", 1)
    assert held is not None
    held.bind("lost")
    held.release()
    assert tasks.reserve("a", 1) is None
    clock.now += 61
    assert tasks.reserve("a", 1) is not None


def test_results_from_another_thread_free_slots_safely() -> None:
    tasks = InFlightTasks(10_000)
    ids = [f"t{i}" for i in range(5000)]
    held = tasks.reserve("a", len(ids))
    assert held is not None
    for task_id in ids:
        held.bind(task_id)
    threads = [threading.Thread(target=lambda part=ids[i::4]: [tasks.finished(t) for t in part]) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert tasks.count("a") == 0 and len(tasks) == 0


def test_quota_settings_parse_overrides_and_refuse_malformed_ones() -> None:
    settings = IngestSettings(
        tenant_rate_overrides="acme=50:200, small=5", tenant_max_concurrent_overrides="acme=500,small=0"
    )
    assert settings.rate_overrides == {"acme": (50.0, 200), "small": (5.0, 0)}
    assert settings.max_concurrent_overrides == {"acme": 500, "small": 0}
    for bad in (
        {"tenant_rate_overrides": "acme=fast"},
        {"tenant_rate_overrides": "acme"},
        {"tenant_rate_overrides": "acme=-1"},
        {"tenant_max_concurrent_overrides": "acme=1.5"},
        {"tenant_max_concurrent_overrides": "not a tenant=1"},
    ):
        with pytest.raises(ValidationError):
            IngestSettings(**bad)  # type: ignore[arg-type]


def details(error: grpc.aio.AioRpcError) -> tuple[float, error_details_pb2.ErrorInfo, error_details_pb2.QuotaFailure]:
    status = rpc_status.from_call(error)
    assert status is not None
    retry, info, quota = error_details_pb2.RetryInfo(), error_details_pb2.ErrorInfo(), error_details_pb2.QuotaFailure()
    assert status.details[0].Unpack(retry) and status.details[1].Unpack(info) and status.details[2].Unpack(quota)
    return retry.retry_delay.ToTimedelta().total_seconds(), info, quota


async def test_a_tenant_over_its_rate_gets_resource_exhausted_and_a_batch_counts_every_task() -> None:
    clock = Clock()
    quotas = RateQuotas(RateLimit.of(2.0, 3), clock=clock)
    metrics = IngestMetrics()
    server, producer = await start_ingest(auth=Authenticator.disabled("acme"), rate_quotas=quotas, metrics=metrics)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = ingest_pb2_grpc.IngestServiceStub(channel)
            await stub.SubmitTasks(ingest_pb2.SubmitTasksRequest(tasks=[req(), req()]))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.SubmitTasks(ingest_pb2.SubmitTasksRequest(tasks=[req(), req()]))  # 1 token left: none
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            delay, error, quota = details(info.value)
            assert delay == pytest.approx(0.5)
            assert error.reason == "TENANT_RATE_LIMITED" and error.metadata["tenant"] == "acme"
            assert quota.violations[0].subject == "tenant:acme"
            assert len(producer.records) == 2
            assert metrics.tasks_rejected.labels("tenant_rate_limited")._value.get() == 2
            await stub.SubmitTask(req())  # the one token left
            clock.now += 1.0
            await stub.SubmitTasks(ingest_pb2.SubmitTasksRequest(tasks=[req(), req()]))
            assert len(producer.records) == 5
    finally:
        await server.stop(0)


async def test_a_tenant_at_its_concurrency_limit_waits_for_its_tasks_to_finish() -> None:
    tasks = InFlightTasks(3)
    server, producer = await start_ingest(auth=Authenticator.disabled("acme"), in_flight=tasks)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = ingest_pb2_grpc.IngestServiceStub(channel)
            reply = await stub.SubmitTasks(ingest_pb2.SubmitTasksRequest(tasks=[req(), req(idempotency_key="k")]))
            assert tasks.count("acme") == 2
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.SubmitTasks(ingest_pb2.SubmitTasksRequest(tasks=[req(), req()]))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            delay, error, quota = details(info.value)
            assert delay >= 1.0
            assert error.reason == "TENANT_CONCURRENCY_LIMITED"
            assert dict(error.metadata) == {"tenant": "acme", "limit": "3", "in_flight": "2"}
            assert "3" in quota.violations[0].description
            assert len(producer.records) == 2
            again = await stub.SubmitTask(req(idempotency_key="k"))  # a repeat takes no slot
            assert again.duplicate and tasks.count("acme") == 2
            tasks.finished(reply.tasks[0].task_id)  # its result was read
            await stub.SubmitTasks(ingest_pb2.SubmitTasksRequest(tasks=[req(), req()]))
            assert tasks.count("acme") == 3
    finally:
        await server.stop(0)


async def test_a_task_the_broker_did_not_acknowledge_frees_its_slot() -> None:
    tasks = InFlightTasks(1)
    server, producer = await start_ingest(in_flight=tasks)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = ingest_pb2_grpc.IngestServiceStub(channel)
            producer.fail = True
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.SubmitTask(req())
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            producer.fail = False
            await stub.SubmitTask(req())  # the failed task's slot was given back
            assert len(tasks) == 1
    finally:
        await server.stop(0)
