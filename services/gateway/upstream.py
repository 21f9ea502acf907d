"""The gateway's one adapter to the mesh: gRPC channels to ingest and the notifier, opened on first use in the
running event loop, and the caller's credentials and trace context forwarded on every call."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aimesh import tracing
from aimesh.client.tls import ClientTls
from aimesh.settings import GatewaySettings
from aimesh.v1 import ingest_pb2_grpc, notifier_pb2, notifier_pb2_grpc

from .problems import Problem, from_rpc_error

R = TypeVar("R")

HEALTH_TIMEOUT_S = 2.0
Metadata = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Caller:
    """Who a request speaks for: its ``Authorization`` value, forwarded as the ``authorization`` metadata so
    that ingest and the notifier authenticate it (the gateway holds no keys and sees no tenants)."""

    authorization: str | None = None

    @classmethod
    def bearer(cls, key: str | None) -> Caller:
        if not key:
            return cls()
        if not (key.isascii() and key.isprintable()):
            # gRPC metadata values are printable ASCII; no valid key is anything else.
            raise Problem(401, "the API key is not valid")
        return cls(f"Bearer {key}")

    def metadata(self) -> Metadata:
        """The metadata of a call made now: the credentials and the current span's trace context."""
        auth = (("authorization", self.authorization),) if self.authorization else ()
        return auth + tuple(tracing.grpc_metadata().items())


def client_tls(settings: GatewaySettings) -> ClientTls | None:
    files = (settings.client_ca_file, settings.client_cert_file, settings.client_key_file)
    if not settings.client_tls and not any(files):
        return None
    ca, cert, key = (Path(f) if f else None for f in files)
    return ClientTls(ca_file=ca, cert_file=cert, key_file=key)


class Upstream:
    """Channels to ingest and the notifier. ``unary`` turns a failed call into a ``Problem``; ``watch`` opens a
    WatchTask stream the caller reads and cancels. ``close`` (or ``async with``) is safe to call twice."""

    def __init__(
        self, ingest_address: str, notifier_address: str, *, tls: ClientTls | None = None, call_timeout_s: float = 30.0
    ) -> None:
        self._addresses = {"ingest": ingest_address, "notifier": notifier_address}
        self._tls = tls
        self.call_timeout_s = call_timeout_s
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._ingest: ingest_pb2_grpc.IngestServiceAsyncStub | None = None
        self._notifier: notifier_pb2_grpc.NotifierServiceAsyncStub | None = None

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> Upstream:
        return cls(
            settings.ingest_address,
            settings.notifier_address,
            tls=client_tls(settings),
            call_timeout_s=settings.gateway_call_timeout_s,
        )

    async def __aenter__(self) -> Upstream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        self._ingest = self._notifier = None
        for channel in channels.values():
            await channel.close()

    @property
    def ingest(self) -> ingest_pb2_grpc.IngestServiceAsyncStub:
        if self._ingest is None:
            self._ingest = ingest_pb2_grpc.IngestServiceStub(self._channel("ingest"))
        return self._ingest

    @property
    def notifier(self) -> notifier_pb2_grpc.NotifierServiceAsyncStub:
        if self._notifier is None:
            self._notifier = notifier_pb2_grpc.NotifierServiceStub(self._channel("notifier"))
        return self._notifier

    async def unary(self, method: Callable[..., Awaitable[R]], request: Any, caller: Caller) -> R:
        """One unary call within the call timeout; a failure raises the Problem it maps to."""
        try:
            return await method(request, timeout=self.call_timeout_s, metadata=caller.metadata())
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e) from e

    def watch(self, task_id: str, after_sequence: int, caller: Caller) -> grpc.aio.UnaryStreamCall[Any, Any]:
        """A WatchTask stream with no deadline: the notifier ends idle streams itself."""
        request = notifier_pb2.WatchTaskRequest(task_id=task_id, after_sequence=after_sequence)
        return self.notifier.WatchTask(request, metadata=caller.metadata())

    async def health(self) -> dict[str, str]:
        """Each upstream's health status name (``SERVING``, ``NOT_SERVING``, or the gRPC code that failed)."""
        return {name: await self._health(name) for name in self._addresses}

    async def _health(self, name: str) -> str:
        stub = health_pb2_grpc.HealthStub(self._channel(name))
        try:
            answer = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=HEALTH_TIMEOUT_S)
        except grpc.aio.AioRpcError as e:
            return e.code().name
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status))

    def _channel(self, name: str) -> grpc.aio.Channel:
        if name not in self._channels:
            address = self._addresses[name]
            if self._tls is None:
                self._channels[name] = grpc.aio.insecure_channel(address)
            else:
                credentials, options = self._tls.credentials(), self._tls.channel_options()
                self._channels[name] = grpc.aio.secure_channel(address, credentials, options=options)
        return self._channels[name]
