"""Calls about a task another notifier replica owns, forwarded to that owner (see ``ownership``).

A forwarded call carries the caller's ``authorization`` metadata, so the owner authenticates the caller and
checks the tenant exactly as if the client had called it, and the ``aimesh-forwarded`` header: a replica
that gets a forwarded call about a task it does not own answers UNAVAILABLE (``NOTIFIER_REBALANCING``)
instead of forwarding again, so a call never takes a second hop and the forwarding replica asks the
directory again. The owner's answer, response or status with its message and rich details, is relayed
unchanged.

The owner is unknown while a rebalance is in progress, and unreachable for a moment when it died. Either way
the forwarding replica asks ``owner_address`` again (the directory refreshes) with a short backoff for up to
``REBALANCE_WAIT_S``, then answers UNAVAILABLE (``NOTIFIER_REBALANCING``, with RetryInfo).

A stream's tasks that other replicas own are followed by ``Relays``: per owner one ``WatchTasks`` call to it,
each update of which goes into the stream's buffer as a store update would.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import grpc
from google.protobuf import any_pb2
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential

from aimesh import events
from aimesh.client.tls import ClientTls
from aimesh.errors import AimeshError
from aimesh.grpc_edge import ERROR_DOMAIN, MAX_MESSAGE_BYTES, error_info
from aimesh.settings import ServerSettings
from aimesh.v1 import notifier_pb2, notifier_pb2_grpc

from .ownership import Ownership
from .store import ENDED, Update, WatchItem

log = logging.getLogger(__name__)

FORWARDED_HEADER = "aimesh-forwarded"
REBALANCING = "NOTIFIER_REBALANCING"
# How long a call waits for its task's owner to be known and reachable: a rebalance after a replica left
# normally settles well within it; a client told UNAVAILABLE retries later.
REBALANCE_WAIT_S = 5.0
# The wait a client is asked for (RetryInfo) once the owner stayed unknown or unreachable that long.
REBALANCE_RETRY_AFTER_S = 1.0

Metadata = Sequence[tuple[str, str]]
R = TypeVar("R")
if TYPE_CHECKING:
    Stub = notifier_pb2_grpc.NotifierServiceAsyncStub
    # One call to an owner: the stub, the metadata to send, the time left of the caller's deadline (None: none).
    Call = Callable[[Stub, Metadata, float | None], Awaitable[R]]


@dataclass(frozen=True)
class Answer:
    """A status to end a call with: an owner's, relayed unchanged (its trailing metadata carries the rich
    details, ``grpc-status-details-bin``), or this replica's own."""

    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...] = ()

    @classmethod
    def of(cls, error: grpc.aio.AioRpcError) -> Answer:
        return cls(error.code(), error.details() or "", tuple(error.trailing_metadata() or ()))

    @classmethod
    def with_details(cls, code: int, message: str, details: Sequence[Message]) -> Answer:
        packed = []
        for detail in details:
            packed.append(any_detail := any_pb2.Any())
            any_detail.Pack(detail)
        status = rpc_status.to_status(status_pb2.Status(code=code, message=message, details=packed))
        return cls(status.code, status.details, tuple(status.trailing_metadata))

    async def abort(self, context: grpc.aio.ServicerContext[Any, Any]) -> NoReturn:
        await context.abort(self.code, self.details, self.trailing_metadata)
        raise AssertionError("context.abort returned")  # pragma: no cover - abort always raises


def rebalancing() -> Answer:
    """The answer for a task whose owner is not known or not reachable, or that this replica was asked about
    as its owner and does not own."""
    delay = Duration()
    delay.FromNanoseconds(int(REBALANCE_RETRY_AFTER_S * 1e9))
    return Answer.with_details(
        code_pb2.UNAVAILABLE,
        "the notifier replica that holds this task is changing (a rebalance of the replicas); retry shortly",
        [error_info(REBALANCING), error_details_pb2.RetryInfo(retry_delay=delay)],
    )


def is_forwarded(context: grpc.aio.ServicerContext[Any, Any]) -> bool:
    """Whether another replica forwarded this call. Anyone can send the header: all it changes is that the
    call is never forwarded again and that a watch does not count against its connection's cap (see the
    servicer); authentication and the tenant's cap apply as to any call."""
    return any(key == FORWARDED_HEADER for key, _ in context.invocation_metadata() or ())


def forwarded_metadata(context: grpc.aio.ServicerContext[Any, Any]) -> tuple[tuple[str, str], ...]:
    """What a call forwarded on behalf of ``context``'s caller sends: the caller's credentials and the header."""
    kept = tuple((key, str(value)) for key, value in context.invocation_metadata() or () if key == "authorization")
    return (*kept, (FORWARDED_HEADER, "1"))


@dataclass(frozen=True)
class OwnerBackoff:
    """How a forwarding replica waits for a task's owner: ``initial_s`` doubling (``multiplier``) up to ``max_s``
    between tries, for at most ``budget_s`` in all."""

    initial_s: float = 0.05
    multiplier: float = 2.0
    max_s: float = 0.5
    budget_s: float = REBALANCE_WAIT_S

    def delay_s(self, tries: int) -> float:
        """The wait after ``tries`` failed tries (1: the first)."""
        return float(min(self.initial_s * self.multiplier ** (tries - 1), self.max_s))

    def retrying(self) -> AsyncRetrying:
        """An AsyncRetrying of a call that raises OwnerUnavailable while the owner is not there."""
        return AsyncRetrying(
            retry=retry_if_exception_type(OwnerUnavailable),
            wait=wait_exponential(multiplier=self.initial_s, exp_base=self.multiplier, max=self.max_s),
            stop=stop_after_delay(self.budget_s),
            reraise=True,
        )


class OwnerUnavailable(AimeshError):
    """The task's owner is not known, or did not take the call (unreachable, or no longer the owner)."""

    retryable = True


def _reason(error: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(error)
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info) and info.domain == ERROR_DOMAIN:
            return str(info.reason)
    return ""


def _rebalancing(error: grpc.aio.AioRpcError) -> bool:
    """Whether the call failed because the owner was not there: UNAVAILABLE from the channel (no details:
    refused, reset, a GOAWAY) or a replica that does not own the task."""
    return error.code() == grpc.StatusCode.UNAVAILABLE and _reason(error) in ("", REBALANCING)


def _idle(error: grpc.aio.AioRpcError) -> bool:
    return error.code() == grpc.StatusCode.DEADLINE_EXCEEDED and _reason(error) == "STREAM_IDLE"


def peer_tls(settings: ServerSettings) -> ClientTls | None:
    """How a replica calls the others: as they listen. Plaintext when the replicas serve plaintext; else TLS,
    verifying the owner with ``AIMESH_TLS_CLIENT_CA_FILE`` when set (else the system's roots), and presenting
    the replica's own certificate (what a mutual-TLS owner asks for: it must then be usable as a client
    certificate too). The owner's certificate must name the host of its directory address."""
    if not settings.tls_cert_file:
        return None
    return ClientTls(
        ca_file=Path(settings.tls_client_ca_file) if settings.tls_client_ca_file else None,
        cert_file=Path(settings.tls_cert_file),
        key_file=Path(settings.tls_key_file),
    )


class Forwarder:
    """Channels to the other replicas, one per owner address, made on first use; ``close`` (or ``async with``)
    closes them and is safe to call twice. ``backoff`` says how long a call waits for an owner."""

    def __init__(
        self,
        *,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        tls: ClientTls | None = None,
        backoff: OwnerBackoff | None = None,
    ) -> None:
        self._options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        self._tls = tls
        self.backoff = backoff if backoff is not None else OwnerBackoff()
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[str, Stub] = {}

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> Forwarder:
        return cls(max_message_bytes=settings.max_message_bytes, tls=peer_tls(settings))

    async def __aenter__(self) -> Forwarder:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def stub(self, address: str) -> Stub:
        if address not in self._stubs:
            if self._tls is None:
                channel = grpc.aio.insecure_channel(address, options=self._options)
            else:
                options = [*self._options, *self._tls.channel_options()]
                channel = grpc.aio.secure_channel(address, self._tls.credentials(), options=options)
            self._channels[address] = channel
            self._stubs[address] = notifier_pb2_grpc.NotifierServiceStub(channel)
        return self._stubs[address]

    async def close(self) -> None:
        channels, self._channels, self._stubs = self._channels, {}, {}
        for channel in channels.values():
            await channel.close()

    async def unary(
        self, context: grpc.aio.ServicerContext[Any, Any], owner: Callable[[], str | None], call: Call[R]
    ) -> R:
        """``call`` at the task's owner (``owner`` asked again before each try) on behalf of ``context``'s
        caller, retried while the owner is unknown or unreachable; the owner's response, or its status relayed
        as ``context``'s, or UNAVAILABLE (``NOTIFIER_REBALANCING``) once the backoff's budget is spent."""
        metadata = forwarded_metadata(context)

        async def attempt() -> R:
            address = owner()
            if address is None:
                raise OwnerUnavailable("no replica is known to own the task")
            try:
                return await call(self.stub(address), metadata, context.time_remaining())
            except grpc.aio.AioRpcError as e:
                if _rebalancing(e):
                    raise OwnerUnavailable(f"{address}: {e.code().name} {e.details()}") from e
                raise

        try:
            async for retry in self.backoff.retrying():
                with retry:
                    return await attempt()
        except OwnerUnavailable as e:
            log.info("no answer from the owner of a task within %ss: %s", self.backoff.budget_s, e)
            await rebalancing().abort(context)
        except grpc.aio.AioRpcError as e:
            await Answer.of(e).abort(context)
        raise AssertionError("unreachable: tenacity returns or raises")  # pragma: no cover


@dataclass
class _Outage:
    """Owners of some tasks unknown or unreachable since ``started_s`` (event loop time), ``tries`` times."""

    started_s: float
    tries: int = 0


class Relays:
    """The tasks of one stream that other replicas own, each followed from ``after_sequence`` on: per owner one
    ``WatchTasks`` call to it, whose updates are handed to ``offer`` as the store's would be (and ``ENDED`` for
    those that end there without an update, such as one resumed after its end).

    A call that fails because its owner went away (UNAVAILABLE: the owner died, or no longer owns the task)
    is made again to each task's owner now, from the last sequence handed on: no gap and no repeat. A task
    this replica owns by then is handed to ``adopt`` (with that sequence) to be followed in its store. The
    owner's end of an idle stream is not the stream's (its own idle timeout governs): the call is made again.
    Any other status of an owner, or owners unknown or unreachable for longer than the forwarder's retry
    budget, is handed to ``fail``. ``close`` cancels every call.
    """

    def __init__(
        self,
        forwarder: Forwarder,
        ownership: Ownership,
        metadata: Metadata,
        *,
        offer: Callable[[str, WatchItem], None],
        adopt: Callable[[str, int], None],
        fail: Callable[[Answer], None],
    ) -> None:
        self._forwarder = forwarder
        self._ownership = ownership
        self._metadata = metadata
        self._offer = offer
        self._adopt = adopt
        self._fail = fail
        self._after: dict[str, int] = {}  # the last sequence handed on of each task
        self._open: set[str] = set()  # the tasks followed here and not ended
        self._tasks: set[asyncio.Task[None]] = set()

    def follow(self, tasks: dict[str, int]) -> None:
        """Follow each task (its id, the last sequence the stream had of it) at its owner."""
        self._after.update(tasks)
        self._open.update(tasks)
        self._spawn(self._route(list(tasks), None))

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            log.error("relaying a stream from its owner failed", exc_info=error)
            self._fail(Answer(grpc.StatusCode.INTERNAL, "relaying the stream from the task's replica failed"))

    async def _route(self, task_ids: list[str], outage: _Outage | None) -> None:
        """Call each task's owner now; keep asking for those whose owner is unknown (or, after ``outage``,
        unreachable), until the retry budget is spent."""
        backoff = self._forwarder.backoff
        loop = asyncio.get_running_loop()
        while True:
            if outage is not None:
                if loop.time() - outage.started_s >= backoff.budget_s:
                    self._fail(rebalancing())
                    return
                outage.tries += 1
                await asyncio.sleep(backoff.delay_s(outage.tries))
            unknown = self._call_owners([t for t in task_ids if t in self._open], outage)
            if not unknown:
                return
            task_ids, outage = unknown, outage or _Outage(loop.time())

    def _call_owners(self, task_ids: list[str], outage: _Outage | None) -> list[str]:
        """Start a call to the owner of each task (grouped), adopt those owned here; the ones of no known owner."""
        owned: defaultdict[str | None, list[str]] = defaultdict(list)
        for task_id in task_ids:
            if self._ownership.is_local(task_id):
                self._open.discard(task_id)
                self._adopt(task_id, self._after[task_id])
            else:
                owned[self._ownership.owner_address(task_id)].append(task_id)
        unknown = owned.pop(None, [])
        for address, tasks in owned.items():
            assert address is not None
            self._spawn(self._relay(address, tasks, outage))
        return unknown

    async def _relay(self, address: str, task_ids: list[str], outage: _Outage | None) -> None:
        request = notifier_pb2.WatchTasksRequest(
            tasks=[notifier_pb2.WatchTaskRequest(task_id=t, after_sequence=self._after[t]) for t in task_ids]
        )
        call = self._forwarder.stub(address).WatchTasks(request, metadata=self._metadata)
        try:
            await call.initial_metadata()
            if not call.done():
                outage = None  # the owner took the stream (it sends its headers then): a later failure is new
            async for response in call:
                self._take(response.state)
        except grpc.aio.AioRpcError as e:
            await self._failed(address, task_ids, outage, e)
            return
        finally:
            call.cancel()
        for task_id in task_ids:
            if task_id in self._open:
                self._open.discard(task_id)
                self._offer(task_id, ENDED)

    async def _failed(
        self, address: str, task_ids: list[str], outage: _Outage | None, error: grpc.aio.AioRpcError
    ) -> None:
        if _idle(error):
            await self._route(task_ids, None)
        elif _rebalancing(error):
            log.info("stream from %s ended %s; following its tasks at their owners", address, error.code().name)
            await self._route(task_ids, outage or _Outage(asyncio.get_running_loop().time()))
        else:
            self._fail(Answer.of(error))

    def _take(self, state: notifier_pb2.TaskState) -> None:
        task_id = state.task_id
        if task_id not in self._open or state.sequence <= self._after[task_id]:
            return
        self._after[task_id] = state.sequence
        if events.is_terminal(state.status):
            self._open.discard(task_id)
        self._offer(task_id, Update(state))
