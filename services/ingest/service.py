"""The IngestService servicer: validate, publish durably, answer with the task id."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
from google.rpc import code_pb2

from aimesh import auth, events, runtime, tracing
from aimesh.errors import BrokerUnavailable, DeadlinePassed, InvalidTask, UnknownModel
from aimesh.grpc_edge import abort_invalid, abort_with, error_info
from aimesh.kafka import AsyncProducer
from aimesh.metrics import (
    REJECT_BROKER_UNAVAILABLE,
    REJECT_DEADLINE_PASSED,
    REJECT_INVALID_ARGUMENT,
    REJECT_MODEL_NOT_FOUND,
    IngestMetrics,
)
from aimesh.v1 import ingest_pb2, ingest_pb2_grpc, task_pb2

from .idempotency import Accepted, IdempotencyKeys
from .validation import Limits, validate

log = logging.getLogger(__name__)


class IngestServicer(ingest_pb2_grpc.IngestServiceServicer):
    """Accepts tasks; a task id is only returned after Kafka acknowledged the task."""

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
    ) -> None:
        self._producer = producer
        self._topic = tasks_topic
        self._limits = limits
        self._max_batch_tasks = max_batch_tasks
        self._publish_timeout_s = publish_timeout_s
        self._idempotency = idempotency
        self._metrics = metrics if metrics is not None else IngestMetrics()

    async def SubmitTask(
        self, request: ingest_pb2.SubmitTaskRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ingest_pb2.SubmitTaskResponse:
        await self._validate_or_abort(context, [request], lambda _: "")
        return (await self._accept_or_abort(context, [request]))[0]

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
        return ingest_pb2.SubmitTasksResponse(tasks=await self._accept_or_abort(context, request.tasks))

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

    async def _accept_or_abort(
        self, context: grpc.aio.ServicerContext[Any, Any], requests: Sequence[ingest_pb2.SubmitTaskRequest]
    ) -> list[ingest_pb2.SubmitTaskResponse]:
        submissions = [self._accept(request) for request in requests]
        outcomes = await asyncio.gather(*submissions, return_exceptions=True)
        failures = [o for o in outcomes if isinstance(o, BaseException)]
        if failures:
            first = failures[0]
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

    async def _accept(self, request: ingest_pb2.SubmitTaskRequest) -> ingest_pb2.SubmitTaskResponse:
        tenant = auth.current_tenant()
        if request.idempotency_key:
            # Scoped per tenant: one tenant's key never returns another's task. A tenant name has no "/".
            accepted, duplicate = await self._idempotency.submit_once(
                f"{tenant}/{request.idempotency_key}", lambda: self._publish(request, tenant)
            )
        else:
            accepted, duplicate = await self._publish(request, tenant), False
        return ingest_pb2.SubmitTaskResponse(
            task_id=accepted.task_id, accepted_at=accepted.accepted_at, duplicate=duplicate
        )

    async def _publish(self, request: ingest_pb2.SubmitTaskRequest, tenant: str) -> Accepted:
        task_id = str(uuid.uuid4())
        runtime.task_id_var.set(task_id)  # this coroutine runs as its own asyncio task (gather)
        event = task_pb2.AITaskEvent(
            schema_version=events.SCHEMA_VERSION,
            task_id=task_id,
            model_name=request.model_name,
            model_version=request.model_version,
            input=request.input,
            parameters=request.parameters,
            submitted_at=events.now_timestamp(),
            idempotency_key=request.idempotency_key,
            tenant=tenant,
        )
        if request.HasField("deadline"):
            event.deadline.CopyFrom(request.deadline)
        headers = events.task_headers()
        with tracing.send_span(self._topic, task_id, headers):
            delivery: Awaitable[object] = self._producer.produce(
                self._topic, key=task_id, value=event.SerializeToString(), headers=headers
            )
            with self._metrics.time_publish():
                await asyncio.wait_for(delivery, self._publish_timeout_s + 1.0)
        self._metrics.tasks_accepted.labels(request.model_name).inc()
        log.debug("accepted task %s for model %s", task_id, request.model_name)
        return Accepted(task_id=task_id, accepted_at=event.submitted_at)
