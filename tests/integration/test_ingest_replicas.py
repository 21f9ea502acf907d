"""Two ingest and two notifier replicas on a real stack of their own (``ingest_replicas=2``, ``notifier_replicas=2``):
both ingest replicas accept tasks that complete, a client given both lists spreads its calls over them, and tenant
rate quotas hold per replica, so a tenant gets twice its burst in total through a client that round-robins (the
effective total the README states)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from aimesh.auth import hash_key, new_key
from aimesh.client import AsyncClient
from aimesh.client.targets import ROUND_ROBIN
from aimesh.devstack.stack import Stack, StackSettings
from aimesh.v1 import ingest_pb2, ingest_pb2_grpc, result_pb2, task_pb2

from .mesh_client import metric_total

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

BURST = 3
# A rate this low puts no token back while a test runs: what is accepted is the burst alone.
RATE = f"0.001:{BURST}"
KEYS = {tenant: new_key() for tenant in ("free", "direct", "spread")}
ENV = {
    "AIMESH_AUTH": "on",
    "AIMESH_API_KEYS": ",".join(f"{tenant}:{hash_key(key)}" for tenant, key in KEYS.items()),
    "AIMESH_TENANT_RATE_OVERRIDES": f"direct={RATE},spread={RATE}",
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    settings = StackSettings.on_free_ports(
        tmp_path_factory.mktemp("replicas"),
        workers=1,
        tasks_partitions=2,
        results_partitions=2,
        ingest_replicas=2,
        notifier_replicas=2,
        gateway_port=0,
    )
    with Stack(settings, extra_env=ENV) as stack:
        yield stack


def auth(tenant: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {KEYS[tenant]}"),)


def task(model: str, text: str) -> ingest_pb2.SubmitTaskRequest:
    parameters = {"delay_ms": "0"} if model == "sleep" else {}
    return ingest_pb2.SubmitTaskRequest(model_name=model, input=task_pb2.TaskInput(text=text), parameters=parameters)


def accepted(stack: Stack, name: str, model: str) -> float:
    """Replica ``name``'s count of tasks of ``model`` it accepted."""
    return metric_total(stack.metrics_url(name), "aimesh_ingest_tasks_accepted_total", model=model)


def rate_limited(error: grpc.aio.AioRpcError) -> float:
    """The RetryInfo delay of a TENANT_RATE_LIMITED refusal, in seconds."""
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
    status = rpc_status.from_call(error)
    assert status is not None
    retry, info = error_details_pb2.RetryInfo(), error_details_pb2.ErrorInfo()
    assert any(d.Unpack(retry) for d in status.details) and any(d.Unpack(info) for d in status.details)
    assert info.reason == "TENANT_RATE_LIMITED"
    return retry.retry_delay.ToTimedelta().total_seconds()


@pytest.fixture
async def spread_channel(stack: Stack) -> AsyncIterator[grpc.aio.Channel]:
    """One channel to both ingest replicas that round-robins, as the client library's does."""
    async with grpc.aio.insecure_channel(stack.ingest_target, options=ROUND_ROBIN) as channel:
        yield channel


async def test_both_ingest_replicas_accept_tasks_that_complete_on_any_notifier(stack: Stack) -> None:
    names = [stack.replica_name("ingest", i) for i in range(2)]
    assert names == ["ingest", "ingest-1"] and len(set(stack.ingest_addresses)) == 2
    before = [accepted(stack, name, "sleep") for name in names]
    async with AsyncClient(stack.ingest_addresses, stack.notifier_addresses, api_key=KEYS["free"]) as client:
        task_ids = [await client.submit("sleep", f"replicas {i}", parameters={"delay_ms": "0"}) for i in range(6)]
        states = [await client.result(task_id, timeout_s=60) for task_id in task_ids]
    assert [s.status for s in states] == [result_pb2.TASK_STATUS_SUCCEEDED] * 6
    added = [accepted(stack, name, "sleep") - b for name, b in zip(names, before, strict=True)]
    assert sum(added) == 6 and min(added) >= 1, f"accepted per replica: {added}"
    for address in stack.notifier_addresses:  # partitioned: one owns the task, the other forwards; either answers
        async with AsyncClient(stack.ingest_address, address, api_key=KEYS["free"]) as client:
            assert (await client.get(task_ids[0])).status == result_pb2.TASK_STATUS_SUCCEEDED


async def test_a_rate_quota_holds_per_replica(stack: Stack) -> None:
    for address in stack.ingest_addresses:
        async with grpc.aio.insecure_channel(address) as channel:
            ingest = ingest_pb2_grpc.IngestServiceStub(channel)
            for i in range(BURST):
                await ingest.SubmitTask(task("sleep", f"direct {i}"), metadata=auth("direct"), timeout=30)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await ingest.SubmitTask(task("sleep", "one too many"), metadata=auth("direct"), timeout=30)
            assert rate_limited(refused.value) > 60  # no token comes back for minutes at this rate


async def test_a_round_robin_client_gets_twice_the_burst_then_retry_info(
    stack: Stack, spread_channel: grpc.aio.Channel
) -> None:
    ingest = ingest_pb2_grpc.IngestServiceStub(spread_channel)
    for i in range(4):  # both connections up before the quota is spent
        await ingest.SubmitTask(task("sleep", f"warm-up {i}"), metadata=auth("free"), timeout=30)
    names = [stack.replica_name("ingest", i) for i in range(2)]
    before = [accepted(stack, name, "sentiment") for name in names]
    outcomes: list[str] = []
    for i in range(2 * BURST + 4):
        try:
            await ingest.SubmitTask(task("sentiment", f"spread {i}"), metadata=auth("spread"), timeout=30)
            outcomes.append("accepted")
        except grpc.aio.AioRpcError as e:
            assert rate_limited(e) > 60
            outcomes.append("refused")
    assert outcomes == ["accepted"] * (2 * BURST) + ["refused"] * 4
    added = [accepted(stack, name, "sentiment") - b for name, b in zip(names, before, strict=True)]
    assert added == [BURST, BURST]


async def test_a_killed_replica_is_skipped_and_serves_again_once_restarted(stack: Stack) -> None:
    async with AsyncClient(stack.ingest_addresses, api_key=KEYS["free"]) as client:

        async def submit(text: str) -> str:
            return await client.submit("sleep", text, parameters={"delay_ms": "0"})

        await submit("both connected")
        stack.kill_replica("ingest", 1)  # SIGKILL
        assert not stack.services["ingest-1"].alive()
        assert len({await submit(f"one left {i}") for i in range(6)}) == 6
        stack.restart_replica("ingest", 1)
        deadline = time.monotonic() + 60
        while accepted(stack, "ingest-1", "sleep") == 0:  # a fresh process: its count starts at 0
            assert time.monotonic() < deadline, "the restarted replica got no call in 60 s"
            await submit("after the restart")
    stack.stop_replica("ingest", 1)  # SIGTERM: drains and exits cleanly
    assert stack.services["ingest-1"].returncode() == 0
