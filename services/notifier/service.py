"""The NotifierService servicer: task state and result streams by task id."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol

import grpc
from google.rpc import code_pb2, error_details_pb2

from aimesh import auth, events, tracing
from aimesh.errors import BrokerUnavailable, InvalidTask
from aimesh.grpc_edge import abort_invalid, abort_with, error_info
from aimesh.kafka import Headers
from aimesh.metrics import (
    CANCEL_ALREADY_ENDED,
    CANCEL_NOT_FOUND,
    CANCEL_REQUESTED,
    CANCEL_UNAVAILABLE,
    NotifierMetrics,
    status_label,
)
from aimesh.v1 import notifier_pb2, notifier_pb2_grpc, result_pb2, task_pb2

from .store import Denied, Ended, TaskStore, Update, WatchItem

log = logging.getLogger(__name__)

# How long CancelTask waits for a task the notifier has not read yet (a cancel right after the submit).
CANCEL_WAIT_S = 2.0


@dataclass(frozen=True)
class StreamLimits:
    """What one client may hold open: subscriptions (a WatchTask stream, or one task of a WatchTasks stream) per
    connection (its peer address) and per tenant, and how long a stream may go without an update."""

    max_per_connection: int = 100
    max_per_tenant: int = 1000
    idle_timeout_s: float = 600.0


class TooManySubscriptions(Exception):
    def __init__(self, scope: str, limit: int) -> None:
        super().__init__(
            f"too many watched tasks (open WatchTask streams and tasks of WatchTasks streams) for this {scope} "
            f"(the limit is {limit}); close one first"
        )
        self.scope = scope
        self.limit = limit


class Publisher(Protocol):
    """What CancelTask needs of a producer (``aimesh.kafka.AsyncProducer``): publish one record and return once
    the broker acknowledged it, or raise BrokerUnavailable."""

    async def produce(self, topic: str, *, key: str, value: bytes, headers: Headers | None = None) -> object: ...


@dataclass(frozen=True)
class Cancellations:
    """Where CancelTask publishes cancellation requests, and how long it waits for the broker's acknowledgement."""

    producer: Publisher
    topic: str
    publish_timeout_s: float = 5.0


class NotifierServicer(notifier_pb2_grpc.NotifierServiceServicer):
    """``ready`` is set once the notifier has read the task history it needs to answer GetTask truthfully.

    A task of another tenant is answered exactly as a task that does not exist (NOT_FOUND, same message and
    details), so a tenant learns nothing of others' tasks.
    """

    def __init__(
        self,
        store: TaskStore,
        *,
        ready: asyncio.Event,
        metrics: NotifierMetrics | None = None,
        limits: StreamLimits | None = None,
        cancels: Cancellations | None = None,
        cancel_wait_s: float = CANCEL_WAIT_S,
    ) -> None:
        self._store = store
        self._ready = ready
        self._metrics = metrics if metrics is not None else NotifierMetrics()
        self._limits = limits if limits is not None else StreamLimits()
        self._cancels = cancels
        self._cancel_wait_s = cancel_wait_s
        self._streams_by_peer: Counter[str] = Counter()
        self._streams_by_tenant: Counter[str] = Counter()

    async def GetTask(
        self, request: notifier_pb2.GetTaskRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> notifier_pb2.GetTaskResponse:
        await _check_task_id(context, request.task_id)
        if not self._ready.is_set():
            await _abort_starting(context)
        state = self._store.get(request.task_id, auth.current_tenant())
        if state is None:
            await _abort_not_found(context, request.task_id)
        return notifier_pb2.GetTaskResponse(state=state)

    async def WatchTask(
        self, request: notifier_pb2.WatchTaskRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[notifier_pb2.WatchTaskResponse]:
        await _check_task_id(context, request.task_id)
        async with contextlib.aclosing(self._watch(context, [request])) as states:
            async for state in states:
                yield notifier_pb2.WatchTaskResponse(state=state)

    async def WatchTasks(
        self, request: notifier_pb2.WatchTasksRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[notifier_pb2.WatchTasksResponse]:
        count, limit = len(request.tasks), self._limits.max_per_connection
        violations: list[tuple[str, str]] = []
        if not 1 <= count <= limit:
            violations.append(
                ("tasks", f"must name 1 to {limit} tasks (the per-connection subscription limit), not {count}")
            )
        seen: set[str] = set()
        for i, task in enumerate(request.tasks):
            if not _is_uuid(task.task_id):
                violations.append((f"tasks[{i}].task_id", _NOT_A_TASK_ID))
            elif task.task_id in seen:
                violations.append((f"tasks[{i}].task_id", "names a task already named earlier in the list"))
            seen.add(task.task_id)
        if violations:
            await abort_invalid(context, InvalidTask(violations))
        async with contextlib.aclosing(self._watch(context, list(request.tasks))) as states:
            async for state in states:
                yield notifier_pb2.WatchTasksResponse(state=state)

    async def _watch(
        self, context: grpc.aio.ServicerContext[Any, Any], requests: list[notifier_pb2.WatchTaskRequest]
    ) -> AsyncGenerator[notifier_pb2.TaskState, None]:
        """The updates of every task in ``requests`` (valid, distinct ids), ending once each has ended. Each
        task is one subscription against the limits, freed when the task ends or the stream closes."""
        tenant, peer = auth.current_tenant(), context.peer()
        try:
            self._open_streams(peer, tenant, len(requests))
        except TooManySubscriptions as e:
            await abort_with(
                context,
                code_pb2.RESOURCE_EXHAUSTED,
                str(e),
                [
                    error_info("TOO_MANY_SUBSCRIPTIONS", scope=e.scope, limit=str(e.limit)),
                    error_details_pb2.QuotaFailure(
                        violations=[
                            error_details_pb2.QuotaFailure.Violation(
                                subject=e.scope, description=f"at most {e.limit} open WatchTask streams"
                            )
                        ]
                    ),
                ],
            )
        queue: asyncio.Queue[tuple[str, WatchItem]] = asyncio.Queue()
        pending: set[str] = set()

        def finish(task_id: str) -> None:
            """Stop watching one task: unsubscribe it and free its place."""
            pending.discard(task_id)
            self._store.unsubscribe(task_id, queue)
            self._metrics.active_subscriptions.dec()
            self._close_streams(peer, tenant, 1)

        try:
            for request in requests:
                pending.add(request.task_id)
                self._metrics.active_subscriptions.inc()
                self._store.subscribe(
                    request.task_id,
                    queue,
                    functools.partial(_tagged, queue, request.task_id),
                    tenant,
                    request.after_sequence,
                )
            while pending:
                try:
                    task_id, update = await asyncio.wait_for(queue.get(), self._limits.idle_timeout_s)
                except TimeoutError:
                    await abort_with(
                        context,
                        code_pb2.DEADLINE_EXCEEDED,
                        f"no update for {self._limits.idle_timeout_s:g}s: the stream is closed; watch again to "
                        "resume (pass the last sequence seen as after_sequence)",
                        [error_info("STREAM_IDLE", idle_timeout_s=f"{self._limits.idle_timeout_s:g}")],
                    )
                if task_id not in pending:
                    continue  # queued before the task was finished with
                if isinstance(update, Denied):
                    await _abort_not_found(context, task_id)
                if isinstance(update, Ended):
                    finish(task_id)
                    continue
                state = update.state
                status = result_pb2.TaskStatus.Name(state.status)
                _observe_delivery(self._metrics, state)
                with tracing.deliver_span(task_id, update.trace, status=status):
                    yield state
                if events.is_terminal(state.status):
                    finish(task_id)
        finally:
            # Runs on normal end, on abort and on client cancellation (CancelledError): nothing stays held.
            for task_id in list(pending):
                finish(task_id)

    async def CancelTask(
        self, request: notifier_pb2.CancelTaskRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> notifier_pb2.CancelTaskResponse:
        await _check_task_id(context, request.task_id)
        if not self._ready.is_set():
            await _abort_starting(context)
        tenant, task_id = auth.current_tenant(), request.task_id
        state = await self._wait_known(task_id, tenant)
        if state is None:
            self._metrics.cancel_requests.labels(CANCEL_NOT_FOUND).inc()
            await _abort_not_found(context, task_id)
        if events.is_terminal(state.status):
            self._metrics.cancel_requests.labels(CANCEL_ALREADY_ENDED).inc()
            return notifier_pb2.CancelTaskResponse(outcome=notifier_pb2.CANCEL_OUTCOME_ALREADY_ENDED, state=state)
        if self._cancels is None:
            await abort_with(
                context, code_pb2.UNIMPLEMENTED, "this notifier publishes no cancellations", [error_info("NO_CANCEL")]
            )
        event = task_pb2.AICancelEvent(
            schema_version=events.SCHEMA_VERSION, task_id=task_id, tenant=tenant, requested_at=events.now_timestamp()
        )
        headers = events.cancel_headers()
        try:
            with tracing.send_span(self._cancels.topic, task_id, headers):
                delivery = self._cancels.producer.produce(
                    self._cancels.topic, key=task_id, value=event.SerializeToString(), headers=headers
                )
                # The producer's own delivery timeout is publish_timeout_s: this only guards against a hang.
                await asyncio.wait_for(delivery, self._cancels.publish_timeout_s + 1.0)
        except (BrokerUnavailable, TimeoutError) as e:
            self._metrics.cancel_requests.labels(CANCEL_UNAVAILABLE).inc()
            log.warning("broker did not acknowledge the cancellation of %s: %s", task_id, e)
            await abort_with(
                context,
                code_pb2.UNAVAILABLE,
                "the cancellation was not recorded: Kafka did not acknowledge it in time; retry",
                [error_info("BROKER_UNAVAILABLE")],
            )
        self._metrics.cancel_requests.labels(CANCEL_REQUESTED).inc()
        log.info("cancellation of task %s requested", task_id)
        current = self._store.get(task_id, tenant) or state
        return notifier_pb2.CancelTaskResponse(outcome=notifier_pb2.CANCEL_OUTCOME_REQUESTED, state=current)

    async def _wait_known(self, task_id: str, tenant: str) -> notifier_pb2.TaskState | None:
        """The task's state once it is known to be ``tenant``'s, waiting up to ``cancel_wait_s`` for a task not
        read yet; None for a task unknown by then or another tenant's. Another tenant's task takes the whole
        wait too, so that the time of the answer does not tell it from an unknown one."""
        state = self._store.get(task_id, tenant)
        if state is not None:
            return state
        loop = asyncio.get_running_loop()
        until = loop.time() + self._cancel_wait_s
        queue = self._store.watch(task_id, tenant)
        try:
            first = await asyncio.wait_for(queue.get(), self._cancel_wait_s)
        except TimeoutError:
            return None
        finally:
            self._store.unwatch(task_id, queue)
        if isinstance(first, Update):
            return self._store.get(task_id, tenant)
        await asyncio.sleep(max(0.0, until - loop.time()))
        return None

    def _open_streams(self, peer: str, tenant: str, count: int) -> None:
        """Count ``count`` more subscriptions of ``peer`` (one client connection) and ``tenant``, or raise
        TooManySubscriptions (counting nothing) if either would pass its limit."""
        if self._streams_by_peer[peer] + count > self._limits.max_per_connection:
            raise TooManySubscriptions("connection", self._limits.max_per_connection)
        if self._streams_by_tenant[tenant] + count > self._limits.max_per_tenant:
            raise TooManySubscriptions("tenant", self._limits.max_per_tenant)
        self._streams_by_peer[peer] += count
        self._streams_by_tenant[tenant] += count

    def _close_streams(self, peer: str, tenant: str, count: int) -> None:
        for counter, key in ((self._streams_by_peer, peer), (self._streams_by_tenant, tenant)):
            counter[key] -= count
            if counter[key] <= 0:
                del counter[key]


def _tagged(queue: asyncio.Queue[tuple[str, WatchItem]], task_id: str, item: WatchItem) -> None:
    queue.put_nowait((task_id, item))


def _observe_delivery(metrics: NotifierMetrics, state: notifier_pb2.TaskState) -> None:
    """Count an update handed to a stream; a terminal one also observes the task's end-to-end time."""
    status = status_label(state.status)
    metrics.updates_delivered.labels(status).inc()
    if not events.is_terminal(state.status):
        return
    submitted = events.timestamp_s(state.submitted_at)
    if not submitted and state.result.HasField("produced_at"):
        # The task record not read yet (the two topics are read independently): the worker's own timings
        # say when it was submitted.
        submitted = events.timestamp_s(state.result.produced_at) - state.result.timings.total.ToNanoseconds() / 1e9
    if submitted:
        model = state.model_name or state.result.model_name
        metrics.end_to_end_seconds.labels(model, status).observe(max(0.0, time.time() - submitted))


_NOT_A_TASK_ID = "must be a task id (a UUID) from SubmitTask"


def _is_uuid(task_id: str) -> bool:
    try:
        uuid.UUID(task_id)
    except ValueError:
        return False
    return True


async def _check_task_id(context: grpc.aio.ServicerContext[Any, Any], task_id: str) -> None:
    if not _is_uuid(task_id):
        await abort_invalid(context, InvalidTask([("task_id", _NOT_A_TASK_ID)]))


async def _abort_not_found(context: grpc.aio.ServicerContext[Any, Any], task_id: str) -> NoReturn:
    """The one answer for a task that is unknown and for a task of another tenant: they must not differ."""
    await abort_with(
        context,
        code_pb2.NOT_FOUND,
        f"task {task_id} is not known (never submitted, past retention, or not yet read)",
        [error_info("TASK_NOT_FOUND", task_id=task_id)],
    )


async def _abort_starting(context: grpc.aio.ServicerContext[Any, Any]) -> None:
    await abort_with(
        context,
        code_pb2.UNAVAILABLE,
        "the notifier is still reading task history; retry shortly",
        [error_info("NOTIFIER_STARTING")],
    )
