"""One idempotency key sent through two ingest replicas, on the real stack: one task id, one execution and one
terminal result, whether the two submissions race or follow each other with the worker that ran the task killed
(SIGKILL) between them."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import grpc
import pytest

from aimesh import events
from aimesh.devstack.ports import free_ports
from aimesh.devstack.stack import Stack
from aimesh.v1 import ingest_pb2, ingest_pb2_grpc, result_pb2, task_pb2

from .mesh_client import TopicReader, metric_total, read_topic, wait_caught_up, wait_for_results

WORKERS_GROUP = "aimesh-workers"


@pytest.fixture(scope="module")
def ingest_addresses(mesh: Stack) -> Iterator[list[str]]:
    """Two ingest replicas: the stack's own when it runs several, else a second ingest process started beside the
    stack's the way it starts its own, on a port of its own (and no metrics port)."""
    running = list(getattr(mesh, "ingest_addresses", [mesh.ingest_address]))
    if len(running) >= 2:
        yield running[:2]
        return
    address = f"127.0.0.1:{free_ports(1)[0]}"
    replica = mesh.start_service("ingest-replica", "aimesh.ingest", {"AIMESH_INGEST_ADDRESS": address})
    try:
        mesh.wait_grpc_healthy(address, "ingest-replica")
        yield [mesh.ingest_address, address]
    finally:
        replica.stop()
        mesh.services.pop("ingest-replica", None)


async def submit(address: str, key: str) -> ingest_pb2.SubmitTaskResponse:
    async with grpc.aio.insecure_channel(address) as channel:
        request = ingest_pb2.SubmitTaskRequest(
            model_name="sentiment", input=task_pb2.TaskInput(text="a lovely day, twice"), idempotency_key=key
        )
        reply: ingest_pb2.SubmitTaskResponse = await ingest_pb2_grpc.IngestServiceStub(channel).SubmitTask(
            request, timeout=30
        )
        return reply


def task_records(mesh: Stack, task_id: str) -> list[tuple[int, int]]:
    """(partition, offset) of every record of ``task_id`` on the tasks topic."""
    records = read_topic(mesh.kafka_bootstrap, mesh.topics.tasks_topic)
    return [(r.partition() or 0, r.offset() or 0) for r in records if r.key() == task_id.encode()]


def statuses(mesh: Stack, task_id: str) -> list[int]:
    """The status of every committed results-topic record of ``task_id`` (RUNNING updates included: one per
    execution), in topic order. Waits until the workers committed every task record first."""
    wait_caught_up(mesh.kafka_bootstrap, WORKERS_GROUP, mesh.topics.tasks_topic, timeout_s=120)
    records = read_topic(mesh.kafka_bootstrap, mesh.topics.results_topic)
    decoded = (events.decode_result(r.value()) for r in records)
    return [e.status for e in decoded if e.task_id == task_id]


def duplicates_dropped(mesh: Stack, worker: str) -> float:
    return metric_total(mesh.metrics_url(worker), "aimesh_worker_duplicate_tasks_total")


async def wait_dropped(mesh: Stack, worker: str, expected: float, timeout_s: float = 10.0) -> None:
    """Wait until ``worker`` counts ``expected`` dropped duplicates (it counts once the commit returned)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while (found := await asyncio.to_thread(duplicates_dropped, mesh, worker)) != expected:
        assert asyncio.get_running_loop().time() < deadline, f"{worker} dropped {found} duplicates, not {expected}"
        await asyncio.sleep(0.2)


def assert_ran_once(found: list[int]) -> None:
    terminal = [s for s in found if events.is_terminal(s)]
    running = [s for s in found if s == result_pb2.TASK_STATUS_RUNNING]
    assert terminal == [result_pb2.TASK_STATUS_SUCCEEDED], found
    assert len(running) == 1, f"executions (RUNNING updates): {len(running)}"


async def test_one_key_sent_to_two_replicas_at_once_is_one_task_run_once(
    mesh: Stack, ingest_addresses: list[str]
) -> None:
    key = f"race-{uuid.uuid4()}"
    replies = await asyncio.gather(*(submit(address, key) for address in ingest_addresses))
    assert replies[0].task_id == replies[1].task_id
    task_id = replies[0].task_id
    records = task_records(mesh, task_id)
    assert len(records) == 2 and records[0][0] == records[1][0], records  # both published, to one partition
    assert_ran_once(await asyncio.to_thread(statuses, mesh, task_id))


async def test_one_key_sent_to_two_replicas_in_turn_runs_once_though_its_worker_was_killed_between(
    mesh: Stack, ingest_addresses: list[str]
) -> None:
    key = f"retry-{uuid.uuid4()}"
    first = await submit(ingest_addresses[0], key)
    with TopicReader(mesh.kafka_bootstrap, mesh.topics.results_topic) as reader:
        [result] = (await asyncio.to_thread(wait_for_results, reader, [first.task_id]))[first.task_id]
    ran_it = int(result.worker_id.removeprefix("worker-"))
    survivor = f"worker-{1 - ran_it}"
    dropped_before = duplicates_dropped(mesh, survivor)
    mesh.kill_worker(ran_it)  # the partition's owner: the survivor must learn from the log what ran
    try:
        second = await submit(ingest_addresses[1], key)
        assert second.task_id == first.task_id and not second.duplicate  # this replica never saw the key
        assert len(task_records(mesh, first.task_id)) == 2
        assert_ran_once(await asyncio.to_thread(statuses, mesh, first.task_id))
        await wait_dropped(mesh, survivor, dropped_before + 1)
    finally:
        await asyncio.to_thread(mesh.restart_worker, ran_it)
        await asyncio.to_thread(mesh.wait_workers, 2)
