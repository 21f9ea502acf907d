"""Several Triton servers behind one worker. ``AIMESH_TRITON_URL`` is one of:

- ``host:port``: one server (``TritonInference``), as it always was;
- ``host:port,host:port,...``: a list the worker spreads its requests over itself (``TritonPool``);
- ``dns:///name:port``: one gRPC channel whose ``round_robin`` policy spreads calls over every address the name
  resolves to (a Kubernetes headless Service), and retries a call refused UNAVAILABLE on another address.

A list: each request (a micro-batch, a stream, a model-configuration query) goes to the up endpoint with the
fewest requests outstanding from this worker, ties going to the next in turn. Least outstanding rather than plain
round robin: requests differ (1 to 64 rows, models of different cost) and so may servers (a busier or slower
replica); a slow or hung server collects outstanding requests and so gets fewer new ones, where round robin would
keep handing it its share until those calls time out.

Health: an endpoint goes down when a call on it fails as unreachable (gRPC UNAVAILABLE: refused, reset, the
server going away) or its readiness probe fails. ``is_ready``, which the worker's health check calls every
AIMESH_TRITON_HEALTH_INTERVAL_S and at once after an UNAVAILABLE, probes (``is_server_ready``) the up endpoints and
each down one whose backoff has passed: ``BACKOFF_INITIAL_S`` after its failure, doubling with each further failure
up to ``BACKOFF_MAX_S``, and reset by a successful call. A ready answer brings it back. While every endpoint is
down, every check probes all of them, as it probes a single server: the outage ends at the first check that finds
one ready.

Routing around: a request that fails as unreachable is sent at once to another up endpoint it has not tried, and
only when none is left does the error reach the worker, which handles it as a single server's outage (retries with
backoff within AIMESH_RETRY_BUDGET_S, fetching paused while ``is_ready`` is false, tasks waiting meanwhile). While
every endpoint is down a request is still sent to one of them, as it is to a single server. A stream stays on one
endpoint: it moves to another only if its endpoint failed before the first response; after that the error reaches
the worker, whose retry runs the whole stream again (on an endpoint that is up).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, TypeVar

from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE, KeepAliveOptions

from aimesh import tracing
from aimesh.metrics import ENDPOINT_ERROR, ENDPOINT_OK, ENDPOINT_OUTCOMES, ENDPOINT_UNREACHABLE, WorkerMetrics

from .inference import Inference, InferenceFailed, ModelInfo, Token, Triton, TritonInference
from .tensor_io import Row

log = logging.getLogger(__name__)

T = TypeVar("T")

DNS_SCHEME = "dns:"
# A down endpoint is probed again this long after its first failure, doubling with each further one.
BACKOFF_INITIAL_S = 0.5
BACKOFF_MAX_S = 5.0
PROBE_TIMEOUT_S = 2.0

# The gRPC service config of a dns:/// target: round_robin over every resolved address (the default, pick_first,
# sends everything to the first), and a call refused UNAVAILABLE (an address whose server died, whose connection
# gRPC has not yet seen drop) tried again on the next address: gRPC retries only calls that got no response yet.
BALANCED_SERVICE_CONFIG: dict[str, Any] = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [
        {
            "name": [{"service": "inference.GRPCInferenceService"}],
            "retryPolicy": {
                "maxAttempts": 3,
                "initialBackoff": "0.05s",
                "maxBackoff": "0.5s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ],
}


def channel_args(*, balanced: bool = False) -> list[tuple[str, Any]]:
    """The channel options of an endpoint of a list, or with ``balanced`` of a dns:/// target: tritonclient's own
    (``channel_args`` replaces them all), gRPC's reconnection backoff capped at ``BACKOFF_MAX_S`` (its default cap,
    120 s, would keep a server that came back after a long outage unreachable, and its probes failing, for up to
    two minutes), and the balanced service config."""
    keepalive = KeepAliveOptions()
    args: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
        ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
        ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
        ("grpc.max_reconnect_backoff_ms", int(BACKOFF_MAX_S * 1000)),
    ]
    if balanced:
        args.append(("grpc.service_config", json.dumps(BALANCED_SERVICE_CONFIG)))
    return args


def endpoints_of(url: str) -> list[str]:
    """The endpoints a comma-separated ``AIMESH_TRITON_URL`` names. A single entry is returned as written (any gRPC
    target, as before); each entry of a longer list must be ``host:port``, named once. Raises ValueError."""
    entries = [e.strip() for e in url.split(",")]
    if len(entries) == 1:
        if not entries[0]:
            raise ValueError("AIMESH_TRITON_URL is empty")
        return entries
    for entry in entries:
        host, _, port = entry.rpartition(":")
        if entry.startswith(DNS_SCHEME):
            raise ValueError(f"AIMESH_TRITON_URL: a {DNS_SCHEME}/// target stands alone, not in a list: {entry!r}")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"AIMESH_TRITON_URL: {entry!r} in a list is not host:port")
    if len(set(entries)) < len(entries):
        raise ValueError(f"AIMESH_TRITON_URL names an endpoint twice: {url!r}")
    return entries


def connect(url: str, *, metrics: WorkerMetrics | None = None) -> TritonInference | TritonPool:
    """The worker's Triton adapter for ``AIMESH_TRITON_URL`` (see the module's docstring). Use with ``async with``."""
    endpoints = endpoints_of(url)
    if len(endpoints) > 1:
        return TritonPool([TritonInference(e, channel_args=channel_args()) for e in endpoints], metrics=metrics)
    if endpoints[0].startswith(DNS_SCHEME):
        return TritonInference(endpoints[0], channel_args=channel_args(balanced=True))
    return TritonInference(endpoints[0])


@dataclass(eq=False)
class Endpoint:
    """One server of a pool and what the pool knows of it."""

    triton: Triton
    up: bool = True
    failures: int = 0  # failed calls and probes since its last successful call
    retry_at: float = 0.0  # when a down endpoint is probed again (the pool's clock)
    outstanding: int = 0

    @property
    def url(self) -> str:
        return self.triton.url


class TritonPool:
    """Several Triton servers as one: requests spread by least outstanding, unreachable servers routed around (see
    the module's docstring). Use as ``async with TritonPool(servers) as triton``; ``servers`` are closed with it.

    ``clock`` (monotonic seconds) times the backoff of down endpoints."""

    def __init__(
        self,
        servers: Sequence[Triton],
        *,
        metrics: WorkerMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if len(servers) < 2:
            raise ValueError("a TritonPool needs at least two servers")
        self.endpoints = [Endpoint(server) for server in servers]
        self._metrics = metrics
        self._clock = clock
        self._turn = 0
        for endpoint in self.endpoints:
            self._report_state(endpoint)
            if metrics is not None:  # every series exposed from the start, at 0
                for outcome in ENDPOINT_OUTCOMES:
                    metrics.triton_endpoint_requests.labels(endpoint.url, outcome)

    @property
    def url(self) -> str:
        return ",".join(e.url for e in self.endpoints)

    async def __aenter__(self) -> TritonPool:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        await asyncio.gather(*(e.triton.close() for e in self.endpoints))

    # --- health ---------------------------------------------------------------------------------------------

    async def is_ready(self, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
        """Whether any endpoint can serve, after probing the up ones and the down ones due a probe (all of them
        while none is up)."""
        now = self._clock()
        due = [e for e in self.endpoints if e.up or now >= e.retry_at]
        if not any(e.up for e in self.endpoints):
            due = self.endpoints
        await asyncio.gather(*(self._probe(e, timeout_s) for e in due))
        return any(e.up for e in self.endpoints)

    async def _probe(self, endpoint: Endpoint, timeout_s: float) -> None:
        try:
            ready = await endpoint.triton.is_ready(timeout_s)
        except Exception as e:  # a probe that cannot answer is a server that is not ready
            log.debug("probing Triton at %s failed: %r", endpoint.url, e)
            ready = False
        if ready:
            self._set_up(endpoint)
        else:
            self._failed(endpoint, "not ready")

    def _set_up(self, endpoint: Endpoint) -> None:
        if not endpoint.up:
            endpoint.up = True
            log.warning("Triton at %s is up again; sending it requests", endpoint.url)
            self._report_state(endpoint)

    def _failed(self, endpoint: Endpoint, why: str) -> None:
        """A call or probe found ``endpoint`` unreachable or not ready: down, next probe after its backoff."""
        endpoint.failures += 1
        backoff_s = min(BACKOFF_MAX_S, BACKOFF_INITIAL_S * 2 ** (endpoint.failures - 1))
        endpoint.retry_at = self._clock() + backoff_s
        if endpoint.up:
            endpoint.up = False
            others = sum(e.up for e in self.endpoints)
            log.warning("Triton at %s is down (%s); %d other endpoints up", endpoint.url, why, others)
            self._report_state(endpoint)

    def _report_state(self, endpoint: Endpoint) -> None:
        if self._metrics is not None:
            self._metrics.triton_endpoint_up.labels(endpoint.url).set(1 if endpoint.up else 0)

    def _count(self, endpoint: Endpoint, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.triton_endpoint_requests.labels(endpoint.url, outcome).inc()

    # --- routing --------------------------------------------------------------------------------------------

    def _pick(self, tried: set[Endpoint]) -> Endpoint | None:
        """The endpoint for a request's next try: the up one not yet tried with the fewest outstanding requests,
        ties to the next in turn; for a first try while none is up, any (in turn); else None."""
        candidates = [e for e in self.endpoints if e.up and e not in tried]
        if not candidates and not tried:
            candidates = self.endpoints
        if not candidates:
            return None
        count = len(self.endpoints)
        in_turn = (self.endpoints[(self._turn + i) % count] for i in range(count))
        best = min((e for e in in_turn if e in candidates), key=lambda e: e.outstanding)
        self._turn = (self.endpoints.index(best) + 1) % count
        return best

    async def _route(
        self, call: Callable[[Triton], AsyncGenerator[T, None]], *, counted: bool = True
    ) -> AsyncGenerator[T, None]:
        """What ``call`` yields on one endpoint, or on the next if this one was unreachable before its first item
        (see the module's docstring): the one retry loop of unary calls and streams. ``counted``: in the
        ``triton_endpoint_requests`` metric."""
        tried: set[Endpoint] = set()
        error: InferenceFailed | None = None
        while (endpoint := self._pick(tried)) is not None:
            tried.add(endpoint)
            endpoint.outstanding += 1
            tracing.set_server_address(endpoint.url)
            items = 0
            try:
                async with aclosing(call(endpoint.triton)) as results:
                    async for result in results:
                        items += 1
                        yield result
            except InferenceFailed as e:
                if counted:
                    self._count(endpoint, ENDPOINT_UNREACHABLE if e.unreachable else ENDPOINT_ERROR)
                if e.unreachable:
                    self._failed(endpoint, str(e))
                if not e.unreachable or items:
                    raise
                error = e
                continue
            finally:
                endpoint.outstanding -= 1
            if counted:
                self._count(endpoint, ENDPOINT_OK)
            self._succeeded(endpoint)
            return
        assert error is not None  # a first try always finds an endpoint
        raise error

    async def _call(self, call: Callable[[Triton], Awaitable[T]], *, counted: bool = True) -> T:
        """``call`` on one endpoint after another until one reaches its server (see the module's docstring)."""

        async def once(triton: Triton) -> AsyncGenerator[T, None]:
            yield await call(triton)

        (result,) = [result async for result in self._route(once, counted=counted)]  # one item: the call's result
        return result

    def _succeeded(self, endpoint: Endpoint) -> None:
        endpoint.failures = 0
        self._set_up(endpoint)

    # --- what the worker calls ------------------------------------------------------------------------------

    async def infer_batch(
        self,
        model_name: str,
        rows: Sequence[Row],
        *,
        model_version: str = "",
        parameters: dict[str, str] | None = None,
        timeout_s: float,
        queue_timeout_s: float | None = None,
        metadata: dict[str, str] | None = None,
        priority: int = 0,
    ) -> list[Inference]:
        """``TritonInference.infer_batch`` on one endpoint, or on the next if it is unreachable; ``timeout_s``
        bounds all the tries together."""
        deadline = time.monotonic() + timeout_s
        return await self._call(
            lambda triton: triton.infer_batch(
                model_name,
                rows,
                model_version=model_version,
                parameters=parameters,
                timeout_s=max(0.001, deadline - time.monotonic()),
                queue_timeout_s=queue_timeout_s,
                metadata=metadata,
                priority=priority,
            )
        )

    async def model_info(self, model_name: str, model_version: str = "", *, timeout_s: float = 10.0) -> ModelInfo:
        """The model's configuration, asked of any endpoint (every server is expected to serve the same
        repository) and cached there."""
        return await self._call(
            lambda triton: triton.model_info(model_name, model_version, timeout_s=timeout_s), counted=False
        )

    def stream(
        self,
        model_name: str,
        text: str,
        *,
        model_version: str = "",
        parameters: dict[str, str] | None = None,
        timeout_s: float,
        stop: asyncio.Event,
        metadata: dict[str, str] | None = None,
    ) -> AsyncGenerator[Token, None]:
        """``TritonInference.stream`` on one endpoint: on another only if it was unreachable before its first
        response. Raises InferenceFailed."""
        return self._route(
            lambda triton: triton.stream(
                model_name,
                text,
                model_version=model_version,
                parameters=parameters,
                timeout_s=timeout_s,
                stop=stop,
                metadata=metadata,
            )
        )
