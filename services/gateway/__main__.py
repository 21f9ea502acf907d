"""Run the gateway: ``python -m aimesh.gateway`` or ``aimesh-gateway``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Iterator

import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from aimesh import runtime
from aimesh.lifecycle import OnDeath, TaskPart, run_until
from aimesh.metrics import GatewayMetrics, MetricsServer, new_registry
from aimesh.settings import GatewaySettings

from .app import create_app
from .telemetry import RedactAccessToken

log = logging.getLogger("aimesh.gateway")

HEAD_LIMIT_BYTES = 16 * 1024  # h11's default bound on a request line and headers; llhttp and uvicorn have none


class GatewayServer(uvicorn.Server):
    """uvicorn without signal handlers of its own: the service's (``runtime.stop_event_on_signals``) are the only
    ones, so one SIGTERM is one graceful stop (with both, uvicorn raised the signal again once it had stopped,
    and the service took it for a second one).

    A ``lifecycle.Part`` serving on ``listener`` (through a ``lifecycle.TaskPart``): ``start`` serves in a task,
    ``stop`` ends it gracefully; a serve that ends before it was told to is reported to ``on_death``."""

    name = "http-server"

    def __init__(self, config: uvicorn.Config, listener: socket.socket | None = None) -> None:
        super().__init__(config)
        self._listener = listener
        self._part = TaskPart(
            self.name, self._serve_listener, ask_to_stop=self.stop_serving, returned="uvicorn stopped serving"
        )

    @property
    def on_death(self) -> OnDeath | None:
        return self._part.on_death

    @on_death.setter
    def on_death(self, on_death: OnDeath | None) -> None:
        self._part.on_death = on_death

    async def start(self) -> None:
        assert self._listener is not None, "a GatewayServer started as a part needs its listener"
        await self._part.start()

    async def stop(self) -> None:
        await self._part.stop()

    async def _serve_listener(self) -> None:
        assert self._listener is not None
        await self.serve(sockets=[self._listener])

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    def stop_serving(self) -> None:
        """Stop as uvicorn's own SIGTERM handler would: sse-starlette hooks that handler to end open event
        streams, which uvicorn would otherwise wait out for the whole grace period."""
        self.handle_exit(signal.SIGTERM, None)


class BoundedHeadProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with h11's bound on a request's head put back.

    httptools parses in C; h11 parsed each chunk of a chunked body in Python, so one client sending a megabyte in
    one-byte chunks held the event loop, and every other client, for seconds. But neither llhttp nor uvicorn bounds
    a head: a client could send one endless header and the gateway buffered all of it. A head still unfinished
    once more than ``HEAD_LIMIT_BYTES`` has arrived gets uvicorn's plain 400 and the connection is closed (a whole
    head that arrives in one read, at most asyncio's 256 KiB, is parsed, as with h11)."""

    _in_head = True
    _heads = 0  # heads completed on this connection
    _messages = 0  # requests completed on this connection, bodies included
    _head_bytes = 0

    def data_received(self, data: bytes) -> None:
        heads, messages = self._heads, self._messages
        super().data_received(data)
        # A read that completed a head is not counted: the rest of it may be a body, or the start of a next head.
        # Nor is one that completed a body: most of it was body (a body's last read counted as head bytes once got
        # the 400 sent after the request's own answer, where the client's next request on the connection read it).
        if self._heads != heads or self._messages != messages or not self._in_head or self.transport.is_closing():
            return
        self._head_bytes += len(data)
        if self._head_bytes > HEAD_LIMIT_BYTES:
            self.logger.warning("Request head over %d bytes.", HEAD_LIMIT_BYTES)
            self.send_400_response("Invalid HTTP request received.")

    def on_headers_complete(self) -> None:
        self._in_head, self._heads, self._head_bytes = False, self._heads + 1, 0
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head, self._messages = True, self._messages + 1  # the next request on the connection starts its head


async def serve(settings: GatewaySettings, stop: asyncio.Event) -> None:
    """Serve until ``stop`` is set: then open event streams end, WebSockets close (1012) and requests in flight
    get ``AIMESH_SHUTDOWN_GRACE_S``. Raises RuntimeError if the address cannot be bound, and
    ``runtime.ComponentDied`` (having stopped) if uvicorn stops serving on its own."""
    metrics = GatewayMetrics(new_registry())
    listener = listen(settings.gateway_address)  # bound first: a port in use stops the gateway before it starts
    server = GatewayServer(uvicorn_config(create_app(settings, metrics=metrics), settings), listener)
    for logger in ("uvicorn.access", "uvicorn.error"):  # the access log, and the WebSocket handshakes
        logging.getLogger(logger).addFilter(RedactAccessToken())
    scheme = "https" if settings.gateway_tls_cert_file else "http"
    log.info("gateway listening on %s://%s", scheme, settings.gateway_address)
    await run_until(stop, MetricsServer(settings.metrics_host, settings.metrics_port, metrics.registry), server)


def listen(address: str) -> socket.socket:
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        listener = socket.create_server((host, int(port)), family=family, backlog=2048)
    except (OSError, ValueError) as e:
        raise RuntimeError(f"cannot bind {address}: {e}") from e
    # asyncio sets TCP_NODELAY only on sockets made with IPPROTO_TCP, which create_server's are not: without it a
    # small answer on a kept-alive connection waited for the client's delayed ACK (about 40 ms a request).
    # Connections accepted from the listener inherit the option.
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return listener


def uvicorn_config(app: ASGIApp, settings: GatewaySettings) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        http=BoundedHeadProtocol,
        log_config=None,  # runtime.configure_logging's handlers, JSON or text like every service
        ws_max_size=settings.gateway_max_body_bytes,  # a WebSocket message is bounded like a request body
        timeout_graceful_shutdown=max(1, round(settings.shutdown_grace_s)),
        ssl_certfile=settings.gateway_tls_cert_file or None,
        ssl_keyfile=settings.gateway_tls_key_file or None,
        server_header=False,
    )


def main() -> None:
    runtime.run_service("gateway", GatewaySettings(), serve)


if __name__ == "__main__":
    main()
