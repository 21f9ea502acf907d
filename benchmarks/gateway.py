"""The HTTP gateway against the gRPC API it fronts: how much later a Server-Sent Events client learns that a task
ended than a WatchTask client does, and how many idle event streams one gateway process holds.

Each round starts a fresh mesh (the local stack starts the gateway) and measures, in this order:

- latency: one client runs sequential tasks, alternating two paths. gRPC: ``SubmitTask``, then ``WatchTask`` to
  the terminal update. HTTP: ``POST /v1/tasks``, then ``GET /v1/tasks/{id}/events`` read to the terminal
  ``update`` event. Each task is timed from the submit call, and from the submit's answer, to its terminal update;
  the figures are the HTTP path's percentiles minus (and over) the gRPC path's, per round.
- idle streams: the workers are stopped and N ``sleep`` tasks submitted, which stay QUEUED with nothing more to
  say while no worker runs; an event stream is opened to each through the one gateway process, and the gateway's
  RSS before and with them open gives the memory per stream. Then the workers start again, the tasks run, and
  every stream is read to its terminal update: delivered / N.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

from aimesh import events
from aimesh.devstack.stack import Stack
from aimesh.v1 import ingest_pb2_grpc, notifier_pb2, notifier_pb2_grpc, result_pb2
from benchmarks import sections
from benchmarks.common import (
    API_KEY,
    AUTH,
    TEXT,
    Section,
    Workers,
    bench_stack,
    log,
    median,
    prefill,
    quantile,
    sequential,
    sleep_parameters,
    spread,
    submit_request,
)

TITLE = sections.GATEWAY
TARGET_EXTRA_P50_MS = 2.0
OPENING_AT_ONCE = 50  # streams being opened at a time: all N handshakes at once would queue behind each other
OPEN_TIMEOUT_S = 120.0
DELIVERY_TIMEOUT_S = 120.0
TERMINAL = frozenset(result_pb2.TaskStatus.Name(s) for s in events.TERMINAL_STATUSES)
HTTP_AUTH = {"Authorization": f"Bearer {API_KEY}"}
METHOD = (
    "Each round starts a fresh mesh, the gateway included, and measures two things. Latency: one client runs "
    "sequential tasks alternating two paths, gRPC (`SubmitTask`, then `WatchTask` to the terminal update) and "
    "HTTP through the gateway (`POST /v1/tasks`, then `GET /v1/tasks/{id}/events` read with httpx to the "
    "terminal `update` event); each task is timed from the submit call, and from the submit's answer, to its "
    "terminal update, and the HTTP path's percentiles are compared with the gRPC path's in the same round. Idle "
    "streams: the workers are stopped and N `sleep` tasks (`delay_ms` 0) submitted, which stay QUEUED with "
    "nothing more to say while no worker runs; one client opens an event stream to each (a connection each, "
    f"{OPENING_AT_ONCE} being opened at a time; open once its QUEUED update came), all through the one gateway "
    "process. The gateway's RSS just before and with all N open gives the memory per stream. Then the workers "
    "start again, the tasks run, and every stream is read to its terminal update. All the gateway's watches "
    "share one connection to the notifier, which caps the watches per connection (1,000 by default) and per "
    "tenant: the round raises both (`AIMESH_MAX_SUBSCRIPTIONS_PER_CONNECTION` and `_PER_TENANT`) to "
    "max(10,000, 2N)."
)


# --- Server-Sent Events ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SseEvent:
    event: str
    id: str
    data: str


class SseDecoder:
    """A text/event-stream decoded a line at a time, as the HTML standard parses the fields used here (event,
    data, id); comments (the gateway's heartbeats) and other fields are skipped."""

    def __init__(self) -> None:
        self._fields: dict[str, list[str]] = {}

    def line(self, line: str) -> SseEvent | None:
        """The event this line completes (a blank line after a data field), else None."""
        if not line:
            fields, self._fields = self._fields, {}
            if "data" not in fields:
                return None
            event, event_id = fields.get("event", ["message"])[-1], fields.get("id", [""])[-1]
            return SseEvent(event or "message", event_id, "\n".join(fields["data"]))
        if not line.startswith(":"):
            name, _, value = line.partition(":")
            self._fields.setdefault(name, []).append(value.removeprefix(" "))
        return None


def update_status(event: SseEvent) -> str:
    """The task status an ``update`` event carries (its data is a WatchTaskResponse in proto3 JSON)."""
    if event.event != "update":
        raise RuntimeError(f"the stream sent a {event.event!r} event: {event.data[:300]}")
    return str(json.loads(event.data)["state"]["status"])


async def read_to_end(response: httpx.Response, on_update: Callable[[], None] = lambda: None) -> tuple[str, float]:
    """Read an event stream until the gateway ends it; the terminal status it carried and when (perf_counter)
    that event arrived. ``on_update`` is called for every update."""
    decoder = SseDecoder()
    terminal: tuple[str, float] | None = None
    async for line in response.aiter_lines():
        event = decoder.line(line)
        if event is None:
            continue
        status = update_status(event)
        on_update()
        if terminal is None and status in TERMINAL:
            terminal = (status, time.perf_counter())
    if terminal is None:
        raise RuntimeError("the event stream ended before the terminal update")
    return terminal


# --- latency: both paths ---------------------------------------------------------------------------------------
@dataclass
class Paths:
    """One client of both APIs: gRPC channels to ingest and the notifier, and an HTTP client of the gateway.
    Each call returns milliseconds from the submit call to the terminal update and records, in ``after_submit_ms``,
    those from the submit's answer to it."""

    stack: Stack
    model: str
    after_submit_ms: dict[str, list[float]] = field(default_factory=lambda: {"grpc": [], "http": []})

    async def __aenter__(self) -> Paths:
        self._channels = [
            grpc.aio.insecure_channel(a) for a in (self.stack.ingest_address, self.stack.notifier_address)
        ]
        self.ingest = ingest_pb2_grpc.IngestServiceStub(self._channels[0])
        self.notifier = notifier_pb2_grpc.NotifierServiceStub(self._channels[1])
        self.http = httpx.AsyncClient(base_url=self.stack.gateway_url, headers=HTTP_AUTH, timeout=30)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.http.aclose()
        for channel in self._channels:
            await channel.close()

    async def grpc(self) -> float:
        started = time.perf_counter()
        reply = await self.ingest.SubmitTask(submit_request(self.model), timeout=30, metadata=AUTH)
        answered = time.perf_counter()
        terminal: tuple[int, float] | None = None
        watch = notifier_pb2.WatchTaskRequest(task_id=reply.task_id)
        async for update in self.notifier.WatchTask(watch, timeout=30, metadata=AUTH):
            if terminal is None and events.is_terminal(update.state.status):
                terminal = (update.state.status, time.perf_counter())
        if terminal is None or terminal[0] != result_pb2.TASK_STATUS_SUCCEEDED:
            raise RuntimeError(f"task {reply.task_id} ended {terminal}")
        return self._record("grpc", started, answered, terminal[1])

    async def sse(self) -> float:
        started = time.perf_counter()
        body = {"modelName": self.model, "input": {"text": TEXT}}
        response = await self.http.post("/v1/tasks", json=body)
        answered = time.perf_counter()
        if response.status_code != 202:
            raise RuntimeError(f"POST /v1/tasks answered {response.status_code}: {response.text[:300]}")
        task_id = response.json()["taskId"]
        async with self.http.stream("GET", f"/v1/tasks/{task_id}/events") as stream:
            if stream.status_code != 200:
                raise RuntimeError(f"the events of {task_id} answered {stream.status_code}")
            status, ended = await read_to_end(stream)  # to the end: the connection is reused for the next task
        if status != "TASK_STATUS_SUCCEEDED":
            raise RuntimeError(f"task {task_id} ended {status}")
        return self._record("http", started, answered, ended)

    def _record(self, path: str, started: float, answered: float, ended: float) -> float:
        self.after_submit_ms[path].append((ended - answered) * 1000)
        return (ended - started) * 1000


async def drive(stack: Stack, model: str, tasks: int, warmup: int) -> dict[str, list[float]]:
    async with Paths(stack, model) as paths:
        grpc_ms, http_ms = await sequential([paths.grpc, paths.sse], tasks, warmup)
    return {
        "grpc_ms": grpc_ms,
        "http_ms": http_ms,
        "grpc_after_submit_ms": paths.after_submit_ms["grpc"][-tasks:],
        "http_after_submit_ms": paths.after_submit_ms["http"][-tasks:],
    }


# --- idle streams ----------------------------------------------------------------------------------------------
class StreamHolder:
    """Opens an event stream per task, ``OPENING_AT_ONCE`` at a time, and reads each to its end. A stream counts
    as open once its first update came (the gateway answers only then)."""

    def __init__(self, count: int) -> None:
        self._opening = asyncio.Semaphore(OPENING_AT_ONCE)
        self._count = count
        self._settled = 0  # open, or failed before it opened
        self._all_settled = asyncio.Event()
        self.opened = 0
        self.failures: list[str] = []

    async def all_settled(self) -> None:
        await asyncio.wait_for(self._all_settled.wait(), OPEN_TIMEOUT_S)

    async def follow(self, client: httpx.AsyncClient, task_id: str) -> str | None:
        """The terminal status the task's stream delivered; None if it failed (noted in ``failures``)."""
        await self._opening.acquire()
        waiting = True

        def settle(opened: bool) -> None:
            nonlocal waiting
            if waiting:
                waiting = False
                self._opening.release()
                self.opened += opened
                self._settled += 1
                if self._settled == self._count:
                    self._all_settled.set()

        try:
            async with client.stream("GET", f"/v1/tasks/{task_id}/events") as response:
                if response.status_code != 200:
                    raise RuntimeError(f"answered {response.status_code}: {(await response.aread())[:300]!r}")
                status, _ = await read_to_end(response, on_update=lambda: settle(True))
                return status
        except (httpx.HTTPError, RuntimeError, ValueError, KeyError) as e:  # ValueError: data that is not JSON
            self.failures.append(f"{task_id}: {e!r}")
            return None
        finally:
            settle(False)


def subscription_env(streams: int) -> dict[str, str]:
    """Room for the streams at the notifier: every gateway watch is a subscription on the gateway's one
    connection, capped per connection (1,000 by default) and per tenant (10,000)."""
    room = str(max(10_000, 2 * streams))
    return {"AIMESH_MAX_SUBSCRIPTIONS_PER_CONNECTION": room, "AIMESH_MAX_SUBSCRIPTIONS_PER_TENANT": room}


def raise_descriptor_limit(streams: int) -> None:
    """Each stream is a socket here and one in the gateway, a child that inherits this process's limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = streams + 2048
    if soft >= wanted or soft == resource.RLIM_INFINITY:
        return
    if hard != resource.RLIM_INFINITY and hard < wanted:
        raise RuntimeError(f"{streams} streams need `ulimit -n` {wanted}; the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


async def gateway_sse_streams(stack: Stack) -> float:
    """The open event streams the gateway itself reports (``aimesh_gateway_open_streams{kind="sse"}``)."""
    async with httpx.AsyncClient(timeout=10) as client:
        text = (await client.get(stack.metrics_url("gateway"))).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "aimesh_gateway_open_streams" and sample.labels.get("kind") == "sse":
                return sample.value
    raise RuntimeError("the gateway's metrics have no aimesh_gateway_open_streams{kind=sse}")


async def hold_streams(stack: Stack, count: int) -> dict[str, float]:
    workers = sorted(n for n in stack.services if n.startswith("worker-"))
    Workers(stack).stop()
    task_ids = await prefill(stack, count, sleep_parameters(0))
    gateway = psutil.Process(stack.services["gateway"].pid)
    holder = StreamHolder(count)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=stack.gateway_url, headers=HTTP_AUTH, timeout=60, limits=limits) as client:
        rss_before = gateway.memory_info().rss
        started = time.perf_counter()
        streams = [asyncio.create_task(holder.follow(client, task_id)) for task_id in task_ids]
        await holder.all_settled()
        open_s = time.perf_counter() - started
        rss_open, descriptors = gateway.memory_info().rss, gateway.num_fds()
        reported = await gateway_sse_streams(stack)
        log(f"{holder.opened} of {count} streams open in {open_s:.1f}s; restarting {len(workers)} workers")
        for index in range(len(workers)):
            stack.start_worker(index)
        restarted = time.perf_counter()
        done, pending = await asyncio.wait(streams, timeout=DELIVERY_TIMEOUT_S)
        for stream in pending:
            stream.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    delivered = sum(s.result() is not None for s in done)
    if holder.failures:
        log(f"{len(holder.failures)} streams failed, e.g. {holder.failures[0]}")
    return {
        "streams": count,
        "opened": holder.opened,
        "open_s": open_s,
        "rss_before_bytes": rss_before,
        "rss_open_bytes": rss_open,
        "descriptors": descriptors,
        "reported_open": reported,
        "delivered": delivered,
        "succeeded": sum(s.result() == "TASK_STATUS_SUCCEEDED" for s in done),
        "delivery_s": time.perf_counter() - restarted,
    }


# --- rounds and the report -------------------------------------------------------------------------------------
async def measure_stack(stack: Stack, args: argparse.Namespace) -> dict[str, Any]:
    latency = await drive(stack, args.latency_model, args.gateway_tasks, args.warmup)
    log(f"latency done; holding {args.gateway_streams} idle streams")
    return {**latency, "idle": await hold_streams(stack, args.gateway_streams)}


def run_rounds(args: argparse.Namespace) -> list[dict[str, Any]]:
    raise_descriptor_limit(args.gateway_streams)
    rounds = []
    for i in range(args.rounds):
        with bench_stack(extra_env=subscription_env(args.gateway_streams)) as stack:
            rounds.append(asyncio.run(measure_stack(stack, args)))
        log(f"gateway round {i + 1}/{args.rounds} done")
    return rounds


def per_round(rounds: Sequence[dict[str, Any]], series: str, q: float) -> list[float]:
    return [quantile(r[series], q) for r in rounds]


def ratio_cell(values: Sequence[float]) -> str:
    return f"{median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def latency_lines(rounds: Sequence[dict[str, Any]]) -> list[str]:
    columns = [(series, q) for series in ("ms", "after_submit_ms") for q in (0.5, 0.99)]
    grpc_cells = [per_round(rounds, f"grpc_{s}", q) for s, q in columns]
    http_cells = [per_round(rounds, f"http_{s}", q) for s, q in columns]
    extra = [[h - g for h, g in zip(hs, gs, strict=True)] for hs, gs in zip(http_cells, grpc_cells, strict=True)]
    ratio = [[h / g for h, g in zip(hs, gs, strict=True)] for hs, gs in zip(http_cells, grpc_cells, strict=True)]
    return [
        "| path | p50 | p99 | submit's answer to the terminal update, p50 | p99 |",
        "|---|---|---|---|---|",
        "| gRPC: `SubmitTask`, then `WatchTask` | " + " | ".join(map(spread, grpc_cells)) + " |",
        "| HTTP: `POST /v1/tasks`, then `GET /v1/tasks/{id}/events` | " + " | ".join(map(spread, http_cells)) + " |",
        "| extra on the HTTP path (HTTP minus gRPC, per round) | " + " | ".join(map(spread, extra)) + " |",
        "| HTTP / gRPC (per round) | " + " | ".join(map(ratio_cell, ratio)) + " |",
        "",
        f"Target: extra latency p50 at most {TARGET_EXTRA_P50_MS:g} ms. From the submit call: {verdict(extra[0])}; "
        f"from the submit's answer (the event stream's delivery): {verdict(extra[2])}.",
    ]


def verdict(extra_ms: Sequence[float]) -> str:
    value = median(extra_ms)
    return f"{'met' if value <= TARGET_EXTRA_P50_MS else 'not met'} ({value:.1f} ms)"


def idle_lines(rounds: Sequence[dict[str, Any]]) -> list[str]:
    idle = [r["idle"] for r in rounds]
    mib = 1 << 20

    def each(f: Callable[[dict[str, float]], float], digits: int = 0) -> str:
        return ", ".join(f"{f(i):.{digits}f}" for i in idle)

    return [
        "| figure | per round |",
        "|---|---|",
        f"| gateway RSS before the streams, MiB | {each(lambda i: i['rss_before_bytes'] / mib, 1)} |",
        f"| gateway RSS with the streams open, MiB | {each(lambda i: i['rss_open_bytes'] / mib, 1)} |",
        "| memory per open stream (RSS difference / N), KiB | "
        f"{each(lambda i: (i['rss_open_bytes'] - i['rss_before_bytes']) / i['streams'] / 1024, 1)} |",
        f"| streams open (their first update came), of N | {each(lambda i: i['opened'])} |",
        f"| open event streams the gateway reports (`aimesh_gateway_open_streams`) | "
        f"{each(lambda i: i['reported_open'])} |",
        f"| the gateway's open file descriptors, streams open | {each(lambda i: i['descriptors'])} |",
        f"| seconds to open all N | {each(lambda i: i['open_s'], 1)} |",
        f"| terminal updates delivered, of N | {each(lambda i: i['delivered'])} |",
        f"| of which SUCCEEDED | {each(lambda i: i['succeeded'])} |",
        f"| seconds from restarting the workers to the last terminal update | {each(lambda i: i['delivery_s'], 1)} |",
    ]


def report(rounds: Sequence[dict[str, Any]], args: argparse.Namespace) -> Section:
    streams = rounds[0]["idle"]["streams"]
    lines = [
        f"Latency, model `{args.latency_model}`, {args.gateway_tasks} sequential tasks per path after {args.warmup} "
        f"warm-up, the paths alternating; median of {len(rounds)} rounds (min-max), each round a fresh mesh. "
        "Milliseconds.",
        "",
        *latency_lines(rounds),
        "",
        f"Idle streams: N = {streams} event streams held open at once on the one gateway process, then their tasks "
        "run. One value per round.",
        "",
        *idle_lines(rounds),
    ]
    return Section(TITLE, METHOD, "\n".join(lines))
