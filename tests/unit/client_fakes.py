"""In-process fakes of ingest and the notifier for the client's tests: the generated servicers on a real grpc.aio
server (the project's GrpcServer, so auth and TLS are the real ones), answering from a script of failures and
updates. ``ThreadedFakes`` runs them on a loop of their own, for the blocking client and the CLI."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import grpc
from click.testing import CliRunner, Result
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2

from aimesh import events
from aimesh.auth import Authenticator
from aimesh.client import RetryPolicy
from aimesh.client.cli import main as cli_main
from aimesh.grpc_edge import GrpcServer, ServerTls, abort_with, error_info
from aimesh.v1 import ingest_pb2, ingest_pb2_grpc, notifier_pb2, notifier_pb2_grpc, result_pb2, tensor_pb2

Context = grpc.aio.ServicerContext[Any, Any]

TASK = "5b0f7c1e-2f43-4a55-9d53-2c1f3f0d8a11"
OTHER = "0d1e6a3c-8f5e-4b8e-b1a4-7a9f6e2c4d10"
# Retries quick enough for a unit test.
FAST = RetryPolicy(max_attempts=4, initial_s=0.01, max_s=0.05, jitter_s=0.01)


@dataclass
class Failure:
    """An error the fake answers with instead of serving the call."""

    code: int
    message: str
    details: list[Message] = field(default_factory=list)


def seconds(value: float) -> Duration:
    duration = Duration()
    duration.FromTimedelta(timedelta(seconds=value))
    return duration


def backlog_too_long(retry_after_s: float) -> Failure:
    return Failure(
        code_pb2.RESOURCE_EXHAUSTED,
        "the interactive backlog would take 12 s",
        [
            error_info("BACKLOG_TOO_LONG", priority="interactive"),
            error_details_pb2.RetryInfo(retry_delay=seconds(retry_after_s)),
        ],
    )


UNAVAILABLE = Failure(code_pb2.UNAVAILABLE, "the broker did not acknowledge the task in time")


def state(
    task_id: str, sequence: int, status: int, *, tokens: str | None = None, text: str = ""
) -> notifier_pb2.TaskState:
    """A TaskState: ``tokens`` makes it a partial output of a streaming model; ``text`` the terminal TEXT."""
    result = result_pb2.AIResultEvent(task_id=task_id, status=status, sequence=sequence)
    if tokens is not None:
        result.partial = True
        result.output.tensors.add(name="TEXT", datatype="BYTES", shape=[1], string_data=[tokens])
    elif text:
        result.output.tensors.add(name="TEXT", datatype="BYTES", shape=[1], string_data=[text])
    return notifier_pb2.TaskState(
        task_id=task_id, status=status, sequence=sequence, model_name="generate", result=result
    )


def story(task_id: str, tokens: Iterable[str] = ("Once", " upon", " a", " time")) -> list[notifier_pb2.TaskState]:
    """QUEUED, RUNNING, one partial output per token, SUCCEEDED with the whole text."""
    words = list(tokens)
    updates = [state(task_id, 1, result_pb2.TASK_STATUS_QUEUED), state(task_id, 2, result_pb2.TASK_STATUS_RUNNING)]
    updates += [state(task_id, 3 + i, result_pb2.TASK_STATUS_RUNNING, tokens=w) for i, w in enumerate(words)]
    updates.append(state(task_id, 3 + len(words), result_pb2.TASK_STATUS_SUCCEEDED, text="".join(words)))
    return updates


class FakeIngest(ingest_pb2_grpc.IngestServiceServicer):
    def __init__(self) -> None:
        self.failures: list[Failure] = []  # answered in turn, before any call succeeds
        self.requests: list[ingest_pb2.SubmitTaskRequest | ingest_pb2.SubmitTasksRequest] = []
        self.metadata: list[dict[str, str | bytes]] = []
        self.task_ids: list[str] = []  # the ids to give new tasks, in turn (then random ones)
        self._ids: dict[str, str] = {}
        self.uploads: list[list[ingest_pb2.UploadInputRequest]] = []  # each upload's messages, as received
        self.objects: dict[str, bytes] = {}  # what the uploads stored, by key
        self.upload_failures: list[Failure] = []  # answered in turn, after the upload's messages were read

    async def _fail_if_scripted(self, context: Context) -> None:
        self.metadata.append(dict(context.invocation_metadata() or ()))
        if self.failures:
            failure = self.failures.pop(0)
            await abort_with(context, failure.code, failure.message, failure.details)

    def _accept(self, request: ingest_pb2.SubmitTaskRequest) -> ingest_pb2.SubmitTaskResponse:
        duplicate = request.idempotency_key in self._ids
        if not duplicate:
            self._ids[request.idempotency_key] = self.task_ids.pop(0) if self.task_ids else str(uuid.uuid4())
        task_id = self._ids[request.idempotency_key]
        return ingest_pb2.SubmitTaskResponse(task_id=task_id, duplicate=duplicate)

    async def SubmitTask(
        self, request: ingest_pb2.SubmitTaskRequest, context: Context
    ) -> ingest_pb2.SubmitTaskResponse:
        self.requests.append(request)
        await self._fail_if_scripted(context)
        return self._accept(request)

    async def SubmitTasks(
        self, request: ingest_pb2.SubmitTasksRequest, context: Context
    ) -> ingest_pb2.SubmitTasksResponse:
        self.requests.append(request)
        await self._fail_if_scripted(context)
        return ingest_pb2.SubmitTasksResponse(tasks=[self._accept(t) for t in request.tasks])

    async def UploadInput(
        self, request_iterator: AsyncIterator[ingest_pb2.UploadInputRequest], context: Context
    ) -> ingest_pb2.UploadInputResponse:
        messages = [message async for message in request_iterator]
        self.uploads.append(messages)
        if self.upload_failures:
            failure = self.upload_failures.pop(0)
            await abort_with(context, failure.code, failure.message, failure.details)
        if not messages or messages[0].WhichOneof("part") != "header":
            await abort_with(context, code_pb2.INVALID_ARGUMENT, "the first message must be the header")
        data = b"".join(m.chunk for m in messages[1:])
        key = f"uploads/{uuid.uuid4()}"
        self.objects[key] = data
        ref = tensor_pb2.ObjectRef(
            bucket="aimesh", key=key, size=len(data), sha256=hashlib.sha256(data).hexdigest(),
            content_type=messages[0].header.content_type or "application/octet-stream",
        )  # fmt: skip
        return ingest_pb2.UploadInputResponse(object=ref)


class FakeNotifier(notifier_pb2_grpc.NotifierServiceServicer):
    def __init__(self) -> None:
        self.updates: dict[str, list[notifier_pb2.TaskState]] = {}  # every update of each task, in order
        # For successive watch streams: end the stream with this failure after sending this many updates.
        self.drops: list[tuple[int, Failure]] = []
        self.ignore_after_sequence = False  # behave like a server that predates resuming
        self.hang = False  # send the current state, then nothing
        self.failures: list[Failure] = []  # for the unary calls
        self.watch_requests: list[notifier_pb2.WatchTaskRequest] = []
        self.cancelled: list[str] = []
        # DownloadOutput: the contents of each (task id, output name), and the reference its first message sends
        # (by default the contents' true size and digest: a test sets another to fake a damaged object).
        self.downloads: dict[tuple[str, str], bytes] = {}
        self.download_refs: dict[tuple[str, str], tensor_pb2.ObjectRef] = {}
        self.download_requests: list[notifier_pb2.DownloadOutputRequest] = []
        self.download_failures: list[Failure] = []

    def _pending(self, task_id: str, after: int) -> list[notifier_pb2.TaskState]:
        updates = self.updates.get(task_id, [])
        return updates if self.ignore_after_sequence else [u for u in updates if u.sequence > after]

    async def _stream(
        self, requests: list[notifier_pb2.WatchTaskRequest], context: Context
    ) -> AsyncIterator[notifier_pb2.TaskState]:
        self.watch_requests.extend(requests)
        drop = self.drops.pop(0) if self.drops else None
        sent = 0
        for request in requests:
            for update in self._pending(request.task_id, request.after_sequence):
                if drop is not None and sent == drop[0]:
                    await abort_with(context, drop[1].code, drop[1].message, drop[1].details)
                yield update
                sent += 1
                if self.hang:
                    await asyncio.Event().wait()
        if drop is not None and sent == drop[0]:
            await abort_with(context, drop[1].code, drop[1].message, drop[1].details)

    async def WatchTask(
        self, request: notifier_pb2.WatchTaskRequest, context: Context
    ) -> AsyncIterator[notifier_pb2.WatchTaskResponse]:
        async for update in self._stream([request], context):
            yield notifier_pb2.WatchTaskResponse(state=update)

    async def WatchTasks(
        self, request: notifier_pb2.WatchTasksRequest, context: Context
    ) -> AsyncIterator[notifier_pb2.WatchTasksResponse]:
        async for update in self._stream(list(request.tasks), context):
            yield notifier_pb2.WatchTasksResponse(state=update)

    async def _known(self, task_id: str, context: Context) -> notifier_pb2.TaskState:
        if self.failures:
            failure = self.failures.pop(0)
            await abort_with(context, failure.code, failure.message, failure.details)
        if task_id not in self.updates:
            await abort_with(context, code_pb2.NOT_FOUND, f"task {task_id} not found", [error_info("TASK_NOT_FOUND")])
        return self.updates[task_id][-1]

    async def GetTask(self, request: notifier_pb2.GetTaskRequest, context: Context) -> notifier_pb2.GetTaskResponse:
        return notifier_pb2.GetTaskResponse(state=await self._known(request.task_id, context))

    async def CancelTask(
        self, request: notifier_pb2.CancelTaskRequest, context: Context
    ) -> notifier_pb2.CancelTaskResponse:
        current = await self._known(request.task_id, context)
        if events.is_terminal(current.status):
            return notifier_pb2.CancelTaskResponse(outcome=notifier_pb2.CANCEL_OUTCOME_ALREADY_ENDED, state=current)
        self.cancelled.append(request.task_id)
        return notifier_pb2.CancelTaskResponse(outcome=notifier_pb2.CANCEL_OUTCOME_REQUESTED, state=current)

    async def DownloadOutput(
        self, request: notifier_pb2.DownloadOutputRequest, context: Context
    ) -> AsyncIterator[notifier_pb2.DownloadOutputResponse]:
        self.download_requests.append(request)
        if self.download_failures:
            failure = self.download_failures.pop(0)
            await abort_with(context, failure.code, failure.message, failure.details)
        key = (request.task_id, request.output_name)
        if key not in self.downloads:
            await abort_with(context, code_pb2.NOT_FOUND, f"no output {request.output_name} held by reference")
        data = self.downloads[key]
        ref = self.download_refs.get(key) or object_ref(data)
        yield notifier_pb2.DownloadOutputResponse(object=ref, chunk=data[: 1 << 20])
        for offset in range(1 << 20, len(data), 1 << 20):
            yield notifier_pb2.DownloadOutputResponse(chunk=data[offset : offset + (1 << 20)])


def object_ref(data: bytes, key: str = "results/output") -> tensor_pb2.ObjectRef:
    """The reference of an object holding ``data``."""
    return tensor_pb2.ObjectRef(
        bucket="aimesh", key=key, size=len(data), sha256=hashlib.sha256(data).hexdigest(),
        content_type="application/octet-stream",
    )  # fmt: skip


class Fakes:
    """Both fakes, each on a GrpcServer of its own on a free port."""

    def __init__(self, *, auth: Authenticator | None = None, tls: ServerTls | None = None) -> None:
        self.ingest = FakeIngest()
        self.notifier = FakeNotifier()
        self._auth = auth
        self._tls = tls
        self._servers: list[GrpcServer] = []

    async def start(self) -> None:
        for name, register, servicer in (
            ("aimesh.v1.IngestService", ingest_pb2_grpc.add_IngestServiceServicer_to_server, self.ingest),
            ("aimesh.v1.NotifierService", notifier_pb2_grpc.add_NotifierServiceServicer_to_server, self.notifier),
        ):
            server = GrpcServer("127.0.0.1:0", [name], auth=self._auth, tls=self._tls)
            server.add(register, servicer)
            await server.start()
            self._servers.append(server)

    async def stop(self) -> None:
        for server in self._servers:
            await server.stop(0)

    @property
    def ingest_address(self) -> str:
        return f"127.0.0.1:{self._servers[0].port}"

    @property
    def notifier_address(self) -> str:
        return f"127.0.0.1:{self._servers[1].port}"


class ThreadedFakes(Fakes):
    """The fakes served by an event loop in a thread of their own, so blocking code can call them."""

    def __init__(self) -> None:
        super().__init__()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> ThreadedFakes:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.start(), self._loop).result(10)
        return self

    def __exit__(self, *exc_info: object) -> None:
        asyncio.run_coroutine_threadsafe(self.stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


def aimesh(fakes: ThreadedFakes, *args: str) -> Result:
    """The ``aimesh`` command run against ``fakes``."""
    addresses = ["--ingest-address", fakes.ingest_address, "--notifier-address", fakes.notifier_address]
    return CliRunner().invoke(cli_main, [*addresses, *args])
