"""Hostile input through the real ingest of the session mesh (real Kafka, real Triton, workers, notifier):
a task whose Kafka record can never fit and an absurd deadline are refused with INVALID_ARGUMENT and a field
violation, never UNAVAILABLE; nothing of a refused call is published, and ordinary tasks still run. The record
finder that resolves an ambiguous publish is checked against the real broker."""

from __future__ import annotations

import time
import uuid

import grpc
import pytest
from confluent_kafka import Producer
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from aimesh import events
from aimesh.devstack.kafka import create_topics
from aimesh.devstack.stack import Stack
from aimesh.ingest.record_finder import KafkaRecordFinder, partition_of
from aimesh.v1 import ingest_pb2, result_pb2, task_pb2

from .mesh_client import MeshClient

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def task(text: str, model: str = "sentiment", **kw: object) -> ingest_pb2.SubmitTaskRequest:
    return ingest_pb2.SubmitTaskRequest(model_name=model, input=task_pb2.TaskInput(text=text), **kw)  # type: ignore[arg-type]


def violations(error: grpc.aio.AioRpcError) -> dict[str, str]:
    status = rpc_status.from_call(error)
    bad_request = error_details_pb2.BadRequest()
    assert status is not None and status.details[0].Unpack(bad_request), error
    return {v.field: v.description for v in bad_request.field_violations}


async def refused(client: MeshClient, request: ingest_pb2.SubmitTaskRequest) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.ingest.SubmitTask(request, timeout=30)
    return info.value


async def test_texts_whose_record_cannot_fit_are_invalid_argument_naming_the_record_limit(client: MeshClient) -> None:
    for size in (999_780, 999_850, 999_920, 999_990):
        error = await refused(client, task("a" * size, idempotency_key=f"big-{uuid.uuid4()}"))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (size, error.details())
        described = violations(error)["input.text"]
        assert "the limit is 1000000 bytes (AIMESH_MAX_RECORD_BYTES)" in described, described
    # A text well under the limit is accepted and its task ends.
    result = await client.result(await client.submit("sentiment", "good " * 150_000), timeout_s=120)
    assert result.status == result_pb2.TASK_STATUS_SUCCEEDED


async def test_an_absurd_deadline_is_invalid_argument_and_harms_no_other_row(client: MeshClient) -> None:
    error = await refused(client, task("a fine day", deadline=Timestamp(seconds=10**13)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert list(violations(error)) == ["deadline"]
    rows = [task(f"row {i} is good") for i in range(16)] + [task("absurd", deadline=Timestamp(seconds=10**13))]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.ingest.SubmitTasks(ingest_pb2.SubmitTasksRequest(tasks=rows), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert list(violations(info.value)) == ["tasks[16].deadline"]
    # Without the absurd row the same tasks are accepted and every one ends within seconds.
    reply = await client.ingest.SubmitTasks(ingest_pb2.SubmitTasksRequest(tasks=rows[:16]), timeout=30)
    started = time.monotonic()
    for accepted in reply.tasks:
        assert (await client.result(accepted.task_id, timeout_s=30)).status == result_pb2.TASK_STATUS_SUCCEEDED
    assert time.monotonic() - started < 30


async def test_declared_parameter_limits_and_triton_reserved_names_are_invalid_argument(client: MeshClient) -> None:
    error = await refused(client, task("x", model="sleep", parameters={"delay_ms": "600000"}))
    assert violations(error) == {"parameters['delay_ms']": "is 600000; must be between 0 and 60000"}
    error = await refused(client, task("x", parameters={"sequence_id": "7"}))
    assert list(violations(error)) == ["parameters['sequence_id']"]
    error = await refused(client, task("x", model_version="²"))
    assert list(violations(error)) == ["model_version"]


async def test_the_record_finder_finds_a_record_in_its_partition_on_the_real_broker(mesh: Stack) -> None:
    topic = f"finder-{uuid.uuid4()}"
    create_topics(mesh.kafka_bootstrap, {topic: 4})
    since_ms = time.time_ns() // 1_000_000
    keys = [str(uuid.uuid4()) for _ in range(8)]
    partitions: dict[str, int] = {}
    producer = Producer({"bootstrap.servers": mesh.kafka_bootstrap, "enable.idempotence": True})
    for key in keys:
        producer.produce(
            topic,
            key=key,
            value=b"v",
            headers=events.task_headers(),
            on_delivery=lambda err, msg: partitions.__setitem__(msg.key().decode(), msg.partition()),
        )
    assert producer.flush(10) == 0
    # librdkafka's default partitioner is the one the finder computes.
    assert partitions == {key: partition_of(key.encode(), 4) for key in keys}
    finder = KafkaRecordFinder({"bootstrap.servers": mesh.kafka_bootstrap})
    try:
        assert all([await finder.landed(topic, key, since_ms) for key in keys])
        assert not await finder.landed(topic, str(uuid.uuid4()), since_ms)
        assert not await finder.landed(topic, keys[0], time.time_ns() // 1_000_000 + 60_000)
    finally:
        finder.close()
