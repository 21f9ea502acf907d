"""Admission control and the concurrency quota against a real stack of their own (Kafka, Triton, ingest, one
worker, the notifier): a flood of slow tasks is turned away with RESOURCE_EXHAUSTED and RetryInfo once the
measured backlog would take too long, every accepted task still ends exactly once, and after the backlog drains
tasks are accepted again. The stack is this module's own: its ingest runs with a short maximum wait, which
would disturb the session mesh's other tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from aimesh.devstack.ports import free_ports
from aimesh.devstack.stack import Stack, StackSettings
from aimesh.v1 import ingest_pb2, ingest_pb2_grpc, task_pb2

from .mesh_client import TopicReader, read_topic, terminal_results, wait_caught_up, wait_for_results

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

MAX_WAIT_S = 3
# Each Triton batch of the sleep model sleeps this long (two instances): the one worker drains about
# 2 x 64 tasks per second at most, so a flood of SubmitTasks calls outruns it within a second.
DELAY_MS = "1000"
ENV = {
    "AIMESH_AUTH": "off",
    "AIMESH_LOG_FORMAT": "json",
    "AIMESH_ADMISSION_MAX_WAIT_S": str(MAX_WAIT_S),
    "AIMESH_ADMISSION_INTERVAL_S": "0.25",
    # No drain rate is known during the first second of the flood: past this backlog it counts as too long.
    "AIMESH_ADMISSION_STALLED_BACKLOG": "400",
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    settings = StackSettings.on_free_ports(
        tmp_path_factory.mktemp("admission"), workers=1, tasks_partitions=2, results_partitions=2
    )
    with Stack(settings, extra_env=ENV) as stack:
        yield stack


@pytest.fixture
async def ingest(stack: Stack) -> AsyncIterator[ingest_pb2_grpc.IngestServiceStub]:
    async with grpc.aio.insecure_channel(stack.ingest_address) as channel:
        yield ingest_pb2_grpc.IngestServiceStub(channel)


def sleep_task(text: str, delay_ms: str = DELAY_MS) -> ingest_pb2.SubmitTaskRequest:
    return ingest_pb2.SubmitTaskRequest(
        model_name="sleep", input=task_pb2.TaskInput(text=text), parameters={"delay_ms": delay_ms}
    )


def rich_details(error: grpc.aio.AioRpcError) -> dict[str, object]:
    status = rpc_status.from_call(error)
    assert status is not None, f"{error.code()} without rich details: {error.details()}"
    found: dict[str, object] = {}
    for detail in status.details:
        for kind in (error_details_pb2.RetryInfo, error_details_pb2.ErrorInfo, error_details_pb2.QuotaFailure):
            message = kind()
            if detail.Unpack(message):
                found[kind.__name__] = message
    return found


async def test_a_flood_is_turned_away_every_accepted_task_ends_once_and_admission_reopens(
    stack: Stack, ingest: ingest_pb2_grpc.IngestServiceStub
) -> None:
    topic = stack.topics.tasks_topic
    with TopicReader(stack.kafka_bootstrap, stack.topics.results_topic) as results:
        accepted: list[str] = []
        rejection: grpc.aio.AioRpcError | None = None
        started = time.monotonic()
        while rejection is None and time.monotonic() - started < 60:
            batch = ingest_pb2.SubmitTasksRequest(tasks=[sleep_task(f"flood {len(accepted) + i}") for i in range(50)])
            try:
                reply = await ingest.SubmitTasks(batch, timeout=30)
            except grpc.aio.AioRpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
                rejection = e
            else:
                accepted.extend(t.task_id for t in reply.tasks)
        assert rejection is not None, f"{len(accepted)} tasks accepted in 60 s and none turned away"
        details = rich_details(rejection)
        retry = details["RetryInfo"]
        info = details["ErrorInfo"]
        assert isinstance(retry, error_details_pb2.RetryInfo) and isinstance(info, error_details_pb2.ErrorInfo)
        delay_s = retry.retry_delay.ToTimedelta().total_seconds()
        assert delay_s >= 1.0
        assert info.reason == "BACKLOG_TOO_LONG"
        assert info.metadata["topic"] == topic
        assert int(info.metadata["backlog"]) > 0
        assert float(info.metadata["estimated_wait_s"]) > MAX_WAIT_S

        # Retry as told until admitted again: the backlog drains within the wait.
        reopened: str | None = None
        while reopened is None:
            assert time.monotonic() - started < 150, "submissions still refused 150 s after the flood began"
            await asyncio.sleep(delay_s)
            try:
                reopened = (await ingest.SubmitTask(sleep_task("after the flood", "0"), timeout=30)).task_id
            except grpc.aio.AioRpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
                retry = rich_details(e)["RetryInfo"]
                assert isinstance(retry, error_details_pb2.RetryInfo)
                delay_s = retry.retry_delay.ToTimedelta().total_seconds()
        accepted.append(reopened)

        wait_for_results(results, accepted, timeout_s=90)
        wait_caught_up(stack.kafka_bootstrap, "aimesh-workers", topic)
        results.read_to_end()
        ends = terminal_results(results.records)
    counts = {task_id: len(ends.get(task_id, [])) for task_id in accepted}
    assert [t for t, n in counts.items() if n != 1] == [], "tasks without exactly one terminal result"
    # The refused calls published nothing: the tasks topic holds exactly the accepted tasks.
    published = [record.key().decode() for record in read_topic(stack.kafka_bootstrap, topic)]
    assert sorted(published) == sorted(accepted)


@pytest.fixture
def quota_ingest(stack: Stack) -> Iterator[str]:
    """A second ingest of the stack with a concurrency quota of 3 tasks (and no admission control)."""
    (port,) = free_ports(1)
    address = f"127.0.0.1:{port}"
    process = stack.start_service(
        "ingest-quota",
        "aimesh.ingest",
        {
            "AIMESH_INGEST_ADDRESS": address,
            "AIMESH_ADMISSION_MAX_WAIT_S": "0",
            "AIMESH_TENANT_MAX_CONCURRENT": "3",
        },
    )
    try:
        stack.wait_grpc_healthy(address, "ingest-quota")
        yield address
    finally:
        process.stop()


async def test_the_concurrency_quota_frees_a_slot_when_the_tasks_result_is_read(
    stack: Stack, quota_ingest: str
) -> None:
    await asyncio.sleep(2)  # the ingest's results reader positions itself at the end of the results topic
    async with grpc.aio.insecure_channel(quota_ingest) as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        first = await stub.SubmitTasks(
            ingest_pb2.SubmitTasksRequest(tasks=[sleep_task(f"quota {i}", "1500") for i in range(3)]), timeout=30
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.SubmitTask(sleep_task("one too many", "0"), timeout=30)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = rich_details(refused.value)
        info = details["ErrorInfo"]
        assert isinstance(info, error_details_pb2.ErrorInfo) and info.reason == "TENANT_CONCURRENCY_LIMITED"
        assert "QuotaFailure" in details and "RetryInfo" in details

        with TopicReader(stack.kafka_bootstrap, stack.topics.results_topic) as results:
            wait_for_results(results, [t.task_id for t in first.tasks], timeout_s=60)
        deadline = time.monotonic() + 15
        while True:  # the ingest reads the same results a moment later
            try:
                await stub.SubmitTask(sleep_task("a slot is free", "0"), timeout=30)
                break
            except grpc.aio.AioRpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
                assert time.monotonic() < deadline, "no slot freed 15 s after the tasks finished"
                await asyncio.sleep(0.5)
