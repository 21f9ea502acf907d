"""The gRPC edge shared by ingest and notifier: a grpc.aio server with health, reflection, API-key
authentication, optional TLS or mutual TLS and a graceful stop, and the mapping of domain errors to rich
gRPC statuses."""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
from google.protobuf import any_pb2
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status

from aimesh import tracing
from aimesh.auth import Authenticator, AuthInterceptor
from aimesh.errors import InvalidTask
from aimesh.grpc_handlers import Behavior, rewrap
from aimesh.settings import ServerSettings

log = logging.getLogger(__name__)

ERROR_DOMAIN = "aimesh.dev"
# AIMESH_MAX_MESSAGE_BYTES's default, read from the settings rather than written twice.
MAX_MESSAGE_BYTES: int = ServerSettings.model_fields["max_message_bytes"].default


@dataclass(frozen=True)
class ServerTls:
    """PEM files of a TLS server; with ``client_ca_file`` clients must present a certificate that CA signed."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> ServerTls | None:
        if not settings.tls_cert_file:
            return None
        ca = Path(settings.tls_client_ca_file) if settings.tls_client_ca_file else None
        return cls(Path(settings.tls_cert_file), Path(settings.tls_key_file), ca)

    def credentials(self) -> grpc.ServerCredentials:
        """Read the files (at start: a renewed certificate takes a restart)."""
        ca = self.client_ca_file.read_bytes() if self.client_ca_file else None
        return grpc.ssl_server_credentials(
            [(self.key_file.read_bytes(), self.cert_file.read_bytes())],
            root_certificates=ca,
            require_client_auth=ca is not None,
        )


@dataclass(frozen=True)
class ConnectionPolicy:
    """How long a client connection may live and how dead ones are found: the server pings a connection
    quiet for ``keepalive_time_s`` and closes it if the ping is not answered in ``keepalive_timeout_s``
    (a client that vanished without closing holds nothing for long); a connection older than
    ``max_age_s`` gets a GOAWAY, and its calls still open ``max_age_grace_s`` later end UNAVAILABLE."""

    keepalive_time_s: float = 60.0
    keepalive_timeout_s: float = 20.0
    max_age_s: float = 1800.0
    max_age_grace_s: float = 60.0

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> ConnectionPolicy:
        return cls(
            settings.grpc_keepalive_time_s,
            settings.grpc_keepalive_timeout_s,
            settings.grpc_max_connection_age_s,
            settings.grpc_max_connection_age_grace_s,
        )

    def options(self) -> list[tuple[str, int]]:
        """The gRPC core channel arguments."""
        return [
            ("grpc.keepalive_time_ms", _ms(self.keepalive_time_s)),
            ("grpc.keepalive_timeout_ms", _ms(self.keepalive_timeout_s)),
            # Ping connections with no call open too, and keep pinging while no data flows (an open stream
            # waiting for its next update sends nothing): otherwise core stops after two pings.
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.max_connection_age_ms", _ms(self.max_age_s)),
            ("grpc.max_connection_age_grace_ms", _ms(self.max_age_grace_s)),
        ]


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


if TYPE_CHECKING:
    from aimesh.grpc_handlers import Handler


@dataclass(frozen=True)
class _Malformed:
    """What a request body that does not parse deserializes to, so the call can answer for it."""

    message_type: str
    error: str


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    """Answers INVALID_ARGUMENT (with google.rpc.BadRequest) for a request body that is not the method's
    message, instead of gRPC's own UNKNOWN: a malformed request is the caller's error, and says so."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        parse = handler.request_deserializer if handler is not None else None
        if handler is None or parse is None or handler.request_streaming:
            return handler
        message_type = getattr(getattr(parse, "__self__", None), "DESCRIPTOR", None)
        name = message_type.full_name if message_type is not None else "request message"

        def safe_parse(body: bytes) -> Any:
            try:
                return parse(body)
            except DecodeError as e:
                return _Malformed(name, str(e))

        return rewrap(handler, _refuse_malformed, request_deserializer=safe_parse)


def _refuse_malformed(behavior: Behavior) -> Behavior:
    """``behavior``, or INVALID_ARGUMENT when the request did not parse; keeps its kind (coroutine or async
    generator)."""

    async def refuse(request: _Malformed, context: grpc.aio.ServicerContext[Any, Any]) -> NoReturn:
        violation = error_details_pb2.BadRequest.FieldViolation(
            field="", description=f"not a valid {request.message_type}: {request.error}"
        )
        await abort_with(
            context,
            code_pb2.INVALID_ARGUMENT,
            f"the request body is not a valid {request.message_type}",
            [error_details_pb2.BadRequest(field_violations=[violation])],
        )

    if inspect.isasyncgenfunction(behavior):

        async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            if isinstance(request, _Malformed):
                await refuse(request, context)
            async for response in behavior(request, context):
                yield response

        return stream

    async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if isinstance(request, _Malformed):
            await refuse(request, context)
        return await behavior(request, context)

    return call


class GrpcServer:
    """A grpc.aio server bound to one address, with the standard health service and server reflection.

    Every call but health and reflection passes ``auth`` (default: authentication off, the default tenant);
    with ``tls`` the port speaks only TLS; ``connections`` sets keepalive and the maximum connection age.
    ``add`` registers servicers before ``start``; ``start`` raises (having stopped the server) if the address
    cannot be bound; ``set_serving`` is the health setter a service uses when it cannot serve (history not
    read yet, a component died); ``stop`` turns health to NOT_SERVING, lets in-flight calls finish within the
    grace period (``grace_s`` unless given) and is safe to call twice: a ``lifecycle.Part``. A message over
    ``max_message_bytes`` is refused with RESOURCE_EXHAUSTED by gRPC itself.
    """

    name = "grpc-server"

    def __init__(
        self,
        address: str,
        service_names: Iterable[str],
        *,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        interceptors: Sequence[Any] = (),
        auth: Authenticator | None = None,
        tls: ServerTls | None = None,
        connections: ConnectionPolicy | None = None,
        grace_s: float = 0.0,
        serving: bool = True,
    ) -> None:
        self._address = address
        self._grace_s = grace_s
        self._serving_at_start = serving
        self._service_names = list(service_names)
        self._tls = tls
        auth = auth if auth is not None else Authenticator.disabled()
        self.server = grpc.aio.server(
            # After the tracing interceptors: a refused call still gets its SERVER span.
            interceptors=[*interceptors, AuthInterceptor(auth), MalformedRequestInterceptor()],
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
                *(connections or ConnectionPolicy()).options(),
            ],
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = 0
        self._stopped = False

    @classmethod
    def of_service(
        cls,
        settings: ServerSettings,
        address: str,
        service: ServiceDescriptor,
        add_servicer: Callable[[Any, Any], None],
        servicer: object,
        *,
        auth: Authenticator,
        grace_s: float,
        serving: bool = True,
    ) -> GrpcServer:
        """The server of a service as its settings say, traced like every call: ``servicer`` serves ``service``,
        registered with its generated ``add_*Servicer_to_server`` function (``add_servicer``)."""
        server = cls(
            address,
            [service.full_name],
            max_message_bytes=settings.max_message_bytes,
            interceptors=tracing.server_interceptors(),
            auth=auth,
            tls=ServerTls.from_settings(settings),
            connections=ConnectionPolicy.from_settings(settings),
            grace_s=grace_s,
            serving=serving,
        )
        server.add(add_servicer, servicer)
        return server

    def add(self, register: Callable[[Any, Any], None], servicer: object) -> None:
        """Register a servicer with its generated ``add_*Servicer_to_server`` function."""
        register(servicer, self.server)

    async def start(self, *, serving: bool | None = None) -> None:
        """Listen, with health already at ``serving`` (the constructor's unless given) when the first client can
        ask (False: NOT_SERVING until ``set_serving(True)``)."""
        names = [*self._service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
        reflection.enable_server_reflection([*names, reflection.SERVICE_NAME], self.server)
        await self.set_serving(self._serving_at_start if serving is None else serving)
        try:
            self.port = self._bind()
            await self.server.start()
        except BaseException:
            await self.stop(0)
            raise
        security = "plaintext" if self._tls is None else "mutual TLS" if self._tls.client_ca_file else "TLS"
        log.info("gRPC server listening on %s (port %d, %s)", self._address, self.port, security)

    def _bind(self) -> int:
        try:
            if self._tls is not None:
                port = self.server.add_secure_port(self._address, self._tls.credentials())
            else:
                port = self.server.add_insecure_port(self._address)
        except RuntimeError as e:  # grpcio raises for an address in use, or returns 0 (older releases)
            raise RuntimeError(f"cannot bind {self._address}: {e}") from e
        if port == 0:
            raise RuntimeError(f"cannot bind {self._address}")
        return port

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set("", status)
        for name in self._service_names:
            await self.health.set(name, status)

    async def stop(self, grace_s: float | None = None) -> None:
        if self._stopped:
            return
        self._stopped = True
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self._grace_s if grace_s is None else grace_s)


async def abort_invalid(context: grpc.aio.ServicerContext[Any, Any], error: InvalidTask) -> NoReturn:
    """INVALID_ARGUMENT with a google.rpc.BadRequest listing each field violation."""
    bad_request = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=field, description=why) for field, why in error.violations
        ]
    )
    await abort_with(context, code_pb2.INVALID_ARGUMENT, str(error), [bad_request])


async def abort_with(
    context: grpc.aio.ServicerContext[Any, Any], code: int, message: str, details: Iterable[Message] = ()
) -> NoReturn:
    """Abort the call with a google.rpc.Status carrying ``details`` in the grpc-status-details-bin trailer."""
    packed = []
    for detail in details:
        any_detail = any_pb2.Any()
        any_detail.Pack(detail)
        packed.append(any_detail)
    status = rpc_status.to_status(status_pb2.Status(code=code, message=message, details=packed))
    await context.abort(status.code, status.details, status.trailing_metadata)
    raise AssertionError("context.abort returned")  # pragma: no cover - abort always raises


def error_info(reason: str, **metadata: str) -> error_details_pb2.ErrorInfo:
    return error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=metadata)
