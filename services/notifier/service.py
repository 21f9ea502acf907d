"""The NotifierService servicer: task state and result streams by task id."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, NoReturn, Protocol, TypeVar

import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
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

from .buffers import BufferLimits, StreamBuffer, SubscriptionMemory
from .forwarding import Answer, Forwarder, Metadata, Relays, forwarded_metadata, is_forwarded, rebalancing
from .ownership import Everything, Ownership
from .store import Denied, Ended, Moved, TaskStore, Update

log = logging.getLogger(__name__)

R = TypeVar("R")

# How long CancelTask waits for a task the notifier has not read yet (a cancel right after the submit).
CANCEL_WAIT_S = 2.0


@dataclass(frozen=True)
class StreamLimits:
    """What clients may hold open: subscriptions (a WatchTask stream, or one task of a WatchTasks stream) per
    tenant and per connection of a tenant; how long a stream may go without an update (``idle_timeout_s``)
    and its client without taking one (``send_timeout_s``); what one stream may hold unsent (``buffer``) and
    all streams together (``max_total_buffer_bytes``)."""

    max_per_connection: int = 100
    max_per_tenant: int = 1000
    idle_timeout_s: float = 600.0
    send_timeout_s: float = 30.0
    buffer: BufferLimits = field(default_factory=BufferLimits)
    max_total_buffer_bytes: int = 512 << 20


class TooManySubscriptions(Exception):
    def __init__(self, scope: str, limit: int) -> None:
        super().__init__(
            f"too many watched tasks (open WatchTask streams and tasks of WatchTasks streams) for this {scope} "
            f"(the limit is {limit}); close one first"
        )
        self.scope = scope
        self.limit = limit


# How long the status of a stream cut for not reading may take to be handed to gRPC core.
UNREAD_ABORT_WAIT_S = 1.0

# How soon a client refused for want of stream buffer memory may try again: stuck streams end within the
# send timeout, and ordinary ones free their buffers as they send.
BUFFERS_FULL_RETRY_S = 1.0


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
    ) -> None:
        self._store = store
        self._ownership: Ownership = ownership if ownership is not None else Everything()
        # With every task local (the default) it never opens a channel.
        self._forwarder = forwarder if forwarder is not None else Forwarder()
        self._ready = ready
        self._metrics = metrics if metrics is not None else NotifierMetrics()
        self._limits = limits if limits is not None else StreamLimits()
        self._cancels = cancels
        self._cancel_wait_s = cancel_wait_s
        self._streams_by_connection: Counter[Hashable] = Counter()
        self._streams_by_tenant: Counter[str] = Counter()
        self.memory = SubscriptionMemory(self._limits.max_total_buffer_bytes)

    async def GetTask(
        self, request: notifier_pb2.GetTaskRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> notifier_pb2.GetTaskResponse:
        await _check_task_id(context, request.task_id)
        if not self._ownership.is_local(request.task_id):
            return await self._forward(
                context,
                request.task_id,
                lambda stub, metadata, timeout: stub.GetTask(request, metadata=metadata, timeout=timeout),
            )
        await self._check_serving(context, request.task_id)
        state = self._store.get(request.task_id, auth.current_tenant())
        if state is None:
            await _abort_not_found(context, request.task_id)
        return notifier_pb2.GetTaskResponse(state=state)

    async def WatchTask(
        self, request: notifier_pb2.WatchTaskRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[notifier_pb2.WatchTaskResponse]:
        async def watch() -> None:
            await _check_task_id(context, request.task_id)
            await self._watch(context, [request], lambda s: notifier_pb2.WatchTaskResponse(state=s))

        async for response in _written(watch()):
            yield response

    async def WatchTasks(
        self, request: notifier_pb2.WatchTasksRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[notifier_pb2.WatchTasksResponse]:
        async def watch() -> None:
            await self._check_watch_tasks(context, request)
            await self._watch(context, list(request.tasks), lambda s: notifier_pb2.WatchTasksResponse(state=s))

        async for response in _written(watch()):
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
            await _abort_starting(context)

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
            if not _is_task_id(task.task_id):
                violations.append((f"tasks[{i}].task_id", _NOT_A_TASK_ID))
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
        watch = _Watch(tenant, connection, StreamBuffer(self._limits.buffer, self.memory), asyncio.current_task())
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
        watch: _Watch,
        response: Callable[[notifier_pb2.TaskState], Message],
    ) -> None:
        """Send the stream's updates until each task has ended, or until it is interrupted (``_Watch.interrupt``)
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

    def _follow(self, watch: _Watch, tasks: dict[str, int]) -> None:
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

    def _subscribe(self, watch: _Watch, task_id: str, after_sequence: int) -> None:
        deliver = functools.partial(watch.buffer.offer, task_id)
        self._store.subscribe(task_id, watch, deliver, watch.tenant, after_sequence)

    def _relays(self, watch: _Watch, metadata: Metadata) -> Relays:
        return Relays(
            self._forwarder,
            self._ownership,
            metadata,
            offer=watch.buffer.offer,
            adopt=functools.partial(self._subscribe, watch),
            fail=watch.interrupt,
        )

    async def _next(self, context: grpc.aio.ServicerContext[Any, Any], watch: _Watch) -> tuple[str, Update] | None:
        """The next update to send, or None once a task was finished with; ends the stream when nothing came
        within the idle timeout, or when the buffer overflowed and all it took was sent."""
        while True:
            try:
                got = await asyncio.wait_for(watch.buffer.next(), self._limits.idle_timeout_s)
            except TimeoutError:
                await abort_with(
                    context,
                    code_pb2.DEADLINE_EXCEEDED,
                    f"no update for {self._limits.idle_timeout_s:g}s: the stream is closed; watch again to "
                    "resume (pass the last sequence seen as after_sequence)",
                    [error_info("STREAM_IDLE", idle_timeout_s=f"{self._limits.idle_timeout_s:g}")],
                )
            if got is None:
                await self._abort_behind(context, watch)
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

    async def _moved(self, context: grpc.aio.ServicerContext[Any, Any], watch: _Watch, task_id: str) -> None:
        """Follow a task whose partition moved to another replica there, from the last update sent (each one
        before the move was); a forwarded stream ends UNAVAILABLE instead, so that the replica that forwarded
        it does that."""
        if watch.relays is None:
            await rebalancing().abort(context)
        watch.relays.follow({task_id: watch.sent[task_id]})

    async def _send(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        watch: _Watch,
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
                await self._abort_unread(context)
        watch.sent[task_id] = state.sequence
        if events.is_terminal(state.status):
            self._finish(watch, task_id)

    async def _abort_unread(self, context: grpc.aio.ServicerContext[Any, Any]) -> NoReturn:
        timeout = f"{self._limits.send_timeout_s:g}"
        log.info("closing a stream whose client took no update for %ss", timeout)
        abort = abort_with(
            context,
            code_pb2.DEADLINE_EXCEEDED,
            f"the client took no update for {timeout}s: the stream is closed; watch again to resume "
            "(pass the last sequence seen as after_sequence)",
            [error_info("STREAM_SEND_TIMEOUT", send_timeout_s=timeout)],
        )
        try:
            await asyncio.wait_for(abort, UNREAD_ABORT_WAIT_S)
        except TimeoutError:
            # The status waits behind the update the client does not take (gRPC core sends it if the client
            # ever reads, or drops it with the connection). End the call as a cancelled one, so that all
            # it holds here is freed now.
            raise asyncio.CancelledError from None

    def _finish(self, watch: _Watch, task_id: str) -> None:
        """Stop watching one task: unsubscribe it and free its place."""
        watch.ended.add(task_id)
        self._store.unsubscribe(task_id, watch)
        self._metrics.active_subscriptions.dec()
        self._close_streams(watch.connection, watch.tenant, 1)

    async def _abort_behind(self, context: grpc.aio.ServicerContext[Any, Any], watch: _Watch) -> NoReturn:
        limits = self._limits.buffer
        resume = ", ".join(f"{t}: {s}" for t, s in watch.sent.items() if t not in watch.ended)
        log.info("closing a stream that fell behind (%s)", resume)
        await abort_with(
            context,
            code_pb2.RESOURCE_EXHAUSTED,
            f"the stream fell behind: its client did not keep up (more than {limits.max_bytes} bytes or "
            f"{limits.max_items} updates waiting, or the notifier's stream buffers full); watch again with "
            f"after_sequence set to the last sequence received ({resume}) for the rest, without a gap",
            [
                error_info("STREAM_BEHIND", max_bytes=str(limits.max_bytes), max_updates=str(limits.max_items)),
                error_details_pb2.QuotaFailure(
                    violations=[
                        error_details_pb2.QuotaFailure.Violation(
                            subject="stream", description=f"at most {limits.max_bytes} bytes buffered"
                        )
                    ]
                ),
            ],
        )

    async def CancelTask(
        self, request: notifier_pb2.CancelTaskRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> notifier_pb2.CancelTaskResponse:
        await _check_task_id(context, request.task_id)
        if not self._ownership.is_local(request.task_id):
            return await self._forward(
                context,
                request.task_id,
                lambda stub, metadata, timeout: stub.CancelTask(request, metadata=metadata, timeout=timeout),
            )
        await self._check_serving(context, request.task_id)
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

    async def _admit(
        self, context: grpc.aio.ServicerContext[Any, Any], connection: Hashable | None, count: int
    ) -> None:
        """Count ``count`` more subscriptions of ``connection`` (None: of no connection) and its tenant, or end
        the call RESOURCE_EXHAUSTED (counting nothing) if either would pass its limit or the stream buffers have
        less than one stream's room left."""
        tenant = auth.current_tenant()
        try:
            self._open_streams(connection, tenant, count)
        except TooManySubscriptions as e:
            await _abort_quota(context, e.scope, str(e), f"at most {e.limit} watched tasks", limit=str(e.limit))
        if self.memory.free_bytes < self._limits.buffer.max_bytes:
            self._close_streams(connection, tenant, count)
            await _abort_quota(
                context,
                "notifier",
                f"the notifier's stream buffers are full ({self.memory.used_bytes} of {self.memory.max_bytes} "
                "bytes): slow clients hold them; retry shortly",
                f"at most {self.memory.max_bytes} bytes buffered for all streams",
                retry_s=BUFFERS_FULL_RETRY_S,
            )

    def _open_streams(self, connection: Hashable | None, tenant: str, count: int) -> None:
        """Count ``count`` more subscriptions of ``connection`` (None: of no connection) and ``tenant``, or
        raise TooManySubscriptions (counting nothing) if either would pass its limit."""
        if connection is not None and self._streams_by_connection[connection] + count > self._limits.max_per_connection:
            raise TooManySubscriptions("connection", self._limits.max_per_connection)
        if self._streams_by_tenant[tenant] + count > self._limits.max_per_tenant:
            raise TooManySubscriptions("tenant", self._limits.max_per_tenant)
        if connection is not None:
            self._streams_by_connection[connection] += count
        self._streams_by_tenant[tenant] += count

    def _close_streams(self, connection: Hashable | None, tenant: str, count: int) -> None:
        counters: list[tuple[Counter[Any], Hashable]] = [(self._streams_by_tenant, tenant)]
        if connection is not None:
            counters.append((self._streams_by_connection, connection))
        for counter, key in counters:
            counter[key] -= count
            if counter[key] <= 0:
                del counter[key]


@dataclass(eq=False)
class _Watch:
    """One open stream: whose it is (``connection`` None: a forwarded one, counted per tenant only), its
    buffer, the task serving it (``handler``), the last sequence sent of each task, the tasks finished with,
    the tasks followed at other replicas (``relays``; None for a forwarded stream, which follows only tasks
    owned here), and the answer it was interrupted with. It is its own key in the store's subscriptions."""

    tenant: str
    connection: Hashable | None
    buffer: StreamBuffer
    handler: asyncio.Task[Any] | None
    sent: dict[str, int] = field(default_factory=dict)
    ended: set[str] = field(default_factory=set)
    relays: Relays | None = None
    failure: Answer | None = None

    def interrupt(self, answer: Answer) -> None:
        """End the stream with ``answer`` (once: a later answer is not taken), whatever it is waiting for."""
        if self.failure is None and self.handler is not None:
            self.failure = answer
            self.handler.cancel()

    @property
    def pending(self) -> list[str]:
        """The tasks not finished with."""
        return [task_id for task_id in self.sent if task_id not in self.ended]


async def _written(watch: Awaitable[None]) -> AsyncIterator[Any]:
    """A server-streaming method whose responses ``watch`` writes with ``context.write`` (so that each write
    can have a timeout), in the shape of an async generator that yields nothing: what OpenTelemetry's
    server interceptor iterates. grpc.aio allows both on one call."""
    await watch
    return
    yield  # pragma: no cover - makes this an async generator


async def _abort_quota(
    context: grpc.aio.ServicerContext[Any, Any],
    scope: str,
    message: str,
    description: str,
    *,
    limit: str = "",
    retry_s: float | None = None,
) -> NoReturn:
    details: list[Message] = [
        error_info("TOO_MANY_SUBSCRIPTIONS", scope=scope, limit=limit),
        error_details_pb2.QuotaFailure(
            violations=[error_details_pb2.QuotaFailure.Violation(subject=scope, description=description)]
        ),
    ]
    if retry_s is not None:
        delay = Duration()
        delay.FromNanoseconds(int(retry_s * 1e9))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    await abort_with(context, code_pb2.RESOURCE_EXHAUSTED, message, details)


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


_NOT_A_TASK_ID = (
    "must be a task id as SubmitTask returned it: a UUID in canonical form (lower-case hex in 8-4-4-4-12 groups, "
    "no braces, no urn:uuid: prefix)"
)


def _is_task_id(task_id: str) -> bool:
    """Whether ``task_id`` is a UUID in the one form ingest makes. Other spellings of a UUID are refused, not
    translated: an answer then always names the task as the request did, and no two spellings of one task
    are two subscriptions."""
    try:
        return str(uuid.UUID(task_id)) == task_id
    except ValueError:
        return False


async def _check_task_id(context: grpc.aio.ServicerContext[Any, Any], task_id: str) -> None:
    if not _is_task_id(task_id):
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
