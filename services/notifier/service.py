"""The NotifierService servicer: task state and result streams by task id."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from aimesh import auth, events, tracing
from aimesh.errors import InvalidTask
from aimesh.grpc_edge import abort_invalid
from aimesh.metrics import NotifierMetrics, status_label
from aimesh.v1 import notifier_pb2, notifier_pb2_grpc, result_pb2

from .buffers import StreamBuffer, SubscriptionMemory
from .cancel_requests import CANCEL_WAIT_S, Cancellations, CancelRequests, Publisher
from .downloads import Downloads
from .forwarding import Forwarder, Metadata, Relays, forwarded_metadata, is_forwarded, rebalancing
from .ownership import Everything, Ownership
from .refusals import (
    NOT_A_TASK_ID,
    abort_behind,
    abort_idle,
    abort_not_found,
    abort_quota,
    abort_starting,
    abort_unread,
    check_task_id,
    is_task_id,
)
from .store import Denied, Ended, Moved, TaskStore, Update
from .subscriptions import StreamLimits, SubscriptionCounts, TooManySubscriptions
from .watch import Watch, written

__all__ = [
    "CANCEL_WAIT_S",
    "Cancellations",
    "NotifierServicer",
    "Publisher",
    "StreamLimits",
    "TooManySubscriptions",
]

log = logging.getLogger(__name__)

R = TypeVar("R")

# How soon a client refused for want of stream buffer memory may try again: stuck streams end within the
# send timeout, and ordinary ones free their buffers as they send.
BUFFERS_FULL_RETRY_S = 1.0


class NotifierServicer(notifier_pb2_grpc.NotifierServiceServicer):
    """``ready`` is set once the notifier has read the task history it needs to answer GetTask truthfully.

    A task of another tenant is answered exactly as a task that does not exist (NOT_FOUND, same message and
    details), so a tenant learns nothing of others' tasks.

    ``ownership`` says which tasks this replica answers for (default: every task, a standalone notifier); a
    call about any other is forwarded through ``forwarder`` to its owner (see ``forwarding``), and a watch
    follows such tasks there, and follows a task whose partition moved away mid-stream (the store hands it
    MOVED) at its new owner. A forwarded watch does not count against its connection's cap (that connection
    is another replica's, carrying many clients' streams, each counted there), only its tenant's.
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
        ownership: Ownership | None = None,
        forwarder: Forwarder | None = None,
        downloads: Downloads | None = None,
    ) -> None:
        self._store = store
        self._downloads = downloads if downloads is not None else Downloads(None)
        self._ownership: Ownership = ownership if ownership is not None else Everything()
        # With every task local (the default) it never opens a channel.
        self._forwarder = forwarder if forwarder is not None else Forwarder()
        self._ready = ready
        self._metrics = metrics if metrics is not None else NotifierMetrics()
        self._limits = limits if limits is not None else StreamLimits()
        self._cancel_requests = CancelRequests(store, self._metrics, cancels, cancel_wait_s)
        self._subscriptions = SubscriptionCounts(self._limits)
        self.memory = SubscriptionMemory(self._limits.max_total_buffer_bytes)

    async def GetTask(
        self, request: notifier_pb2.GetTaskRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> notifier_pb2.GetTaskResponse:
        await check_task_id(context, request.task_id)
        if not self._ownership.is_local(request.task_id):
            return await self._forward(
                context,
                request.task_id,
                lambda stub, metadata, timeout: stub.GetTask(request, metadata=metadata, timeout=timeout),
            )
        await self._check_serving(context, request.task_id)
        state = self._store.get(request.task_id, auth.current_tenant())
        if state is None:
            await abort_not_found(context, request.task_id)
        return notifier_pb2.GetTaskResponse(state=state)

    async def WatchTask(
        self, request: notifier_pb2.WatchTaskRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[notifier_pb2.WatchTaskResponse]:
        async def watch() -> None:
            await check_task_id(context, request.task_id)
            await self._watch(context, [request], lambda s: notifier_pb2.WatchTaskResponse(state=s))

        async for response in written(watch()):
            yield response

    async def WatchTasks(
        self, request: notifier_pb2.WatchTasksRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[notifier_pb2.WatchTasksResponse]:
        async def watch() -> None:
            await self._check_watch_tasks(context, request)
            await self._watch(context, list(request.tasks), lambda s: notifier_pb2.WatchTasksResponse(state=s))

        async for response in written(watch()):
            yield response

    async def _forward(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        task_id: str,
        call: Callable[[Any, Metadata, float | None], Awaitable[R]],
    ) -> R:
        """The answer of the task's owner to ``call``; UNAVAILABLE for a forwarded call (no second hop: the
        replica that forwarded it asks its directory again)."""
        if is_forwarded(context):
            await rebalancing().abort(context)
        return await self._forwarder.unary(context, lambda: self._ownership.owner_address(task_id), call)

    async def _check_serving(self, context: grpc.aio.ServicerContext[Any, Any], task_id: str) -> None:
        """UNAVAILABLE until this notifier has read the history of the task's partition."""
        if not (self._ready.is_set() and self._ownership.is_ready(task_id)):
            await abort_starting(context)

    async def _check_watch_tasks(
        self, context: grpc.aio.ServicerContext[Any, Any], request: notifier_pb2.WatchTasksRequest
    ) -> None:
        count, limit = len(request.tasks), self._limits.max_per_connection
        violations: list[tuple[str, str]] = []
        if not 1 <= count <= limit:
            violations.append(
                ("tasks", f"must name 1 to {limit} tasks (the per-connection subscription limit), not {count}")
            )
        seen: set[str] = set()
        for i, task in enumerate(request.tasks):
            if not is_task_id(task.task_id):
                violations.append((f"tasks[{i}].task_id", NOT_A_TASK_ID))
            elif task.task_id in seen:
                violations.append((f"tasks[{i}].task_id", "names a task already named earlier in the list"))
            seen.add(task.task_id)
        if violations:
            await abort_invalid(context, InvalidTask(violations))

    async def _watch(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        requests: list[notifier_pb2.WatchTaskRequest],
        response: Callable[[notifier_pb2.TaskState], Message],
    ) -> None:
        """Write ``response`` of each update of every task in ``requests`` (valid, distinct ids), ending once
        each has ended. Each task is one subscription against the limits, freed when the task ends or the
        stream closes; the stream's buffer is freed with it. Tasks this replica owns are followed in its store,
        the others at their owners (``Relays``); a forwarded watch must name only tasks owned here."""
        tenant, forwarded = auth.current_tenant(), is_forwarded(context)
        if forwarded and not all(self._ownership.is_local(r.task_id) for r in requests):
            await rebalancing().abort(context)
        # A connection's identity in grpc.aio is its peer string: transport, address and port of the TCP
        # connection. Keyed with the tenant, clients of different tenants behind one proxy connection do not
        # share a cap; a client that opens more connections still meets the tenant's cap and the memory cap.
        connection = None if forwarded else (tenant, context.peer())
        await self._admit(context, connection, len(requests))
        watch = Watch(tenant, connection, StreamBuffer(self._limits.buffer, self.memory), asyncio.current_task())
        if not forwarded:
            watch.relays = self._relays(watch, forwarded_metadata(context))
        try:
            for request in requests:
                self._metrics.active_subscriptions.inc()
                watch.sent[request.task_id] = request.after_sequence
            self._follow(watch, {r.task_id: r.after_sequence for r in requests})
            if forwarded:
                # Tells the forwarding replica that this owner took the stream (see Relays).
                await context.send_initial_metadata(())
            await self._stream(context, watch, response)
        finally:
            # Runs on normal end, on abort and on client cancellation (CancelledError): nothing stays held.
            if watch.relays is not None:
                watch.relays.close()
            for task_id in watch.pending:
                self._finish(watch, task_id)
            watch.buffer.close()

    async def _stream(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        watch: Watch,
        response: Callable[[notifier_pb2.TaskState], Message],
    ) -> None:
        """Send the stream's updates until each task has ended, or until it is interrupted (``Watch.interrupt``)
        with the answer it ends with."""
        try:
            while watch.pending:
                got = await self._next(context, watch)
                if got is not None:
                    await self._send(context, watch, *got, response)
        except asyncio.CancelledError:
            if watch.failure is None or watch.handler is None:
                raise
            watch.handler.uncancel()
            await watch.failure.abort(context)

    def _follow(self, watch: Watch, tasks: dict[str, int]) -> None:
        """Follow each task (its id, the last sequence the stream had of it): in the store if owned here,
        else at its owner."""
        remote = {task_id: after for task_id, after in tasks.items() if not self._ownership.is_local(task_id)}
        for task_id, after in tasks.items():
            if task_id not in remote:
                self._subscribe(watch, task_id, after)
        if remote:
            if watch.relays is None:
                raise AssertionError("a forwarded watch names only tasks owned here (checked on its arrival)")
            watch.relays.follow(remote)

    def _subscribe(self, watch: Watch, task_id: str, after_sequence: int) -> None:
        deliver = functools.partial(watch.buffer.offer, task_id)
        self._store.subscribe(task_id, watch, deliver, watch.tenant, after_sequence)

    def _relays(self, watch: Watch, metadata: Metadata) -> Relays:
        return Relays(
            self._forwarder,
            self._ownership,
            metadata,
            offer=watch.buffer.offer,
            adopt=functools.partial(self._subscribe, watch),
            fail=watch.interrupt,
        )

    async def _next(self, context: grpc.aio.ServicerContext[Any, Any], watch: Watch) -> tuple[str, Update] | None:
        """The next update to send, or None once a task was finished with; ends the stream when nothing came
        within the idle timeout, or when the buffer overflowed and all it took was sent."""
        while True:
            try:
                got = await asyncio.wait_for(watch.buffer.next(), self._limits.idle_timeout_s)
            except TimeoutError:
                await abort_idle(context, self._limits.idle_timeout_s)
            if got is None:
                resume = ", ".join(f"{t}: {s}" for t, s in watch.sent.items() if t not in watch.ended)
                await abort_behind(context, self._limits.buffer, resume)
            task_id, item = got
            if task_id in watch.ended or isinstance(item, Denied):
                # Another tenant's task is watched on as an unknown one is (the store has dropped this
                # watcher): neither the answer nor its timing tells the two apart.
                continue
            if isinstance(item, Ended):
                self._finish(watch, task_id)
                return None
            if isinstance(item, Moved):
                await self._moved(context, watch, task_id)
                continue
            return task_id, item

    async def _moved(self, context: grpc.aio.ServicerContext[Any, Any], watch: Watch, task_id: str) -> None:
        """Follow a task whose partition moved to another replica there, from the last update sent (each one
        before the move was); a forwarded stream ends UNAVAILABLE instead, so that the replica that forwarded
        it does that."""
        if watch.relays is None:
            await rebalancing().abort(context)
        watch.relays.follow({task_id: watch.sent[task_id]})

    async def _send(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        watch: Watch,
        task_id: str,
        update: Update,
        response: Callable[[notifier_pb2.TaskState], Message],
    ) -> None:
        """Write one update, ending the stream if its client does not take it within the send timeout (its
        HTTP/2 flow-control window stays full: it does not read)."""
        state = update.state
        _observe_delivery(self._metrics, state)
        with tracing.deliver_span(task_id, update.trace, status=result_pb2.TaskStatus.Name(state.status)):
            try:
                await asyncio.wait_for(context.write(response(state)), self._limits.send_timeout_s)
            except TimeoutError:
                await abort_unread(context, self._limits.send_timeout_s)
        watch.sent[task_id] = state.sequence
        if events.is_terminal(state.status):
            self._finish(watch, task_id)

    def _finish(self, watch: Watch, task_id: str) -> None:
        """Stop watching one task: unsubscribe it and free its place."""
        watch.ended.add(task_id)
        self._store.unsubscribe(task_id, watch)
        self._metrics.active_subscriptions.dec()
        self._subscriptions.close(watch.connection, watch.tenant, 1)

    async def CancelTask(
        self, request: notifier_pb2.CancelTaskRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> notifier_pb2.CancelTaskResponse:
        await check_task_id(context, request.task_id)
        if not self._ownership.is_local(request.task_id):
            return await self._forward(
                context,
                request.task_id,
                lambda stub, metadata, timeout: stub.CancelTask(request, metadata=metadata, timeout=timeout),
            )
        await self._check_serving(context, request.task_id)
        return await self._cancel_requests.cancel(context, request.task_id, auth.current_tenant())

    async def DownloadOutput(
        self, request: notifier_pb2.DownloadOutputRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[notifier_pb2.DownloadOutputResponse]:
        async for response in self._downloads.download(request, context):
            yield response

    async def _admit(
        self, context: grpc.aio.ServicerContext[Any, Any], connection: Hashable | None, count: int
    ) -> None:
        """Count ``count`` more subscriptions of ``connection`` (None: of no connection) and its tenant, or end
        the call RESOURCE_EXHAUSTED (counting nothing) if either would pass its limit or the stream buffers have
        less than one stream's room left."""
        tenant = auth.current_tenant()
        try:
            self._subscriptions.open(connection, tenant, count)
        except TooManySubscriptions as e:
            await abort_quota(context, e.scope, str(e), f"at most {e.limit} watched tasks", limit=str(e.limit))
        if self.memory.free_bytes < self._limits.buffer.max_bytes:
            self._subscriptions.close(connection, tenant, count)
            await abort_quota(
                context,
                "notifier",
                f"the notifier's stream buffers are full ({self.memory.used_bytes} of {self.memory.max_bytes} "
                "bytes): slow clients hold them; retry shortly",
                f"at most {self.memory.max_bytes} bytes buffered for all streams",
                retry_s=BUFFERS_FULL_RETRY_S,
            )


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
