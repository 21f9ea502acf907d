"""The pipeline end to end on the real broker and the real Triton: ingest -> Kafka -> workers -> Triton ->
Kafka -> notifier, driven through the public gRPC contracts."""

from __future__ import annotations

import asyncio
import math
import re
import time

import grpc
import pytest
from confluent_kafka.admin import AdminClient

from aimesh import events
from aimesh.devstack.ports import free_ports
from aimesh.devstack.stack import Stack
from aimesh.v1 import ingest_pb2, notifier_pb2, result_pb2, task_pb2

from .mesh_client import (
    MeshClient,
    produce_raw,
    publish_garbage_then_expired_task,
    task_record,
    tensor,
    terminal_results_by_task,
)

pytestmark = pytest.mark.integration

ARTICLE = (
    "Kafka keeps every accepted task durable until a worker has answered it. "
    "The cafeteria menu changed on Tuesday. "
    "Workers pull tasks from Kafka and run inference on the Triton server. "
    "Results return through Kafka to the notifier, which streams them to subscribers. "
    "A worker that crashes leaves its tasks in Kafka, and another worker runs them."
)


async def test_each_model_answers_through_the_mesh(client: MeshClient) -> None:
    summarize, positive, negative, embed, sleep = await asyncio.gather(
        client.submit("summarize", ARTICLE, parameters={"sentences": "2"}),
        client.submit("sentiment", "I love how fast and friendly this is!"),
        client.submit("sentiment", "This is awful, broken and a total waste of money."),
        client.submit("embed", "Asynchronous inference keeps GPUs busy."),
        client.submit("sleep", "echo me"),
    )
    results = dict(
        zip(
            ["summarize", "positive", "negative", "embed", "sleep"],
            await asyncio.gather(*(client.result(t) for t in (summarize, positive, negative, embed, sleep))),
            strict=True,
        )
    )
    for name, result in results.items():
        assert result.status == result_pb2.TASK_STATUS_SUCCEEDED, (name, result.error)
        assert result.worker_id.startswith("worker-")
        assert result.timings.total.ToNanoseconds() >= result.timings.inference.ToNanoseconds() > 0

    summary = tensor(results["summarize"], "SUMMARY").string_data[0]
    assert "cafeteria" not in summary  # the off-topic sentence is the least central
    assert summary.count(".") == 2 and all(s.strip() + "." in ARTICLE for s in summary.split(".") if s.strip())
    assert tensor(results["positive"], "LABEL").string_data == ["positive"]
    assert tensor(results["negative"], "LABEL").string_data == ["negative"]
    vector = tensor(results["embed"], "EMBEDDING")
    assert list(vector.shape) == [384] and len(vector.float_data) == 384
    assert math.isclose(math.sqrt(sum(v * v for v in vector.float_data)), 1.0, rel_tol=1e-3)
    assert tensor(results["sleep"], "TEXT").string_data == ["echo me"]


async def test_watch_streams_progress_then_one_terminal_update(client: MeshClient) -> None:
    task_id = await client.submit("sleep", "progress please")
    states = await client.updates(task_id)
    statuses = [s.status for s in states]
    assert statuses[-1] == result_pb2.TASK_STATUS_SUCCEEDED
    assert [s for s in statuses if events.is_terminal(s)] == [result_pb2.TASK_STATUS_SUCCEEDED]
    assert statuses == sorted(statuses)  # QUEUED, RUNNING, SUCCEEDED: never backwards, each at most once
    assert len(set(statuses)) == len(statuses)


async def test_late_subscribers_and_get_task_see_the_result(client: MeshClient) -> None:
    task_id = await client.submit("sentiment", "A fine result.")
    first = await client.result(task_id)
    late = await asyncio.gather(*(client.updates(task_id, timeout_s=5) for _ in range(3)))
    for states in late:
        assert [s.status for s in states] == [result_pb2.TASK_STATUS_SUCCEEDED]
        assert states[0].result == first
    got = await client.notifier.GetTask(notifier_pb2.GetTaskRequest(task_id=task_id))
    assert got.state.status == result_pb2.TASK_STATUS_SUCCEEDED and got.state.model_name == "sentiment"


async def test_a_batch_of_tasks_yields_exactly_one_terminal_result_each(mesh: Stack, client: MeshClient) -> None:
    request = ingest_pb2.SubmitTasksRequest(
        tasks=[
            ingest_pb2.SubmitTaskRequest(model_name="sleep", input=task_pb2.TaskInput(text=f"item {i}"))
            for i in range(300)
        ]
    )
    reply = await client.ingest.SubmitTasks(request, timeout=60)
    task_ids = [t.task_id for t in reply.tasks]
    assert len(set(task_ids)) == 300
    results = await asyncio.gather(*(client.result(t, timeout_s=120) for t in task_ids))
    assert [tensor(r, "TEXT").string_data[0] for r in results] == [f"item {i}" for i in range(300)]
    counts = terminal_results_by_task(mesh.kafka_bootstrap, mesh.topics.results_topic)
    assert {t: counts[t] for t in task_ids} == {t: 1 for t in task_ids}


def test_every_worker_owns_partitions_of_each_tasks_topic(mesh: Stack) -> None:
    """Each tasks topic is spread over both workers on its own (the broker's range assignor): neither worker is
    left with batch partitions only while the other owns every interactive one."""
    admin = AdminClient({"bootstrap.servers": mesh.kafka_bootstrap})
    described = admin.describe_consumer_groups(["aimesh-workers"])["aimesh-workers"].result(timeout=10)
    assert str(described.type).endswith("CONSUMER"), described.type  # the KIP-848 rebalance protocol
    for topic in (mesh.topics.tasks_topic, mesh.topics.batch_tasks_topic):
        owners = {m.client_id for m in described.members for tp in m.assignment.topic_partitions if tp.topic == topic}
        assert len(owners) == 2, f"{topic} partitions owned by {sorted(owners)} only"


async def test_model_errors_become_failed_results(mesh: Stack, client: MeshClient) -> None:
    # Ingest refuses a malformed declared parameter (INVALID_ARGUMENT); a record written straight to the topic
    # reaches the model, which refuses it as bad input.
    bad_parameter, record = task_record("summarize", ARTICLE, parameters={"sentences": "many"})
    produce_raw(mesh.kafka_bootstrap, mesh.topics.tasks_topic, [(bad_parameter, record)])
    missing_model = await client.submit("ghost", "nobody serves this model")
    failed = await client.result(bad_parameter)
    assert failed.status == result_pb2.TASK_STATUS_FAILED
    assert failed.error.code == result_pb2.ERROR_CODE_INVALID_INPUT and not failed.error.retryable
    assert "sentences" in failed.error.message
    missing = await client.result(missing_model)
    assert missing.status == result_pb2.TASK_STATUS_FAILED
    assert missing.error.code == result_pb2.ERROR_CODE_MODEL_NOT_FOUND


async def test_garbage_and_expired_records_do_not_block_the_partition(mesh: Stack, client: MeshClient) -> None:
    expired_id = publish_garbage_then_expired_task(mesh.kafka_bootstrap, mesh.topics.tasks_topic)
    expired_result = await client.result(expired_id)
    assert expired_result.status == result_pb2.TASK_STATUS_EXPIRED
    assert expired_result.error.code == result_pb2.ERROR_CODE_DEADLINE_EXCEEDED
    after = await client.result(await client.submit("sleep", "still flowing"))
    assert after.status == result_pb2.TASK_STATUS_SUCCEEDED


async def test_restarted_notifier_resumes_from_its_saved_state(mesh: Stack, client: MeshClient) -> None:
    task_id = await client.submit("sentiment", "Remember me after a restart.")
    assert (await client.result(task_id)).status == result_pb2.TASK_STATUS_SUCCEEDED
    notifier = mesh.services["notifier"]
    notifier.stop()
    assert notifier.returncode() == 0  # SIGTERM is a graceful stop, not a crash
    log_start = notifier.log_path.stat().st_size
    mesh.restart_replica("notifier", 0)
    with notifier.log_path.open("rb") as log:
        log.seek(log_start)
        started = log.read().decode()
    # Partitions with records start where the saved state ends, not at the start of the retention window.
    reading = re.search(r"reading (\d+) partitions \((\d+) resumed", started)
    assert reading is not None and int(reading.group(2)) > 0, started[-2000:]
    restarted = MeshClient(mesh.ingest_address, mesh.notifier_address)
    try:
        got = await restarted.notifier.GetTask(notifier_pb2.GetTaskRequest(task_id=task_id))
        assert got.state.status == result_pb2.TASK_STATUS_SUCCEEDED
        assert [s.status for s in await restarted.updates(task_id, timeout_s=5)] == [result_pb2.TASK_STATUS_SUCCEEDED]
    finally:
        await restarted.close()


async def test_worker_sigterm_drains_in_flight_tasks(mesh: Stack, client: MeshClient) -> None:
    task_ids = [await client.submit("sleep", f"drain {i}", parameters={"delay_ms": "300"}) for i in range(20)]
    await asyncio.sleep(0.5)
    worker = mesh.services["worker-1"]
    started = time.monotonic()
    worker.stop(timeout_s=40)
    assert worker.returncode() == 0
    assert time.monotonic() - started < 30
    results = await asyncio.gather(*(client.result(t, timeout_s=120) for t in task_ids))
    assert all(r.status == result_pb2.TASK_STATUS_SUCCEEDED for r in results)
    mesh.start_worker(1)
    mesh.wait_workers(2)


async def test_ingest_answers_unavailable_in_bounded_time_without_a_broker(mesh: Stack) -> None:
    port, nobody = free_ports(2)
    dead_broker = f"127.0.0.1:{nobody}"
    mesh.start_service(
        "ingest-no-broker",
        "aimesh.ingest",
        {
            "AIMESH_KAFKA_BOOTSTRAP": dead_broker,
            "AIMESH_INGEST_ADDRESS": f"127.0.0.1:{port}",
            "AIMESH_PUBLISH_TIMEOUT_S": "2",
        },
    )
    try:
        mesh.wait_grpc_healthy(f"127.0.0.1:{port}", "ingest-no-broker")
        lonely = MeshClient(f"127.0.0.1:{port}", mesh.notifier_address)
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await lonely.submit("sleep", "nowhere to go")
        elapsed = time.monotonic() - started
        await lonely.close()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert 1.5 < elapsed < 6.0
    finally:
        lonely_ingest = mesh.services.pop("ingest-no-broker")
        lonely_ingest.stop()
    assert lonely_ingest.returncode() == 0
