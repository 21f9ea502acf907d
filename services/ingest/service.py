"""The IngestService servicer: validate, publish durably, answer with the task id."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from confluent_kafka import KafkaError, KafkaException
from google.protobuf import timestamp_pb2
from google.rpc import code_pb2
from opentelemetry import propagate

from aimesh import auth, events, runtime, tracing
from aimesh.errors import (
    BrokerUnavailable,
    DeadlinePassed,
    InvalidTask,
    PublishInDoubt,
    RecordTooLarge,
    UnknownModel,
)
from aimesh.grpc_edge import abort_invalid, abort_with, error_info
from aimesh.kafka_producer import AsyncProducer
from aimesh.metrics import (
    REJECT_BROKER_UNAVAILABLE,
    REJECT_DEADLINE_PASSED,
    REJECT_INVALID_ARGUMENT,
    REJECT_MODEL_NOT_FOUND,
    REJECT_OBJECT_STORE_UNAVAILABLE,
    IngestMetrics,
)
from aimesh.objects import ObjectStoreError, ObjectStoreUnavailable
from aimesh.v1 import ingest_pb2, ingest_pb2_grpc, task_pb2

from .admission import Admission
from .claim_check import ClaimCheck
from .idempotency import Accepted, IdempotencyKeys, SentRecord, derived_task_id
from .load_checks import LoadChecks
from .quotas import InFlightTasks, RateQuotas, Reservation
from .record_finder import LookupUnavailable, RecordFinder
from .record_size import record_bytes
from .validation import Limits, validate

log = logging.getLogger(__name__)

# The send span injects a traceparent even when the call came without trace context: its size is counted.
TRACEPARENT_HEADER = ("traceparent", "00-" + "0" * 32 + "-" + "0" * 16 + "-00")


@dataclass(frozen=True)
class TaskRecord:
    """A task's record, built (with its task id) before anything is published."""

    topic: str
    model_name: str
    event: task_pb2.AITaskEvent
    value: bytes

    @property
    def task_id(self) -> str:
        return self.event.task_id


class IngestServicer(ingest_pb2_grpc.IngestServiceServicer):
    """Accepts tasks; a task id is only returned after Kafka acknowledged the task.

    Batch-priority tasks go to ``batch_tasks_topic`` (default: the tasks topic), the others to ``tasks_topic``.
    ``admission``, ``rate_quotas`` and ``in_flight`` (the concurrency quota) are optional: without them nothing
    is turned away for load.
    """

    def __init__(
        self,
        producer: AsyncProducer,
        *,
        tasks_topic: str,
        limits: Limits,
        max_batch_tasks: int,
        publish_timeout_s: float,
        idempotency: IdempotencyKeys,
        metrics: IngestMetrics | None = None,
        batch_tasks_topic: str | None = None,
        admission: Admission | None = None,
        rate_quotas: RateQuotas | None = None,
        in_flight: InFlightTasks | None = None,
        max_record_bytes: int = 1_000_000,
        record_finder: RecordFinder | None = None,
        claim_check: ClaimCheck | None = None,
    ) -> None:
        self._producer = producer
        self._topic = tasks_topic
        self._batch_topic = batch_tasks_topic or tasks_topic
        self._limits = limits
        self._max_batch_tasks = max_batch_tasks
        self._publish_timeout_s = publish_timeout_s
        self._idempotency = idempotency
        self._metrics = metrics if metrics is not None else IngestMetrics()
        self._load_checks = LoadChecks(
            metrics=self._metrics,
            idempotency=idempotency,
            topic_of=self.topic_of,
            admission=admission,
            rate_quotas=rate_quotas,
            in_flight=in_flight,
        )
        self._max_record_bytes = max_record_bytes
        self._record_finder = record_finder
        self._claim_check = claim_check or ClaimCheck(None, inline_limit_bytes=0, max_object_bytes=0)

    def topic_of(self, request: ingest_pb2.SubmitTaskRequest) -> str:
        return self._batch_topic if request.priority == task_pb2.PRIORITY_BATCH else self._topic

    async def SubmitTask(
        self, request: ingest_pb2.SubmitTaskRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ingest_pb2.SubmitTaskResponse:
        await self._validate_or_abort(context, [request], lambda _: "")
        await self._place_or_abort(context, [request], lambda _: "")
        records = await self._build_or_abort(context, [request], lambda _: "")
        reservation = await self._load_checks.admit_or_abort(context, [request])
        try:
            return (await self._accept_or_abort(context, [request], records, reservation))[0]
        finally:
            if reservation is not None:
                reservation.release()

    async def SubmitTasks(
        self, request: ingest_pb2.SubmitTasksRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ingest_pb2.SubmitTasksResponse:
        count = len(request.tasks)
        if count == 0 or count > self._max_batch_tasks:
            self._metrics.tasks_rejected.labels(REJECT_INVALID_ARGUMENT).inc(count)
            await abort_invalid(
                context, InvalidTask([("tasks", f"must hold 1 to {self._max_batch_tasks} tasks, not {count}")])
            )
        await self._validate_or_abort(context, request.tasks, lambda i: f"tasks[{i}].")
        await self._place_or_abort(context, request.tasks, lambda i: f"tasks[{i}].")
        records = await self._build_or_abort(context, request.tasks, lambda i: f"tasks[{i}].")
        reservation = await self._load_checks.admit_or_abort(context, request.tasks)
        try:
            return ingest_pb2.SubmitTasksResponse(
                tasks=await self._accept_or_abort(context, request.tasks, records, reservation)
            )
        finally:
            if reservation is not None:
                reservation.release()

    async def _validate_or_abort(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        requests: Sequence[ingest_pb2.SubmitTaskRequest],
        prefix: Callable[[int], str],
    ) -> None:
        violations: list[tuple[str, str]] = []
        for i, request in enumerate(requests):
            try:
                validate(request, self._limits, prefix=prefix(i))
            except InvalidTask as e:
                violations.extend(e.violations)
            except UnknownModel as e:
                self._metrics.tasks_rejected.labels(REJECT_MODEL_NOT_FOUND).inc(len(requests))
                await abort_with(
                    context,
                    code_pb2.NOT_FOUND,
                    f"{prefix(i)}model_name: {e}",
                    [error_info("MODEL_NOT_FOUND", model_name=e.model_name)],
                )
            except DeadlinePassed as e:
                self._metrics.tasks_rejected.labels(REJECT_DEADLINE_PASSED).inc(len(requests))
                await abort_with(context, code_pb2.FAILED_PRECONDITION, str(e), [error_info("DEADLINE_PASSED")])
        if violations:
            self._metrics.tasks_rejected.labels(REJECT_INVALID_ARGUMENT).inc(len(requests))
            await abort_invalid(context, InvalidTask(violations))

    async def UploadInput(
        self,
        request_iterator: AsyncIterator[ingest_pb2.UploadInputRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> ingest_pb2.UploadInputResponse:
        return await self._claim_check.upload(request_iterator, context, auth.current_tenant())

    async def _place_or_abort(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        requests: Sequence[ingest_pb2.SubmitTaskRequest],
        prefix: Callable[[int], str],
    ) -> None:
        """Large tensor contents to the object store, references checked (``claim_check.ClaimCheck.place``)."""
        tenant, violations = auth.current_tenant(), []
        try:
            for i, request in enumerate(requests):
                if request.input.WhichOneof("kind") == "tensors":
                    field = f"{prefix(i)}input.tensors.tensors"
                    violations.extend(await self._claim_check.place(request.input.tensors.tensors, tenant, field))
        except ObjectStoreUnavailable as e:
            self._metrics.tasks_rejected.labels(REJECT_OBJECT_STORE_UNAVAILABLE).inc(len(requests))
            await abort_with(
                context, code_pb2.UNAVAILABLE, f"object store: {e}", [error_info("OBJECT_STORE_UNAVAILABLE")]
            )
        except ObjectStoreError as e:  # refused, not unreachable: the mesh's configuration, not the call
            await abort_with(context, code_pb2.INTERNAL, f"object store refused the request: {e}")
        if violations:
            self._metrics.tasks_rejected.labels(REJECT_INVALID_ARGUMENT).inc(len(requests))
            await abort_invalid(context, InvalidTask(violations))

    async def _build_or_abort(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        requests: Sequence[ingest_pb2.SubmitTaskRequest],
        prefix: Callable[[int], str],
    ) -> list[TaskRecord]:
        """Each request's record; INVALID_ARGUMENT naming ``input.text`` when one would exceed
        ``max_record_bytes``, before any is published (a batch stays all or nothing)."""
        tenant = auth.current_tenant()
        records = [self._record_of(request, tenant) for request in requests]
        headers = [*events.task_headers(), *_trace_headers()]
        violations = []
        for i, record in enumerate(records):
            size = record_bytes(record.task_id.encode(), record.value, headers)
            if size > self._max_record_bytes:
                violations.append(_too_large_record(requests[i], prefix(i), size, self._max_record_bytes))
        if violations:
            self._metrics.tasks_rejected.labels(REJECT_INVALID_ARGUMENT).inc(len(requests))
            await abort_invalid(context, InvalidTask(violations))
        return records

    def _record_of(self, request: ingest_pb2.SubmitTaskRequest, tenant: str) -> TaskRecord:
        event = task_pb2.AITaskEvent(
            schema_version=events.SCHEMA_VERSION,
            # With a key, the same id in every replica: a retry through another one is dropped by the worker.
            task_id=derived_task_id(tenant, request.idempotency_key) if request.idempotency_key else str(uuid.uuid4()),
            model_name=request.model_name,
            model_version=request.model_version,
            input=request.input,
            parameters=request.parameters,
            submitted_at=events.now_timestamp(),
            idempotency_key=request.idempotency_key,
            tenant=tenant,
            priority=request.priority or task_pb2.PRIORITY_INTERACTIVE,
        )
        if request.HasField("deadline"):
            event.deadline.CopyFrom(request.deadline)
        return TaskRecord(self.topic_of(request), request.model_name, event, event.SerializeToString())

    async def _accept_or_abort(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        requests: Sequence[ingest_pb2.SubmitTaskRequest],
        records: Sequence[TaskRecord],
        reservation: Reservation | None,
    ) -> list[ingest_pb2.SubmitTaskResponse]:
        submissions = [self._accept(r, record, reservation) for r, record in zip(requests, records, strict=True)]
        outcomes = await asyncio.gather(*submissions, return_exceptions=True)
        failures = [o for o in outcomes if isinstance(o, BaseException)]
        if failures:
            first = next((f for f in failures if isinstance(f, RecordTooLarge)), failures[0])
            if isinstance(first, RecordTooLarge):
                self._metrics.tasks_rejected.labels(REJECT_INVALID_ARGUMENT).inc(len(requests))
                await abort_invalid(context, InvalidTask([("input.text", str(first))]))
            if isinstance(first, BrokerUnavailable | TimeoutError):
                unacknowledged = sum(isinstance(f, BrokerUnavailable | TimeoutError) for f in failures)
                self._metrics.tasks_rejected.labels(REJECT_BROKER_UNAVAILABLE).inc(unacknowledged)
                log.warning("broker did not acknowledge %d of %d tasks: %s", len(failures), len(requests), first)
                await abort_with(
                    context,
                    code_pb2.UNAVAILABLE,
                    "the task was not accepted: Kafka did not acknowledge it in time; retry later "
                    "(with the same idempotency key)",
                    [error_info("BROKER_UNAVAILABLE")],
                )
            raise first
        return [o for o in outcomes if isinstance(o, ingest_pb2.SubmitTaskResponse)]

    async def _accept(
        self, request: ingest_pb2.SubmitTaskRequest, record: TaskRecord, reservation: Reservation | None
    ) -> ingest_pb2.SubmitTaskResponse:
        if request.idempotency_key:
            # Scoped per tenant: one tenant's key never returns another's task. A tenant name has no "/".
            accepted, duplicate = await self._idempotency.submit_once(
                f"{record.event.tenant}/{request.idempotency_key}",
                lambda: self._publish(record, reservation),
                self._resolve,
            )
        else:
            accepted, duplicate = await self._publish(record, reservation), False
        return ingest_pb2.SubmitTaskResponse(
            task_id=accepted.task_id, accepted_at=accepted.accepted_at, duplicate=duplicate
        )

    async def _publish(self, record: TaskRecord, reservation: Reservation | None) -> Accepted:
        """Produce ``record`` and wait for its acknowledgement. Raises RecordTooLarge, BrokerUnavailable when it
        was refused before it was queued (nothing written), or PublishInDoubt when it may have been written."""
        task_id = record.task_id
        runtime.task_id_var.set(task_id)  # this coroutine runs as its own asyncio task (gather)
        headers = events.task_headers()
        # A copy, not the event's own field: a sub-message keeps its whole message (the task's text) alive, and the
        # idempotency keys keep this for AIMESH_IDEMPOTENCY_TTL_S (a soak run grew ingest by 200 MB in 30 minutes).
        accepted = Accepted(task_id=task_id, accepted_at=timestamp_pb2.Timestamp())
        accepted.accepted_at.CopyFrom(record.event.submitted_at)
        if reservation is not None:
            reservation.bind(task_id)  # before producing: its result, however fast, finds it tracked
        try:
            with tracing.send_span(record.topic, task_id, headers):
                produced_at_ms = time.time_ns() // 1_000_000  # librdkafka stamps the record no earlier
                delivery = asyncio.ensure_future(
                    self._producer.produce(record.topic, key=task_id, value=record.value, headers=headers)
                )
                delivery.add_done_callback(_retrieve)
                sent = SentRecord(record.topic, record.model_name, accepted, produced_at_ms, delivery)
                with self._metrics.time_publish():
                    await self._delivered(sent, self._publish_timeout_s + 1.0)
        except BaseException:
            if reservation is not None:
                reservation.unbind(task_id)
            raise
        self._metrics.tasks_accepted.labels(record.model_name).inc()
        log.debug("accepted task %s for model %s", task_id, record.model_name)
        return accepted

    async def _delivered(self, sent: SentRecord, timeout_s: float) -> None:
        """Wait for ``sent``'s delivery report and translate its failure."""
        try:
            await asyncio.wait_for(asyncio.shield(sent.delivery), timeout_s)
        except TimeoutError:
            # librdkafka is still trying: the record may yet be written.
            raise PublishInDoubt("no delivery report in time", record=sent) from None
        except BrokerUnavailable as e:
            if _too_large(e):
                raise RecordTooLarge(f"the producer refused the task's record as too large: {e}") from e
            if e.kafka_error is None:
                raise  # refused before it was queued: nothing was written
            raise PublishInDoubt(str(e), record=sent, kafka_error=e.kafka_error) from e

    async def _resolve(self, sent: SentRecord) -> Accepted:
        """The retry of a key whose record is in doubt: its task when that record was delivered or is found in
        its partition; else PublishInDoubt again. Never produces a second record."""
        runtime.task_id_var.set(sent.accepted.task_id)
        if not sent.delivery.done() or sent.delivery.exception() is None:
            await self._delivered(sent, self._publish_timeout_s)
        elif self._record_finder is None:
            raise PublishInDoubt("an earlier record with this key may have been written", record=sent)
        else:
            try:
                landed = await self._record_finder.landed(sent.topic, sent.accepted.task_id, sent.produced_at_ms)
            except LookupUnavailable as e:
                raise PublishInDoubt(f"cannot tell whether the earlier record landed: {e}", record=sent) from e
            if not landed:
                raise PublishInDoubt("the earlier record with this key is not in its partition (yet)", record=sent)
            log.info("task %s: its record landed although its delivery was not acknowledged", sent.accepted.task_id)
        self._metrics.tasks_accepted.labels(sent.model_name).inc()
        return sent.accepted


def _too_large_record(request: ingest_pb2.SubmitTaskRequest, prefix: str, size: int, limit: int) -> tuple[str, str]:
    over = f"the limit is {limit} bytes (AIMESH_MAX_RECORD_BYTES)"
    if request.input.WhichOneof("kind") == "tensors":
        return (
            f"{prefix}input.tensors",
            f"the task's Kafka record would be {size} bytes; {over}: send large contents with UploadInput "
            "and set the tensor's object instead",
        )
    text_bytes = len(request.input.text.encode())
    return (
        f"{prefix}input.text",
        f"the task's Kafka record would be {size} bytes (its text {text_bytes}, the rest parameters, ids and "
        f"headers); {over}: shorten it by at least {size - limit} bytes",
    )


def _trace_headers() -> list[tuple[str, str | bytes | None]]:
    """The trace headers the send span will add to a record in the current context (an upper bound)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    carrier.setdefault(*TRACEPARENT_HEADER)
    return list(carrier.items())


def _too_large(error: BrokerUnavailable) -> bool:
    """Whether librdkafka (at produce) or the broker (in the delivery report) refused the record as too large."""
    cause = error.__cause__
    kafka_error = cause.args[0] if isinstance(cause, KafkaException) and cause.args else error.kafka_error
    # librdkafka reports its own refusal with the broker's code, MSG_SIZE_TOO_LARGE, too.
    return isinstance(kafka_error, KafkaError) and kafka_error.code() == KafkaError.MSG_SIZE_TOO_LARGE


def _retrieve(future: asyncio.Future[Any]) -> None:
    # A delivery nobody awaits any more (the call gave up waiting) must not log "exception never retrieved".
    if not future.cancelled():
        future.exception()
