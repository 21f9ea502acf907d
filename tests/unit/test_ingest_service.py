"""The ingest gRPC edge in process on port 0, with the producer replaced at its seam."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from aimesh.auth import Authenticator
from aimesh.errors import BrokerUnavailable
from aimesh.events import decode_task
from aimesh.grpc_edge import GrpcServer
from aimesh.ingest.idempotency import IdempotencyKeys, derived_task_id
from aimesh.ingest.service import IngestServicer
from aimesh.ingest.validation import Limits
from aimesh.v1 import ingest_pb2, ingest_pb2_grpc, task_pb2


class RecordingProducer:
    """Stands in for AsyncProducer: records what would be published, or fails like an absent broker."""

    def __init__(self) -> None:
        self.records: list[tuple[str, str, bytes, list[tuple[str, bytes]]]] = []
        self.fail = False

    async def produce(self, topic: str, *, key: str, value: bytes, headers=None) -> None:
        await asyncio.sleep(0)
        if self.fail:
            raise BrokerUnavailable("delivery failed: Local: Message timed out")
        self.records.append((topic, key, value, list(headers or [])))


async def start_ingest(
    *,
    auth: Authenticator | None = None,
    max_text_bytes: int = 64,
    max_message_bytes: int = 4 << 20,
    **servicer_options: object,
) -> tuple[GrpcServer, RecordingProducer]:
    """An ingest on port 0 accepting ``sentiment``, its producer replaced at the seam, batch tasks on the topic
    ``batch-tasks``. ``servicer_options`` (admission, rate_quotas, in_flight, metrics, max_batch_tasks, limits,
    producer, record_finder, ...) go to the servicer. Stop the server when done."""
    producer = RecordingProducer()
    options: dict[str, object] = {
        "max_batch_tasks": 3,
        "publish_timeout_s": 1.0,
        "idempotency": IdempotencyKeys(60),
        "limits": Limits(models=frozenset({"sentiment"}), max_text_bytes=max_text_bytes),
        **servicer_options,
    }
    producer = options.pop("producer", producer)  # type: ignore[assignment]
    servicer = IngestServicer(
        producer,  # type: ignore[arg-type]
        tasks_topic="tasks",
        batch_tasks_topic="batch-tasks",
        **options,  # type: ignore[arg-type]
    )
    server = GrpcServer("127.0.0.1:0", ["aimesh.v1.IngestService"], auth=auth, max_message_bytes=max_message_bytes)
    server.add(ingest_pb2_grpc.add_IngestServiceServicer_to_server, servicer)
    await server.start()
    return server, producer


@pytest.fixture
async def ingest() -> AsyncIterator[tuple[ingest_pb2_grpc.IngestServiceStub, RecordingProducer]]:
    server, producer = await start_ingest()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield ingest_pb2_grpc.IngestServiceStub(channel), producer
    await server.stop(0)


def req(text: str = "what a lovely day", model: str = "sentiment", **kw) -> ingest_pb2.SubmitTaskRequest:
    return ingest_pb2.SubmitTaskRequest(model_name=model, input=task_pb2.TaskInput(text=text), **kw)


async def test_accepted_task_is_published_keyed_by_its_id(ingest) -> None:
    stub, producer = ingest
    reply = await stub.SubmitTask(req(parameters={"x": "1"}))
    assert [(t, k) for t, k, _, _ in producer.records] == [("tasks", reply.task_id)]
    event = decode_task(producer.records[0][2])
    assert event.task_id == reply.task_id
    assert event.model_name == "sentiment"
    assert event.input.text == "what a lovely day"
    assert dict(event.parameters) == {"x": "1"}
    assert event.submitted_at == reply.accepted_at
    assert ("content-type", b"application/x-protobuf; messageType=aimesh.v1.AITaskEvent") in producer.records[0][3]


async def test_bad_input_gets_invalid_argument_with_field_violations(ingest) -> None:
    stub, producer = ingest
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.SubmitTask(req(text="x" * 65, parameters={"BAD": "1"}))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(info.value)
    bad_request = error_details_pb2.BadRequest()
    assert status is not None and status.details[0].Unpack(bad_request)
    assert sorted(v.field for v in bad_request.field_violations) == ["input.text", "parameters['BAD']"]
    assert producer.records == []


async def test_unknown_model_is_not_found(ingest) -> None:
    stub, producer = ingest
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.SubmitTask(req(model="nope"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "sentiment" in info.value.details()
    assert producer.records == []


async def test_broker_failure_is_unavailable_and_nothing_is_reported_accepted(ingest) -> None:
    stub, producer = ingest
    producer.fail = True
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.SubmitTask(req(idempotency_key="k1"))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    producer.fail = False
    reply = await stub.SubmitTask(req(idempotency_key="k1"))
    assert not reply.duplicate
    assert len(producer.records) == 1


async def test_repeated_idempotency_key_publishes_once(ingest) -> None:
    stub, producer = ingest
    first = await stub.SubmitTask(req(idempotency_key="same"))
    again = await stub.SubmitTask(req(idempotency_key="same"))
    assert again.task_id == first.task_id and again.duplicate and not first.duplicate
    assert len(producer.records) == 1


async def test_batch_is_all_or_nothing(ingest) -> None:
    stub, producer = ingest
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.SubmitTasks(ingest_pb2.SubmitTasksRequest(tasks=[req(), req(text="")]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "tasks[1].input.text" in info.value.details()
    assert producer.records == []
    reply = await stub.SubmitTasks(ingest_pb2.SubmitTasksRequest(tasks=[req(), req("second")]))
    assert [r.task_id for r in reply.tasks] == [k for _, k, _, _ in producer.records]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.SubmitTasks(ingest_pb2.SubmitTasksRequest(tasks=[req()] * 4))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_priority_travels_in_the_event_and_picks_the_topic(ingest) -> None:
    stub, producer = ingest
    unspecified = await stub.SubmitTask(req())
    interactive = await stub.SubmitTask(req(priority=task_pb2.PRIORITY_INTERACTIVE))
    batch = await stub.SubmitTask(req(priority=task_pb2.PRIORITY_BATCH))
    published = {key: (topic, decode_task(value).priority) for topic, key, value, _ in producer.records}
    assert published == {
        unspecified.task_id: ("tasks", task_pb2.PRIORITY_INTERACTIVE),
        interactive.task_id: ("tasks", task_pb2.PRIORITY_INTERACTIVE),
        batch.task_id: ("batch-tasks", task_pb2.PRIORITY_BATCH),
    }


async def test_a_batch_may_mix_priorities_and_idempotency_still_holds(ingest) -> None:
    stub, producer = ingest
    tasks = [req(priority=task_pb2.PRIORITY_BATCH, idempotency_key="b"), req(), req(priority=task_pb2.PRIORITY_BATCH)]
    reply = await stub.SubmitTasks(ingest_pb2.SubmitTasksRequest(tasks=tasks))
    topics = {key: topic for topic, key, _, _ in producer.records}
    assert [topics[r.task_id] for r in reply.tasks] == ["batch-tasks", "tasks", "batch-tasks"]
    again = await stub.SubmitTask(req(priority=task_pb2.PRIORITY_BATCH, idempotency_key="b"))
    assert again.duplicate and again.task_id == reply.tasks[0].task_id
    assert len(producer.records) == 3


async def test_an_unknown_priority_number_is_invalid_argument(ingest) -> None:
    stub, producer = ingest
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.SubmitTasks(ingest_pb2.SubmitTasksRequest(tasks=[req(), req(priority=7)]))  # type: ignore[arg-type]
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(info.value)
    bad_request = error_details_pb2.BadRequest()
    assert status is not None and status.details[0].Unpack(bad_request)
    assert [v.field for v in bad_request.field_violations] == ["tasks[1].priority"]
    assert producer.records == []


async def test_the_accepted_answer_a_key_remembers_does_not_hold_the_task_record() -> None:
    # A protobuf sub-message keeps its whole message alive: an idempotency key remembering the event's own
    # submitted_at kept the task's text in memory for AIMESH_IDEMPOTENCY_TTL_S (200 MB of ingest in a 30-minute soak).
    producer = RecordingProducer()
    servicer = IngestServicer(
        producer,  # type: ignore[arg-type]
        tasks_topic="tasks",
        batch_tasks_topic="batch-tasks",
        limits=Limits(models=frozenset({"sentiment"}), max_text_bytes=64),
        idempotency=IdempotencyKeys(60),
        publish_timeout_s=1.0,
        max_batch_tasks=3,
    )
    record = servicer._record_of(req(), "default")
    accepted = await servicer._publish(record, None)
    assert accepted.accepted_at == record.event.submitted_at
    record.event.submitted_at.seconds += 1000
    assert accepted.accepted_at != record.event.submitted_at  # a copy: the record can go


async def test_two_replicas_give_one_key_the_same_task_id_derived_from_tenant_and_key() -> None:
    servers = [await start_ingest() for _ in range(2)]
    try:
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{servers[0][0].port}") as one,
            grpc.aio.insecure_channel(f"127.0.0.1:{servers[1][0].port}") as two,
        ):
            first = await ingest_pb2_grpc.IngestServiceStub(one).SubmitTask(req(idempotency_key="order-17"))
            batch = await ingest_pb2_grpc.IngestServiceStub(two).SubmitTasks(
                ingest_pb2.SubmitTasksRequest(tasks=[req(idempotency_key="order-17"), req()])
            )
    finally:
        for server, _ in servers:
            await server.stop(0)
    assert batch.tasks[0].task_id == first.task_id
    assert not batch.tasks[0].duplicate  # this replica had not seen the key: the worker drops its record
    [(_, key, value, _)] = servers[0][1].records
    event = decode_task(value)
    assert key == event.task_id == first.task_id == derived_task_id(event.tenant, "order-17")
    assert [k for _, k, _, _ in servers[1][1].records][0] == first.task_id
    assert uuid.UUID(batch.tasks[1].task_id).version == 4  # without a key: a random id
