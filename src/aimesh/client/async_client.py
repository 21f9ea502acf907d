"""The asyncio client of the mesh: submit tasks (text or tensors) to ingest, watch, get and cancel them at the
notifier; large tensor contents go by reference (UploadInput, DownloadOutput)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, TypeVar

import grpc
import numpy.typing as npt
from google.protobuf.timestamp_pb2 import Timestamp

from aimesh.client import payloads
from aimesh.client.errors import ClientError, DigestMismatch, deadline_exceeded
from aimesh.client.payloads import DEFAULT_UPLOAD_THRESHOLD_BYTES, OCTET_STREAM, Tensors
from aimesh.client.retry import RetryPolicy
from aimesh.client.targets import ROUND_ROBIN, grpc_target
from aimesh.client.tls import ClientTls
from aimesh.client.watch import WatchCursor
from aimesh.v1 import ingest_pb2, ingest_pb2_grpc, notifier_pb2, notifier_pb2_grpc, result_pb2, task_pb2, tensor_pb2

DEFAULT_INGEST_ADDRESS = "127.0.0.1:50051"
DEFAULT_NOTIFIER_ADDRESS = "127.0.0.1:50052"

PriorityName = Literal["interactive", "batch"]
PRIORITIES: dict[str, task_pb2.Priority.ValueType] = {
    "interactive": task_pb2.PRIORITY_INTERACTIVE,
    "batch": task_pb2.PRIORITY_BATCH,
}

R = TypeVar("R")


@dataclass(frozen=True)
class TaskSpec:
    """One task to submit: ``text``, or ``tensors`` (arrays by input name, or InputTensor messages; their
    outputs come back raw, see ``AsyncClient.outputs``). ``deadline``: a moment, or a time from now (fixed when
    the request is built, so a retry carries the same deadline). ``idempotency_key``: None makes one, so retries
    never submit twice."""

    model: str
    text: str = ""
    parameters: Mapping[str, str] = field(default_factory=dict)
    deadline: datetime | timedelta | None = None
    priority: PriorityName | task_pb2.Priority.ValueType | None = None
    idempotency_key: str | None = None
    model_version: str = ""
    tensors: Tensors | None = None

    def request(self) -> ingest_pb2.SubmitTaskRequest:
        """The request, every tensor's contents inline (the client moves large ones to the object store)."""
        request = ingest_pb2.SubmitTaskRequest(
            model_name=self.model,
            model_version=self.model_version,
            input=self.task_input(),
            parameters=dict(self.parameters),
            idempotency_key=self.idempotency_key or str(uuid.uuid4()),
            priority=_priority(self.priority),
        )
        if self.deadline is not None:
            moment = self.deadline if isinstance(self.deadline, datetime) else datetime.now(UTC) + self.deadline
            deadline = Timestamp()
            deadline.FromDatetime(moment if moment.tzinfo else moment.replace(tzinfo=UTC))
            request.deadline.CopyFrom(deadline)
        return request

    def task_input(self) -> task_pb2.TaskInput:
        if self.tensors is None:
            return task_pb2.TaskInput(text=self.text)
        if self.text:
            raise ValueError("a task carries text or tensors, not both")
        return task_pb2.TaskInput(tensors=task_pb2.Tensors(tensors=payloads.input_tensors(self.tensors)))


class AsyncClient:
    """An asyncio client of ingest (``ingest_address``) and the notifier (``notifier_address``); either may name
    several replicas (a list, or comma separated IP addresses), and calls are spread over them (``targets``).

    ``api_key`` is sent as ``authorization: Bearer <key>``; ``tls`` makes both channels TLS (mutual TLS with a
    client certificate). ``timeout_s`` is the default deadline of each unary call, retries included (each
    method takes its own ``timeout_s`` too); ``retry`` says how UNAVAILABLE and RESOURCE_EXHAUSTED with
    RetryInfo are retried. Channels open on first use, in the running event loop; ``close`` (or ``async
    with``) closes them and is safe to call twice. Every failed call raises ``ClientError``.

    A task's input tensor whose raw contents are over ``upload_threshold_bytes`` is uploaded first (UploadInput,
    in chunks, its SHA-256 in the header) and the task carries the object's reference instead.
    """

    def __init__(
        self,
        ingest_address: str | Sequence[str] = DEFAULT_INGEST_ADDRESS,
        notifier_address: str | Sequence[str] = DEFAULT_NOTIFIER_ADDRESS,
        *,
        api_key: str | None = None,
        tls: ClientTls | None = None,
        timeout_s: float = 30.0,
        retry: RetryPolicy | None = None,
        upload_threshold_bytes: int = DEFAULT_UPLOAD_THRESHOLD_BYTES,
    ) -> None:
        # The gRPC targets, built now so that a malformed list fails here rather than at the first call.
        self.ingest_address = grpc_target(ingest_address)
        self.notifier_address = grpc_target(notifier_address)
        self._tls = tls
        self._timeout_s = timeout_s
        self._retry = retry if retry is not None else RetryPolicy()
        self._upload_threshold_bytes = upload_threshold_bytes
        self._metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self._channels: list[grpc.aio.Channel] = []
        self._ingest: ingest_pb2_grpc.IngestServiceAsyncStub | None = None
        self._notifier: notifier_pb2_grpc.NotifierServiceAsyncStub | None = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        channels, self._channels = self._channels, []
        self._ingest = self._notifier = None
        for channel in channels:
            await channel.close()

    # --- ingest -----------------------------------------------------------------------------------------
    async def submit(
        self,
        model: str,
        text: str = "",
        *,
        tensors: Tensors | None = None,
        parameters: Mapping[str, str] | None = None,
        deadline: datetime | timedelta | None = None,
        priority: PriorityName | task_pb2.Priority.ValueType | None = None,
        idempotency_key: str | None = None,
        model_version: str = "",
        timeout_s: float | None = None,
    ) -> str:
        """Submit one task (``text``, or ``tensors``: arrays by input name); return its id once it is durable.
        Retried with one idempotency key (the caller's, or one made here), so a retry never submits twice."""
        spec = TaskSpec(model, text, parameters or {}, deadline, priority, idempotency_key, model_version, tensors)
        return (await self.submit_task(spec, timeout_s=timeout_s)).task_id

    async def submit_task(self, spec: TaskSpec, *, timeout_s: float | None = None) -> ingest_pb2.SubmitTaskResponse:
        """Submit one task; the full answer (id, acceptance time, whether the key was a duplicate). Large tensor
        contents are uploaded first, each upload within ``timeout_s`` of its own."""
        request = await self._claim_check(spec.request(), timeout_s)
        return await self._unary(self._ingest_stub().SubmitTask, request, timeout_s)

    async def submit_many(
        self, specs: Sequence[TaskSpec], *, timeout_s: float | None = None
    ) -> list[ingest_pb2.SubmitTaskResponse]:
        """Submit a batch in one call, all or nothing; the answers in order. Every task carries an idempotency
        key, so a retry after UNAVAILABLE (when some may have been accepted) publishes none twice."""
        request = ingest_pb2.SubmitTasksRequest(tasks=[await self._claim_check(s.request(), timeout_s) for s in specs])
        return list((await self._unary(self._ingest_stub().SubmitTasks, request, timeout_s)).tasks)

    async def upload(
        self, data: bytes, *, content_type: str = OCTET_STREAM, timeout_s: float | None = None
    ) -> tensor_pb2.ObjectRef:
        """Store ``data`` in the mesh's object store (UploadInput: a header with its size and SHA-256, then
        chunks of 1 MiB); the reference to set as an InputTensor's ``object``. A reference whose digest or size
        is not that of ``data`` raises DigestMismatch."""
        digest = payloads.sha256_hex(data)

        def call(remaining: float) -> Awaitable[ingest_pb2.UploadInputResponse]:
            messages = payloads.upload_messages(data, content_type, digest)  # afresh for each attempt
            return self._ingest_stub().UploadInput(messages, timeout=remaining, metadata=self._metadata)

        stored = (await self._retried(call, timeout_s)).object
        if stored.sha256 != digest or stored.size != len(data):
            raise DigestMismatch(
                f"ingest stored {stored.size} bytes with SHA-256 {stored.sha256 or '(none)'}; "
                f"{len(data)} bytes with SHA-256 {digest} were sent"
            )
        return stored

    async def _claim_check(
        self, request: ingest_pb2.SubmitTaskRequest, timeout_s: float | None
    ) -> ingest_pb2.SubmitTaskRequest:
        """``request`` with each tensor's contents over the threshold uploaded and replaced by their reference."""
        if request.input.WhichOneof("kind") != "tensors":
            return request
        for tensor in request.input.tensors.tensors:
            if (
                tensor.WhichOneof("contents") == "raw_contents"
                and len(tensor.raw_contents) > self._upload_threshold_bytes
            ):
                tensor.object.CopyFrom(await self.upload(tensor.raw_contents, timeout_s=timeout_s))
        return request

    # --- notifier ---------------------------------------------------------------------------------------
    async def get(self, task_id: str, *, timeout_s: float | None = None) -> notifier_pb2.TaskState:
        """The task's current state (NOT_FOUND for a task the notifier does not know yet)."""
        request = notifier_pb2.GetTaskRequest(task_id=task_id)
        return (await self._unary(self._notifier_stub().GetTask, request, timeout_s)).state

    async def cancel(self, task_id: str, *, timeout_s: float | None = None) -> notifier_pb2.CancelTaskResponse:
        """Ask for the task to be cancelled: the outcome (requested, or ended already) and the task's state."""
        request = notifier_pb2.CancelTaskRequest(task_id=task_id)
        return await self._unary(self._notifier_stub().CancelTask, request, timeout_s)

    async def watch(
        self, task_id: str, *, after_sequence: int = 0, timeout_s: float | None = None
    ) -> AsyncIterator[notifier_pb2.TaskState]:
        """The task's updates after ``after_sequence`` (0: its current state first), ending with the terminal
        one. A dropped stream is reopened from the last sequence seen. ``timeout_s`` bounds the whole watch
        (None: no bound; the server's idle timeouts are watched through)."""

        def open_stream(after: Mapping[str, int], timeout: float | None) -> grpc.aio.UnaryStreamCall[Any, Any]:
            request = notifier_pb2.WatchTaskRequest(task_id=task_id, after_sequence=after[task_id])
            return self._notifier_stub().WatchTask(request, timeout=timeout, metadata=self._metadata)

        async for state in self._follow(WatchCursor(open_stream, {task_id: after_sequence}, _deadline(timeout_s))):
            yield state

    async def watch_many(
        self, after: Mapping[str, int] | Sequence[str], *, timeout_s: float | None = None
    ) -> AsyncIterator[notifier_pb2.TaskState]:
        """The updates of many tasks on one stream (WatchTasks), each task resuming after its own sequence
        (``after``: task id -> sequence, or just the ids), until every task has had its terminal update."""
        resume = dict(after) if isinstance(after, Mapping) else dict.fromkeys(after, 0)

        def open_stream(pending: Mapping[str, int], timeout: float | None) -> grpc.aio.UnaryStreamCall[Any, Any]:
            request = notifier_pb2.WatchTasksRequest(
                tasks=[notifier_pb2.WatchTaskRequest(task_id=t, after_sequence=s) for t, s in pending.items()]
            )
            return self._notifier_stub().WatchTasks(request, timeout=timeout, metadata=self._metadata)

        async for state in self._follow(WatchCursor(open_stream, resume, _deadline(timeout_s))):
            yield state

    async def result(self, task_id: str, *, timeout_s: float | None = None) -> notifier_pb2.TaskState:
        """Wait for the task's terminal state (any of SUCCEEDED, FAILED, EXPIRED, CANCELLED: check ``status``).
        DEADLINE_EXCEEDED if it has not ended within ``timeout_s``."""
        last: notifier_pb2.TaskState | None = None
        async for state in self.watch(task_id, timeout_s=timeout_s):
            last = state
        if last is None:  # pragma: no cover - a watch ends only after the terminal update, or raises
            raise ClientError(grpc.StatusCode.INTERNAL, f"the watch of {task_id} ended without an update")
        return last

    async def download(self, task_id: str, output_name: str, *, timeout_s: float | None = None) -> bytes:
        """The contents of a task's output held by reference (DownloadOutput), checked against the size and
        SHA-256 its first message names: DigestMismatch (DATA_LOSS) if they differ, or if the notifier found
        the stored object damaged. A dropped stream is downloaded again from the start."""
        request = notifier_pb2.DownloadOutputRequest(task_id=task_id, output_name=output_name)

        async def call(remaining: float) -> tuple[tensor_pb2.ObjectRef | None, bytes]:
            stream = self._notifier_stub().DownloadOutput(request, timeout=remaining, metadata=self._metadata)
            named: tensor_pb2.ObjectRef | None = None
            chunks: list[bytes] = []
            async for message in stream:
                if named is None and message.HasField("object"):
                    named = message.object
                chunks.append(message.chunk)
            return named, b"".join(chunks)

        try:
            named, data = await self._retried(call, timeout_s)
        except ClientError as e:
            if e.code == grpc.StatusCode.DATA_LOSS:
                raise DigestMismatch(e.message, e.details) from e
            raise
        if named is None:
            raise ClientError(grpc.StatusCode.INTERNAL, f"the download of {output_name} did not name its object")
        _check_contents(named, data, f"output {output_name} of task {task_id}")
        return data

    async def outputs(
        self, result: notifier_pb2.TaskState | result_pb2.AIResultEvent, *, timeout_s: float | None = None
    ) -> dict[str, npt.NDArray[Any]]:
        """A result's outputs as numpy arrays by name, of their datatype and shape: raw ones decoded, ones held
        by reference downloaded (and checked against the result's reference), typed ones (a text task's)
        converted, BYTES as str."""
        event = result.result if isinstance(result, notifier_pb2.TaskState) else result
        arrays: dict[str, npt.NDArray[Any]] = {}
        for tensor in event.output.tensors:
            contents = None
            if payloads.is_by_reference(tensor):
                contents = await self.download(event.task_id, tensor.name, timeout_s=timeout_s)
                _check_contents(tensor.object, contents, f"output {tensor.name} of task {event.task_id}")
            arrays[tensor.name] = payloads.output_array(tensor, contents)
        return arrays

    # --- plumbing ---------------------------------------------------------------------------------------
    async def _follow(self, cursor: WatchCursor) -> AsyncIterator[notifier_pb2.TaskState]:
        try:
            while True:
                state = await self._next_update(cursor)
                if state is None:
                    return
                yield state
        finally:
            cursor.close()

    async def _next_update(self, cursor: WatchCursor) -> notifier_pb2.TaskState | None:
        # A fresh retry budget for each update: a stream that delivered something counts as having recovered.
        async for attempt in self._retry.retrying(deadline=cursor.deadline):
            with attempt:
                return await cursor.next()
        raise AssertionError("unreachable: tenacity reraises the last error")

    async def _unary(self, method: Callable[..., Awaitable[R]], request: Any, timeout_s: float | None) -> R:
        return await self._retried(
            lambda remaining: method(request, timeout=remaining, metadata=self._metadata), timeout_s
        )

    async def _retried(self, call: Callable[[float], Awaitable[R]], timeout_s: float | None) -> R:
        """``call(remaining seconds)`` retried by the policy, all attempts within ``timeout_s``."""
        deadline = time.monotonic() + (timeout_s if timeout_s is not None else self._timeout_s)
        async for attempt in self._retry.retrying(deadline=deadline):
            with attempt:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise deadline_exceeded("the call's timeout passed before it could be answered")
                try:
                    return await call(remaining)
                except grpc.aio.AioRpcError as e:
                    raise ClientError.from_rpc_error(e) from e
        raise AssertionError("unreachable: tenacity reraises the last error")

    def _ingest_stub(self) -> ingest_pb2_grpc.IngestServiceAsyncStub:
        if self._ingest is None:
            self._ingest = ingest_pb2_grpc.IngestServiceStub(self._channel(self.ingest_address))
        return self._ingest

    def _notifier_stub(self) -> notifier_pb2_grpc.NotifierServiceAsyncStub:
        if self._notifier is None:
            self._notifier = notifier_pb2_grpc.NotifierServiceStub(self._channel(self.notifier_address))
        return self._notifier

    def _channel(self, address: str) -> grpc.aio.Channel:
        if self._tls is None:
            channel = grpc.aio.insecure_channel(address, options=ROUND_ROBIN)
        else:
            options = [*ROUND_ROBIN, *self._tls.channel_options()]
            channel = grpc.aio.secure_channel(address, self._tls.credentials(), options=options)
        self._channels.append(channel)
        return channel


def _priority(priority: PriorityName | task_pb2.Priority.ValueType | None) -> task_pb2.Priority.ValueType:
    if priority is None:
        return task_pb2.PRIORITY_UNSPECIFIED
    if isinstance(priority, str):
        try:
            return PRIORITIES[priority]
        except KeyError:
            raise ValueError(f"priority must be one of {', '.join(PRIORITIES)}, not {priority!r}") from None
    return priority


def _check_contents(named: tensor_pb2.ObjectRef, data: bytes, what: str) -> None:
    digest = payloads.sha256_hex(data)
    if len(data) != named.size or (named.sha256 and digest != named.sha256.lower()):
        raise DigestMismatch(
            f"{what}: got {len(data)} bytes with SHA-256 {digest}; "
            f"its object {named.key or '?'} names {named.size} bytes with SHA-256 {named.sha256 or '(none)'}"
        )


def _deadline(timeout_s: float | None) -> float | None:
    return time.monotonic() + timeout_s if timeout_s is not None else None
