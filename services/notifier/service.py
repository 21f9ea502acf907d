"""The NotifierService servicer: task state and result streams by task id."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
from google.rpc import code_pb2, error_details_pb2

from aimesh import auth, events, tracing
from aimesh.errors import InvalidTask
from aimesh.grpc_edge import abort_invalid, abort_with, error_info
from aimesh.metrics import NotifierMetrics, status_label
from aimesh.v1 import notifier_pb2, notifier_pb2_grpc, result_pb2

from .store import Denied, TaskStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamLimits:
    """What one client may hold open: WatchTask streams per connection (its peer address) and per tenant, and
    how long a stream may go without an update."""

    max_per_connection: int = 100
    max_per_tenant: int = 1000
    idle_timeout_s: float = 600.0


class TooManySubscriptions(Exception):
    def __init__(self, scope: str, limit: int) -> None:
        super().__init__(f"too many open WatchTask streams for this {scope} (the limit is {limit}); close one first")
        self.scope = scope
        self.limit = limit


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
    ) -> None:
        self._store = store
        self._ready = ready
        self._metrics = metrics if metrics is not None else NotifierMetrics()
        self._limits = limits if limits is not None else StreamLimits()
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
        tenant, peer = auth.current_tenant(), context.peer()
        try:
            self._open_stream(peer, tenant)
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
        queue = self._store.watch(request.task_id, tenant)
        self._metrics.active_subscriptions.inc()
        try:
            while True:
                try:
                    update = await asyncio.wait_for(queue.get(), self._limits.idle_timeout_s)
                except TimeoutError:
                    await abort_with(
                        context,
                        code_pb2.DEADLINE_EXCEEDED,
                        f"no update for {self._limits.idle_timeout_s:g}s: the stream is closed; watch again to "
                        "resume (the current state comes first)",
                        [error_info("STREAM_IDLE", idle_timeout_s=f"{self._limits.idle_timeout_s:g}")],
                    )
                if isinstance(update, Denied):
                    await _abort_not_found(context, request.task_id)
                state = update.state
                status = result_pb2.TaskStatus.Name(state.status)
                _observe_delivery(self._metrics, state)
                with tracing.deliver_span(request.task_id, update.trace, status=status):
                    yield notifier_pb2.WatchTaskResponse(state=state)
                if events.is_terminal(state.status):
                    return
        finally:
            # Runs on normal end, on abort and on client cancellation (CancelledError): nothing stays held.
            self._store.unwatch(request.task_id, queue)
            self._metrics.active_subscriptions.dec()
            self._close_stream(peer, tenant)

    def _open_stream(self, peer: str, tenant: str) -> None:
        """Count one more open stream of ``peer`` (one client connection) and ``tenant``, or raise
        TooManySubscriptions (counting nothing) if either is at its limit."""
        if self._streams_by_peer[peer] >= self._limits.max_per_connection:
            raise TooManySubscriptions("connection", self._limits.max_per_connection)
        if self._streams_by_tenant[tenant] >= self._limits.max_per_tenant:
            raise TooManySubscriptions("tenant", self._limits.max_per_tenant)
        self._streams_by_peer[peer] += 1
        self._streams_by_tenant[tenant] += 1

    def _close_stream(self, peer: str, tenant: str) -> None:
        for counter, key in ((self._streams_by_peer, peer), (self._streams_by_tenant, tenant)):
            counter[key] -= 1
            if counter[key] <= 0:
                del counter[key]


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


async def _check_task_id(context: grpc.aio.ServicerContext[Any, Any], task_id: str) -> None:
    try:
        uuid.UUID(task_id)
    except ValueError:
        await abort_invalid(context, InvalidTask([("task_id", "must be a task id (a UUID) from SubmitTask")]))


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
