"""Time to first token: a streaming task through the mesh against a direct Triton stream and Kafka's floor.

For each round and each processing guarantee of the workers a fresh mesh is started, then one client submits a
`generate` task (`SubmitTask`) and times the arrival of its first partial update on the results topic
(read_committed, as a reader of the topic sees it), then waits for its terminal result before the next; alternating
with a direct tritonclient grpc.aio `stream_infer` on the same model and Triton, timed to its first response, and
with the bare at-least-once Kafka chain of ``kafka_floor`` (partial updates carry no transaction). Reported: p50 and
p99 of each, the mesh's overhead, and its ratio to the chain's p50 (per round, then the median across rounds).
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import numpy as np
import tritonclient.grpc.aio as triton_aio
from confluent_kafka import Consumer
from tritonclient.grpc import InferInput

from aimesh import events
from aimesh.devstack.stack import Stack
from aimesh.kafka import fetch
from aimesh.v1 import ingest_pb2, ingest_pb2_grpc, result_pb2
from benchmarks import sections
from benchmarks.common import (
    AUTH,
    MeshClient,
    Section,
    bench_stack,
    end_offsets,
    log,
    sequential,
    submit_request,
)
from benchmarks.kafka_floor import floor_chains, sample_records
from benchmarks.latency import (
    Column,
    Configuration,
    Target,
    latencies,
    median_of,
    overhead_target,
    ratio_of,
    table,
    targets,
)

TITLE = sections.TTFT
METHOD = (
    "For each round a fresh mesh is started; one client submits a `generate` task (`SubmitTask`, "
    "`max_tokens` 16, a fixed seed, no token delay) and times the arrival of its first partial update on the "
    "results topic (a read_committed reader), waiting for the terminal result before the next task; alternating "
    "with a direct tritonclient grpc.aio `stream_infer` on the same model and Triton, timed to its first "
    "response, and with the bare at-least-once Kafka chain (`benchmarks/kafka_floor.py`, described under the "
    "latency section; partial updates carry no transaction in either mode), with the sizes of this model's task "
    "and terminal result records. A fresh mesh per processing guarantee of the workers (`exactly_once`, "
    "`at_least_once`). Overhead is the mesh's percentile minus the direct stream's, per round; its ratio to the "
    "chain's p50 is taken per round, then the median across rounds."
)
MODEL = "generate"
# A prompt and seed the trigram model continues for all 16 tokens (some prompts it ends at once: no first token).
PROMPT = "The worker"
PARAMETERS = {"max_tokens": "16", "seed": "1", "token_delay_ms": "0"}


class PartialReader:
    """Reads the results topic from its end on a thread; resolves each awaited task's futures: the first partial
    update's arrival (perf_counter) and the terminal result's."""

    def __init__(self, stack: Stack, loop: asyncio.AbstractEventLoop) -> None:
        self._consumer = Consumer(
            {
                "bootstrap.servers": stack.kafka_bootstrap,
                "group.id": f"bench-ttft-{uuid.uuid4()}",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
                "fetch.wait.max.ms": 10,
                "socket.nagle.disable": True,
            }
        )
        self._consumer.assign(end_offsets(stack.kafka_bootstrap, stack.topics.results_topic))
        self._loop = loop
        self._lock = threading.Lock()
        self._awaited: dict[str, tuple[asyncio.Future[float], asyncio.Future[int]]] = {}
        self._early: dict[str, list[tuple[str, Any]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ttft-reader", daemon=True)
        self._thread.start()

    def expect(self, task_id: str) -> tuple[asyncio.Future[float], asyncio.Future[int]]:
        """The task's futures; called after SubmitTask answered, by when its first updates may have arrived already."""
        first: asyncio.Future[float] = self._loop.create_future()
        terminal: asyncio.Future[int] = self._loop.create_future()
        with self._lock:
            self._awaited[task_id] = (first, terminal)
            early = self._early.pop(task_id, [])
        for kind, value in early:
            _settle(first if kind == "first" else terminal, value)
        return first, terminal

    def _run(self) -> None:
        while not self._stop.is_set():
            for message in fetch(self._consumer, 1000, 0.05):
                if message.error():
                    continue
                now = time.perf_counter()
                result = result_pb2.AIResultEvent.FromString(message.value() or b"")
                updates: list[tuple[str, Any]] = []
                if result.partial:
                    updates.append(("first", now))
                elif events.is_terminal(result.status):
                    updates += [("first", float("nan")), ("terminal", int(result.status))]  # NaN: no first token
                with self._lock:
                    futures = self._awaited.get(result.task_id)
                    if futures is None:  # arrived before SubmitTask's answer did: kept for expect()
                        self._early.setdefault(result.task_id, []).extend(updates)
                        continue
                for kind, value in updates:
                    self._loop.call_soon_threadsafe(_settle, futures[0] if kind == "first" else futures[1], value)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._consumer.close()


def _settle(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def request() -> ingest_pb2.SubmitTaskRequest:
    submit = submit_request(MODEL, PARAMETERS)
    submit.input.text = PROMPT
    return submit


async def mesh_ttft(ingest: ingest_pb2_grpc.IngestServiceStub, reader: PartialReader) -> float:
    started = time.perf_counter()
    reply = await ingest.SubmitTask(request(), timeout=30, metadata=AUTH)
    first, terminal = reader.expect(reply.task_id)
    first_at = await asyncio.wait_for(first, 60)
    status = await asyncio.wait_for(terminal, 60)
    if status != result_pb2.TASK_STATUS_SUCCEEDED or first_at != first_at:  # NaN: no partial came first
        raise RuntimeError(f"task {reply.task_id} ended {status} without a partial update before it")
    return (first_at - started) * 1000


async def direct_ttft(client: triton_aio.InferenceServerClient) -> float:
    data = np.array([[PROMPT.encode()]], dtype=np.object_)
    tensor = InferInput("TEXT", [1, 1], "BYTES")
    tensor.set_data_from_numpy(data)
    done = asyncio.Event()

    async def requests() -> AsyncIterator[dict[str, Any]]:
        yield {"model_name": MODEL, "inputs": [tensor], "parameters": dict(PARAMETERS)}
        await done.wait()

    started = time.perf_counter()
    first: float | None = None
    try:
        async for result, error in client.stream_infer(requests(), stream_timeout=60):
            if error is not None:
                raise RuntimeError(f"direct stream failed: {error}")
            if first is None:
                first = time.perf_counter()
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
    finally:
        done.set()
    assert first is not None
    return (first - started) * 1000


CONFIGURATIONS = (
    Configuration("exactly_once", "`exactly_once`", "exactly_once", False),
    Configuration("at_least_once", "`at_least_once`", "at_least_once", False),
)
COLUMNS: dict[str, Column] = {
    **latencies("direct `stream_infer`"),
    "at-least-once chain p50": median_of("at_least_once_ms", 0.5),
    "overhead p50 / at-least-once chain p50": ratio_of("overhead_ms", 0.5, "at_least_once_ms"),
}
# Partial updates carry no transaction: in both modes the floor is the at-least-once chain.
TARGETS: tuple[Target, ...] = tuple(overhead_target(c, "at_least_once", 0.5, 1.3) for c in CONFIGURATIONS)


async def drive(stack: Stack, tasks: int, warmup: int) -> dict[str, list[float]]:
    assert stack.triton is not None
    reader = PartialReader(stack, asyncio.get_running_loop())
    client = triton_aio.InferenceServerClient(stack.triton.grpc_url)
    try:
        async with MeshClient(stack) as mesh:
            records = await sample_records(mesh, request())
            async with floor_chains(stack, records, ("at_least_once",)) as chains:
                calls = [
                    lambda: mesh_ttft(mesh.ingest, reader),
                    lambda: direct_ttft(client),
                    chains["at_least_once"].run,
                ]
                mesh_ms, direct_ms, chain_ms = await sequential(calls, tasks, warmup)
    finally:
        await client.close()
        await asyncio.to_thread(reader.close)
    return {"mesh_ms": mesh_ms, "direct_ms": direct_ms, "at_least_once_ms": chain_ms}


def measure(configuration: Configuration, args: argparse.Namespace) -> dict[str, list[float]]:
    with bench_stack(extra_env={"AIMESH_PROCESSING_GUARANTEE": configuration.guarantee}) as stack:
        return asyncio.run(drive(stack, args.ttft_tasks, args.warmup))


def run_rounds(args: argparse.Namespace) -> list[dict[str, dict[str, list[float]]]]:
    """Each round: a fresh mesh per configuration."""
    rounds = []
    for i in range(args.rounds):
        rounds.append({c.key: measure(c, args) for c in CONFIGURATIONS})
        log(f"ttft round {i + 1}/{args.rounds} done")
    return rounds


def report(rounds: Sequence[dict[str, Any]], args: argparse.Namespace) -> Section:
    lines = [
        f"Time to first token, model `{MODEL}`, {args.ttft_tasks} sequential tasks after {args.warmup} warm-up, "
        f"median of {len(rounds)} rounds (each round a fresh mesh per processing guarantee). Milliseconds; the "
        "mesh: SubmitTask to the first partial update on the results topic; direct: tritonclient `stream_infer` "
        "to its first response.",
        "",
        *table(rounds, COLUMNS, CONFIGURATIONS),
        "",
        "Targets (each ratio per round, then the median across rounds):",
        "",
        *targets(rounds, TARGETS),
    ]
    return Section(TITLE, METHOD, "\n".join(lines))
