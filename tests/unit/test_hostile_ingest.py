"""Ingest against hostile input, in process on port 0 with the producer (and the record finder) replaced at
their seams: records that can never fit, absurd deadlines, out-of-range parameters, and a producer that writes a
record and then reports a timeout."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from confluent_kafka import KafkaError, KafkaException
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from test_ingest_service import req, start_ingest

from aimesh.errors import BrokerUnavailable
from aimesh.ingest.parameters import ParameterCatalog
from aimesh.ingest.validation import Limits
from aimesh.metrics import REJECT_BROKER_UNAVAILABLE, REJECT_INVALID_ARGUMENT, IngestMetrics
from aimesh.v1 import ingest_pb2, ingest_pb2_grpc

MB = 1_000_000


class KafkaLikeProducer:
    """Produces into an in-memory log, checking the record size as librdkafka does (no broker involved), and
    can write a record and then report a delivery timeout, as librdkafka does when the acknowledgement is lost."""

    def __init__(self) -> None:
        self.log: list[tuple[str, str, bytes]] = []
        self.write_then_time_out = False
        self.time_out_unwritten = False
        self.hold: asyncio.Event | None = None

    async def produce(self, topic: str, *, key: str, value: bytes, headers=None) -> None:
        if self.hold is not None:
            await self.hold.wait()
        if self.time_out_unwritten:
            raise BrokerUnavailable("delivery failed", kafka_error=KafkaError(KafkaError._MSG_TIMED_OUT))
        self.log.append((topic, key, value))
        if self.write_then_time_out:
            raise BrokerUnavailable("delivery failed", kafka_error=KafkaError(KafkaError._MSG_TIMED_OUT))


class LogFinder:
    """The record finder over the fake producer's log."""

    def __init__(self, producer: KafkaLikeProducer) -> None:
        self._producer = producer
        self.lookups = 0

    async def landed(self, topic: str, key: str, since_ms: int) -> bool:
        self.lookups += 1
        return any(t == topic and k == key for t, k, _ in self._producer.log)


@pytest.fixture
async def hostile() -> AsyncIterator[tuple[ingest_pb2_grpc.IngestServiceStub, KafkaLikeProducer, IngestMetrics]]:
    producer = KafkaLikeProducer()
    metrics = IngestMetrics(models=frozenset({"sentiment", "sleep", "generate", "mine"}))
    limits = Limits(
        models=frozenset({"sentiment", "sleep", "generate", "mine"}),
        max_text_bytes=MB,
        max_deadline_s=3600,
        parameters=ParameterCatalog.built_in(),
    )
    server, _ = await start_ingest(
        producer=producer,
        limits=limits,
        metrics=metrics,
        max_message_bytes=4 << 20,
        max_record_bytes=MB,
        record_finder=LogFinder(producer),
    )
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{server.port}", options=[("grpc.max_send_message_length", 4 << 20)]
    ) as channel:
        yield ingest_pb2_grpc.IngestServiceStub(channel), producer, metrics
    await server.stop(0)


def violations(error: grpc.aio.AioRpcError) -> dict[str, str]:
    status = rpc_status.from_call(error)
    bad_request = error_details_pb2.BadRequest()
    assert status is not None and status.details[0].Unpack(bad_request)
    return {v.field: v.description for v in bad_request.field_violations}


async def refused(call) -> grpc.aio.AioRpcError:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


# Item 2: a record that can never fit is the caller's error, not a broker outage.


async def test_texts_whose_record_cannot_fit_are_invalid_argument_naming_the_record_limit(hostile) -> None:
    stub, producer, metrics = hostile
    for size in (999_780, 999_900, 999_990):
        error = await refused(stub.SubmitTask(req("x" * size)))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        described = violations(error)["input.text"]
        assert "the limit is 1000000 bytes (AIMESH_MAX_RECORD_BYTES)" in described and f"its text {size}" in described
    assert producer.log == []
    assert metrics.tasks_rejected.labels(REJECT_BROKER_UNAVAILABLE)._value.get() == 0
    assert metrics.tasks_rejected.labels(REJECT_INVALID_ARGUMENT)._value.get() == 3
    await stub.SubmitTask(req("x" * 999_700))  # a record that fits is published
    assert len(producer.log) == 1


async def test_one_oversized_task_refuses_its_whole_batch_before_anything_is_published(hostile) -> None:
    stub, producer, _ = hostile
    error = await refused(stub.SubmitTasks(ingest_pb2.SubmitTasksRequest(tasks=[req(), req("x" * 999_990)])))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert list(violations(error)) == ["tasks[1].input.text"]
    assert producer.log == []


async def test_a_record_the_producer_refuses_as_too_large_is_invalid_argument() -> None:
    class RefusingProducer:
        async def produce(self, topic: str, *, key: str, value: bytes, headers=None) -> None:
            # What AsyncProducer raises when librdkafka's produce() refuses the record (message.max.bytes).
            cause = KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))
            raise BrokerUnavailable("cannot queue the record") from cause

    metrics = IngestMetrics(models=frozenset({"sentiment"}))
    server, _ = await start_ingest(producer=RefusingProducer(), metrics=metrics)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        error = await refused(ingest_pb2_grpc.IngestServiceStub(channel).SubmitTask(req()))
    await server.stop(0)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "too large" in violations(error)["input.text"]
    assert metrics.tasks_rejected.labels(REJECT_BROKER_UNAVAILABLE)._value.get() == 0


# Item 3: deadlines within a range.


async def test_an_absurd_deadline_is_invalid_argument_and_a_past_one_a_failed_precondition(hostile) -> None:
    stub, producer, _ = hostile
    error = await refused(stub.SubmitTask(req(deadline=Timestamp(seconds=10**13))))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(error) == {
        "deadline": "is not a valid Timestamp (years 1 to 9999); a deadline must lie within the next 3600 s"
    }
    error = await refused(stub.SubmitTask(req(deadline=Timestamp(seconds=int(time.time()) + 7200))))
    assert violations(error) == {"deadline": "is more than 3600 s from now; a deadline must lie within the next 3600 s"}
    batch = [req(), req(deadline=Timestamp(seconds=10**13))]
    error = await refused(stub.SubmitTasks(ingest_pb2.SubmitTasksRequest(tasks=batch)))
    assert list(violations(error)) == ["tasks[1].deadline"]
    error = await refused(stub.SubmitTask(req(deadline=Timestamp(seconds=int(time.time()) - 5))))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert producer.log == []
    await stub.SubmitTask(req(deadline=Timestamp(seconds=int(time.time()) + 60)))
    assert len(producer.log) == 1


# Items 4 and 8: declared parameters, Triton's reserved names, model versions.


async def test_parameters_beyond_a_models_declared_limits_are_invalid_argument(hostile) -> None:
    stub, producer, _ = hostile
    error = await refused(stub.SubmitTask(req(model="sleep", parameters={"delay_ms": "60001"})))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(error) == {"parameters['delay_ms']": "is 60001; must be between 0 and 60000"}
    error = await refused(
        stub.SubmitTask(req(model="generate", parameters={"max_tokens": "1e3", "temperature": "nan", "seeds": "1"}))
    )
    assert sorted(violations(error)) == ["parameters['max_tokens']", "parameters['seeds']", "parameters['temperature']"]
    error = await refused(stub.SubmitTask(req(model="sentiment", parameters={"priority": "9", "timeout": "1"})))
    assert sorted(violations(error)) == ["parameters['priority']", "parameters['timeout']"]
    error = await refused(stub.SubmitTask(req(model="sentiment", model_version="١")))
    assert list(violations(error)) == ["model_version"]
    assert producer.log == []
    await stub.SubmitTask(req(model="sleep", parameters={"delay_ms": "60000"}))
    await stub.SubmitTask(req(model="mine", parameters={"anything": "goes"}))  # no declaration: as before
    assert len(producer.log) == 2


# Item 5: an ambiguous publish never makes a second execution.


async def test_a_retry_after_a_timeout_that_wrote_the_record_answers_the_same_task(hostile) -> None:
    stub, producer, metrics = hostile
    producer.write_then_time_out = True
    error = await refused(stub.SubmitTask(req(idempotency_key="once")))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    producer.write_then_time_out = False
    retry = await stub.SubmitTask(req(idempotency_key="once"))
    again = await stub.SubmitTask(req(idempotency_key="once"))
    assert [key for _, key, _ in producer.log] == [retry.task_id]  # one record, the retry learned its task id
    assert retry.duplicate and again.task_id == retry.task_id


async def test_a_retry_while_the_first_record_may_exist_is_unavailable_and_publishes_nothing(hostile) -> None:
    stub, producer, _ = hostile
    producer.time_out_unwritten = True
    assert (await refused(stub.SubmitTask(req(idempotency_key="doubt")))).code() == grpc.StatusCode.UNAVAILABLE
    producer.time_out_unwritten = False  # the broker is back: a fresh record would now be acknowledged
    for _ in range(2):
        assert (await refused(stub.SubmitTask(req(idempotency_key="doubt")))).code() == grpc.StatusCode.UNAVAILABLE
    assert producer.log == []
    await stub.SubmitTask(req(idempotency_key="other"))  # other keys are not affected
    assert len(producer.log) == 1


async def test_a_retry_waits_on_the_first_delivery_when_librdkafka_is_still_trying() -> None:
    producer = KafkaLikeProducer()
    producer.hold = asyncio.Event()
    server, _ = await start_ingest(producer=producer, publish_timeout_s=0.05, record_finder=LogFinder(producer))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        assert (await refused(stub.SubmitTask(req(idempotency_key="slow")))).code() == grpc.StatusCode.UNAVAILABLE
        producer.hold.set()  # the first delivery now completes
        retry = await stub.SubmitTask(req(idempotency_key="slow"))
    await server.stop(0)
    assert [key for _, key, _ in producer.log] == [retry.task_id]
