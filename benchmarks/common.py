"""What every benchmark shares: a mesh on free ports and the workers it runs, the task and result plumbing,
the closed-loop load generator, the statistics and the report.

Every figure is a ratio of two measurements made in the same round on the same machine; a round is repeated
``--rounds`` times and the median across rounds is quoted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import platform
import secrets
import shutil
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import numpy as np
import tritonclient.grpc.aio as triton_aio
from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, TopicPartition
from confluent_kafka.admin import AdminClient
from tritonclient.grpc import InferInput

from aimesh import events
from aimesh.devstack.stack import Stack, StackSettings
from aimesh.kafka import fetch
from aimesh.v1 import ingest_pb2, ingest_pb2_grpc, notifier_pb2, notifier_pb2_grpc, result_pb2, task_pb2

ROOT = Path(__file__).resolve().parents[1]
TEXT = "The release went smoothly and everyone was pleased."
SLEEP_MODEL = "sleep"
# What Triton can run at once of the sleep model: instances x max_batch_size (models/sleep/config.pbtxt).
SLEEP_PARALLELISM = 2 * 64
SUBMIT_BATCH = 1000  # tasks per SubmitTasks call: ingest's default AIMESH_MAX_BATCH_TASKS

# The mesh runs with authentication on, as deployed: one API key of the benchmark's own, known to ingest and the
# notifier by its hash (servers without auth ignore both the variables and the metadata).
API_KEY = "aimesh_" + secrets.token_urlsafe(32)
AUTH_ENV = {"AIMESH_AUTH": "on", "AIMESH_API_KEYS": f"bench:{hashlib.sha256(API_KEY.encode()).hexdigest()}"}
AUTH = (("authorization", f"Bearer {API_KEY}"),)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- statistics ------------------------------------------------------------------------------------------------
def quantile(values: Sequence[float], q: float) -> float:
    return float(np.quantile(np.asarray(values, dtype=float), q))


def steady_rate(completions: Sequence[float], trim: float = 0.1) -> float:
    """Completions per second between the ``trim`` and ``1 - trim`` quantiles of their times: the steady state,
    without the ramp-up (first batches, a consumer group forming) and the tail (the last, partial batches)."""
    times = sorted(completions)
    if len(times) < 2:
        raise ValueError("a rate needs at least two completions")
    first, last = int(trim * (len(times) - 1)), int((1 - trim) * (len(times) - 1))
    if last <= first or times[last] <= times[first]:
        first, last = 0, len(times) - 1
    return (last - first) / (times[last] - times[first])


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def median_ratio(numerators: Sequence[float], denominators: Sequence[float]) -> float:
    """The median over rounds of each round's own ratio (never a ratio of medians from different rounds)."""
    return median([n / d for n, d in zip(numerators, denominators, strict=True)])


def spread(values: Sequence[float]) -> str:
    """``median (min-max)`` of per-round values, for a table cell."""
    return f"{median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def tasks_for(concurrency: int, seconds: float, delay_ms: int, least: int = 20) -> int:
    """How many sleep tasks keep ``concurrency`` busy for about ``seconds`` at Triton's best rate."""
    best_rate = min(concurrency, SLEEP_PARALLELISM) / (delay_ms / 1000)
    return max(least, int(best_rate * seconds))


# --- the mesh --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def bench_stack(
    *, workers: int = 2, brokers: int = 1, extra_env: Mapping[str, str] | None = None, **overrides: object
) -> Iterator[Stack]:
    """A fresh mesh on free ports (every port, metrics included, so it runs beside a developer's stack);
    ``overrides`` sets other StackSettings fields (``ingest_replicas``, ...)."""
    settings = StackSettings.on_free_ports(
        Path(tempfile.mkdtemp(prefix="aimesh-bench-")), workers=workers, brokers=brokers, **overrides
    )
    # Admission control off: the benchmarks prefill tasks that per-run consumer groups read, so the workers'
    # group never commits and ingest would see an ever-growing backlog that nothing drains.
    env = {"AIMESH_LOG_LEVEL": "WARNING", "AIMESH_ADMISSION_MAX_WAIT_S": "0", **AUTH_ENV, **(extra_env or {})}
    log(f"starting a mesh in {settings.run_dir}")
    with Stack(settings, extra_env=env) as stack:
        yield stack
    shutil.rmtree(settings.run_dir, ignore_errors=True)  # kept, with its logs, when the round failed


def sleep_parameters(delay_ms: int) -> dict[str, str]:
    return {"delay_ms": str(delay_ms)}


class Workers:
    """The mesh's worker processes, restarted per measurement with their own consumer group and in-flight limit.

    A measurement's group gets its committed offsets set to where its tasks start, so it runs exactly the tasks
    submitted after ``mark()``: a backlog, as after a burst, with no consumer-group history in the way.
    """

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.topic = stack.topics.tasks_topic

    def stop(self) -> None:
        for name in [n for n in self.stack.services if n.startswith("worker-")]:
            self.stack.services.pop(name).stop(timeout_s=40)

    def mark(self) -> list[TopicPartition]:
        """The tasks topic's end offsets now: where the next measurement's tasks begin."""
        return end_offsets(self.stack.kafka_bootstrap, self.topic)

    def start_group_at(self, group: str, offsets: list[TopicPartition]) -> None:
        """Commit ``offsets`` for a new consumer group before any member joins it."""
        admin = AdminClient({"bootstrap.servers": self.stack.kafka_bootstrap})
        request = [ConsumerGroupTopicPartitions(group, offsets)]
        for future in admin.alter_consumer_group_offsets(request).values():
            future.result(timeout=30)

    def start(self, count: int, in_flight: int, group: str, guarantee: str = "exactly_once") -> None:
        for i in range(count):
            self.stack.start_worker(
                i,
                {
                    "AIMESH_WORKER_GROUP": group,
                    "AIMESH_MAX_IN_FLIGHT": str(in_flight),
                    "AIMESH_PROCESSING_GUARANTEE": guarantee,
                },
            )

    def when_stable(self, count: int, group: str) -> Future[float]:
        """A future that resolves to the time (perf_counter) the group had ``count`` members with partitions."""

        def wait() -> float:
            self.stack.wait_workers(count, group=group)
            return time.perf_counter()

        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="group-watch")
        try:
            return executor.submit(wait)
        finally:
            executor.shutdown(wait=False)  # the thread ends with its one job


def end_offsets(bootstrap: str, topic: str) -> list[TopicPartition]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-offsets-{uuid.uuid4()}"})
    try:
        partitions = consumer.list_topics(topic, timeout=30).topics[topic].partitions
        return [
            TopicPartition(topic, p, consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=30)[1])
            for p in sorted(partitions)
        ]
    finally:
        consumer.close()


class ResultReader:
    """Reads the results topic (read_committed, from its end at creation) on a thread and records when each
    task's terminal result arrived, as a client reading the topic sees it. It records every task's, not only the
    awaited ones': workers already running may finish a task before its submit returns and ``expect`` names it."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"bench-results-{uuid.uuid4()}",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
                "fetch.wait.max.ms": 10,
                "socket.nagle.disable": True,
            }
        )
        self._consumer.assign(end_offsets(bootstrap, topic))
        self._lock = threading.Lock()
        self._awaited: set[str] = set()
        self._awaited_arrived = 0
        self.arrivals: dict[str, float] = {}
        self.inference_s: dict[str, float] = {}  # the Triton call as the worker timed it (Timings.inference)
        self.appended: dict[str, float] = {}  # the broker's append time (LogAppendTime, else producer's), seconds
        self.statuses: dict[str, int] = {}
        self._done = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="result-reader", daemon=True)
        self._thread.start()

    def expect(self, task_ids: Sequence[str]) -> None:
        with self._lock:
            self._awaited.update(task_ids)
            self._awaited_arrived = sum(1 for t in self._awaited if t in self.arrivals)
            self._settle()

    def _settle(self) -> None:
        """Set or clear ``_done``: whether every awaited task has its result. With ``_lock`` held."""
        if self._awaited and self._awaited_arrived >= len(self._awaited):
            self._done.set()
        else:
            self._done.clear()

    def _run(self) -> None:
        while not self._stop.is_set():
            for message in fetch(self._consumer, 1000, 0.05):  # returns on the first record: exact arrival
                if message.error():
                    continue
                now = time.perf_counter()
                result = result_pb2.AIResultEvent.FromString(message.value())
                if not events.is_terminal(result.status):
                    continue
                with self._lock:
                    if result.task_id not in self.arrivals:
                        self.arrivals[result.task_id] = now
                        self.appended[result.task_id] = message.timestamp()[1] / 1000
                        self.inference_s[result.task_id] = result.timings.inference.ToTimedelta().total_seconds()
                        self.statuses[result.task_id] = result.status
                        self._awaited_arrived += result.task_id in self._awaited
                        self._settle()

    def wait(self, timeout_s: float) -> list[float]:
        """Arrival times of every awaited task's terminal result; raise if a task failed or did not finish."""
        if not self._done.wait(timeout_s):
            raise TimeoutError(f"{self._awaited_arrived} of {len(self._awaited)} results arrived in {timeout_s:.0f}s")
        with self._lock:
            awaited = list(self._awaited)
        failed = [t for t in awaited if self.statuses[t] != result_pb2.TASK_STATUS_SUCCEEDED]
        if failed:
            raise RuntimeError(f"{len(failed)} of {len(awaited)} tasks did not succeed")
        return [self.arrivals[t] for t in awaited]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._consumer.close()

    def __enter__(self) -> ResultReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# --- clients ---------------------------------------------------------------------------------------------------
def submit_request(model: str, parameters: Mapping[str, str] | None = None) -> ingest_pb2.SubmitTaskRequest:
    return ingest_pb2.SubmitTaskRequest(
        model_name=model, input=task_pb2.TaskInput(text=TEXT), parameters=dict(parameters or {})
    )


async def prefill(stack: Stack, count: int, parameters: Mapping[str, str]) -> list[str]:
    """Submit ``count`` sleep tasks through ingest's SubmitTasks; return their ids."""
    task_ids: list[str] = []
    async with grpc.aio.insecure_channel(stack.ingest_address) as channel:
        ingest = ingest_pb2_grpc.IngestServiceStub(channel)
        for start in range(0, count, SUBMIT_BATCH):
            tasks = [submit_request(SLEEP_MODEL, parameters) for _ in range(min(SUBMIT_BATCH, count - start))]
            reply = await ingest.SubmitTasks(ingest_pb2.SubmitTasksRequest(tasks=tasks), timeout=60, metadata=AUTH)
            task_ids += [t.task_id for t in reply.tasks]
    return task_ids


class Stages(NamedTuple):
    end_to_end_ms: float
    queue_wait_ms: float
    inference_ms: float
    total_ms: float


@dataclass
class MeshClient:
    """One client of the mesh: submit a task, follow its WatchTask stream to the terminal update."""

    stack: Stack
    _channels: list[grpc.aio.Channel] = field(default_factory=list)
    #: Per finished task, milliseconds: the end-to-end time, and the worker's timings from its result (queue
    #: wait: from ingest's stamp until a worker started it; inference: the Triton call; total: from that stamp
    #: until the result was produced).
    stages: list[Stages] = field(default_factory=list)

    async def __aenter__(self) -> MeshClient:
        self._channels = [
            grpc.aio.insecure_channel(self.stack.ingest_address),
            grpc.aio.insecure_channel(self.stack.notifier_address),
        ]
        self.ingest = ingest_pb2_grpc.IngestServiceStub(self._channels[0])
        self.notifier = notifier_pb2_grpc.NotifierServiceStub(self._channels[1])
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for channel in self._channels:
            await channel.close()

    async def run(self, model: str, parameters: Mapping[str, str] | None = None) -> float:
        """Milliseconds from submitting a task to its terminal update on a WatchTask stream."""
        started = time.perf_counter()
        reply = await self.ingest.SubmitTask(submit_request(model, parameters), timeout=30, metadata=AUTH)
        watch = notifier_pb2.WatchTaskRequest(task_id=reply.task_id)
        timings = None
        async for update in self.notifier.WatchTask(watch, timeout=30, metadata=AUTH):
            if events.is_terminal(update.state.status):
                if update.state.status != result_pb2.TASK_STATUS_SUCCEEDED:
                    raise RuntimeError(f"task {reply.task_id} ended {update.state.status}")
                timings = update.state.result.timings
        elapsed_ms = (time.perf_counter() - started) * 1000
        if timings is not None:
            self.stages.append(
                Stages(
                    elapsed_ms,
                    timings.queue_wait.ToTimedelta().total_seconds() * 1000,
                    timings.inference.ToTimedelta().total_seconds() * 1000,
                    timings.total.ToTimedelta().total_seconds() * 1000,
                )
            )
        return elapsed_ms


class DirectTriton:
    """A tritonclient grpc.aio client calling a model with one row per request, as a mesh task does."""

    def __init__(self, url: str) -> None:
        self.client = triton_aio.InferenceServerClient(url)
        data = np.array([[TEXT.encode()]], dtype=np.object_)
        self.tensor = InferInput("TEXT", [1, 1], "BYTES")
        self.tensor.set_data_from_numpy(data)

    async def __aenter__(self) -> DirectTriton:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.client.close()

    async def run(self, model: str, parameters: Mapping[str, str] | None = None) -> float:
        """Milliseconds of one inference."""
        started = time.perf_counter()
        await self.client.infer(model, [self.tensor], parameters=dict(parameters or {}), client_timeout=60)
        return (time.perf_counter() - started) * 1000


async def closed_loop(call: Callable[[], Awaitable[object]], *, total: int, concurrency: int) -> list[float]:
    """``concurrency`` callers, each issuing its next call when the last returns, ``total`` calls in all; the
    completion time (perf_counter) of each."""
    completions: list[float] = []
    issued = 0

    async def caller() -> None:
        nonlocal issued
        while issued < total:
            issued += 1
            await call()
            completions.append(time.perf_counter())

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return completions


async def sequential(calls: Sequence[Callable[[], Awaitable[float]]], count: int, warmup: int) -> list[list[float]]:
    """Run each of ``calls`` in turn ``warmup + count`` times (interleaved, so drift hits all alike); the
    latencies after warm-up, one list per call."""
    samples: list[list[float]] = [[] for _ in calls]
    for i in range(warmup + count):
        for latencies, call in zip(samples, calls, strict=True):
            value = await call()
            if i >= warmup:
                latencies.append(value)
    return samples


# --- the report ------------------------------------------------------------------------------------------------
def machine_facts() -> str:
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"`nproc` = {os.cpu_count()}, CPU: {cpu}, Python {platform.python_version()}"


@dataclass
class Section:
    """One benchmark's part of docs/benchmarks.md: its heading, what and how, and the measured table."""

    title: str
    method: str
    results: str
    plot: str | None = None

    def render(self, command: str, when: str) -> str:
        parts = [f"## {self.title}", self.method, f"Command: `{command}`  \nMachine: {machine_facts()}; run {when}."]
        parts.append(self.results)
        if self.plot:
            parts.append(f"![{self.title}]({self.plot})")
        return "\n\n".join(parts) + "\n"


PREAMBLE = (
    "# Benchmarks\n\n"
    "Made by `make bench` (`benchmarks/run.py`), everything on loopback on one machine. Absolute numbers depend on "
    "that machine and on what else ran there; every figure quoted is a ratio of two measurements made in the same "
    "round (a fresh mesh) of the same run, and the median over the rounds. Each section names the command and the "
    "machine that made it.\n"
)


def split_sections(markdown: str) -> dict[str, str]:
    """The ``## `` sections of a document by title, each with its heading."""
    sections: dict[str, str] = {}
    title = None
    for line in markdown.splitlines(keepends=True):
        if line.startswith("## "):
            title = line[3:].strip()
            sections[title] = ""
        if title is not None:
            sections[title] += line
    return sections


def write_markdown(path: Path, sections: Sequence[Section], command: str, order: Sequence[str]) -> None:
    """Replace the sections measured now, keep the others from the file as they are, in ``order`` (titles not in
    it go last)."""
    old = split_sections(path.read_text()) if path.exists() else {}
    when = time.strftime("%Y-%m-%d %H:%M %Z")
    new = {s.title: s.render(command, when) for s in sections}
    merged = {**old, **new}
    titles = [t for t in order if t in merged] + [t for t in merged if t not in order]
    path.write_text(PREAMBLE + "\n" + "\n".join(merged[t].rstrip("\n") + "\n" for t in titles))


def new_figure(width: float = 7.0, height: float = 4.5) -> tuple[Any, Any]:
    """A matplotlib figure and axes drawn off-screen (Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot.subplots(figsize=(width, height))


def plain_log_ticks(axis: Any, *, minor: bool = True) -> None:
    """Label a log axis 2, 5, 10, 20 ... instead of powers."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    if minor:
        axis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(FuncFormatter(lambda value, _: f"{value:g}") if minor else NullFormatter())


def save_plot(figure: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    from matplotlib import pyplot

    pyplot.close(figure)
    log(f"wrote {path}")
