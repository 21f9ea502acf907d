"""The NotifierService servicer: task state and result streams by task id."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.rpc import code_pb2

from aimesh import events, tracing
from aimesh.errors import InvalidTask
from aimesh.grpc_edge import abort_invalid, abort_with, error_info
from aimesh.metrics import NotifierMetrics, status_label
from aimesh.v1 import notifier_pb2, notifier_pb2_grpc, result_pb2

from .store import TaskStore

log = logging.getLogger(__name__)


class NotifierServicer(notifier_pb2_grpc.NotifierServiceServicer):
    """``ready`` is set once the notifier has read the task history it needs to answer GetTask truthfully."""

    def __init__(self, store: TaskStore, *, ready: asyncio.Event, metrics: NotifierMetrics | None = None) -> None:
        self._store = store
        self._ready = ready
        self._metrics = metrics if metrics is not None else NotifierMetrics()

    async def GetTask(
        self, request: notifier_pb2.GetTaskRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> notifier_pb2.GetTaskResponse:
        await _check_task_id(context, request.task_id)
        if not self._ready.is_set():
            await _abort_starting(context)
        state = self._store.get(request.task_id)
        if state is None:
            await abort_with(
                context,
                code_pb2.NOT_FOUND,
                f"task {request.task_id} is not known (never submitted, past retention, or not yet read)",
                [error_info("TASK_NOT_FOUND", task_id=request.task_id)],
            )
        return notifier_pb2.GetTaskResponse(state=state)

    async def WatchTask(
        self, request: notifier_pb2.WatchTaskRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[notifier_pb2.WatchTaskResponse]:
        await _check_task_id(context, request.task_id)
        queue = self._store.watch(request.task_id)
        self._metrics.active_subscriptions.inc()
        try:
            while True:
                update = await queue.get()
                state = update.state
                status = result_pb2.TaskStatus.Name(state.status)
                _observe_delivery(self._metrics, state)
                with tracing.deliver_span(request.task_id, update.trace, status=status):
                    yield notifier_pb2.WatchTaskResponse(state=state)
                if events.is_terminal(state.status):
                    return
        finally:
            # Runs on normal end and on client cancellation (CancelledError): nothing stays held.
            self._store.unwatch(request.task_id, queue)
            self._metrics.active_subscriptions.dec()


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


async def _abort_starting(context: grpc.aio.ServicerContext[Any, Any]) -> None:
    await abort_with(
        context,
        code_pb2.UNAVAILABLE,
        "the notifier is still reading task history; retry shortly",
        [error_info("NOTIFIER_STARTING")],
    )
