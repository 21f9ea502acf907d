"""Large payloads by reference: 1 MiB tensor tasks through the mesh (uploaded to the object store, fetched and
verified by the worker, the 1 MiB output stored and downloaded) against the same payload sent to Triton directly,
in the same round on the same Triton."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence
from typing import Any

import numpy as np
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import InferInput

from aimesh.client import AsyncClient
from aimesh.v1 import result_pb2
from benchmarks import sections
from benchmarks.common import API_KEY, Section, bench_stack, closed_loop, log, median, spread, steady_rate

TITLE = sections.PAYLOADS
PAYLOAD_BYTES = 1 << 20
SMALL_BYTES = 1 << 10  # inline, for the mesh's own cost per task without the claim check
MODEL, INPUT, OUTPUT = "identity", "UINT8_1", "OUT_UINT8_1"
METHOD = (
    f"Each round starts a fresh mesh (two workers, the object store beside it). A task carries one {PAYLOAD_BYTES} "
    f"byte UINT8 tensor to the `{MODEL}` model, over the inline limit (256 KiB), so it goes by reference both ways. "
    "**Mesh**: the client library's `submit` uploads the tensor (`UploadInput`, 1 MiB chunks, SHA-256), ingest "
    "checks the reference and publishes the task; a worker fetches the object, verifies its digest, runs Triton, "
    "stores the 1 MiB output; the client follows `WatchTask` to the result and downloads the output "
    "(`DownloadOutput`, digest checked). **Direct**: a tritonclient grpc.aio client sends the same tensor to the "
    "same Triton and reads the output back. Both are closed loops of `concurrency` callers; throughput is the "
    "steady rate of completions (10th to 90th percentile of their times). The figure is mesh / direct, per round. "
    f"**Mesh, {SMALL_BYTES} bytes inline** runs the same loop with a small tensor that travels inside the records: "
    "the mesh's own cost per task, which the claim check adds to."
)
CONCURRENCY = (1, 8)


async def mesh_loop(stack: Any, payload: np.ndarray, tasks: int, concurrency: int) -> list[float]:
    async with AsyncClient(stack.ingest_address, stack.notifier_address, api_key=API_KEY, timeout_s=120) as client:

        async def one() -> None:
            task_id = await client.submit(MODEL, tensors={INPUT: payload})
            state = await client.result(task_id, timeout_s=120)
            if state.status != result_pb2.TASK_STATUS_SUCCEEDED:
                raise RuntimeError(f"task {task_id} ended {state.status}: {state.result.error}")
            if (await client.outputs(state))[OUTPUT].nbytes != payload.nbytes:
                raise RuntimeError(f"task {task_id}: the output is not the input")

        await one()  # warm-up: channels open, the model loaded
        return await closed_loop(one, total=tasks, concurrency=concurrency)


async def direct_loop(url: str, payload: np.ndarray, tasks: int, concurrency: int) -> list[float]:
    client = triton_aio.InferenceServerClient(url)
    tensor = InferInput(INPUT, list(payload.shape), "UINT8")
    tensor.set_data_from_numpy(payload)

    async def one() -> None:
        result = await client.infer(MODEL, [tensor], client_timeout=120)
        if result.as_numpy(OUTPUT).nbytes != payload.nbytes:
            raise RuntimeError("the output is not the input")

    try:
        await one()
        return await closed_loop(one, total=tasks, concurrency=concurrency)
    finally:
        await client.close()


def measure(tasks: int) -> dict[str, Any]:
    payload = np.frombuffer(np.random.default_rng(1).bytes(PAYLOAD_BYTES), dtype=np.uint8)
    small = payload[:SMALL_BYTES]
    found: dict[str, Any] = {}
    with bench_stack() as stack:
        for concurrency in CONCURRENCY:
            direct_rate = steady_rate(asyncio.run(direct_loop(stack.triton_urls[0], payload, tasks, concurrency)))
            mesh_rate = steady_rate(asyncio.run(mesh_loop(stack, payload, tasks, concurrency)))
            inline_rate = steady_rate(asyncio.run(mesh_loop(stack, small, tasks, concurrency)))
            log(
                f"  1 MiB by reference, concurrency {concurrency}: mesh {mesh_rate:.1f}/s, direct {direct_rate:.1f}/s; "
                f"mesh with {SMALL_BYTES} bytes inline {inline_rate:.1f}/s"
            )
            found[str(concurrency)] = {"mesh": mesh_rate, "direct": direct_rate, "inline": inline_rate}
    return found


def run_rounds(args: argparse.Namespace) -> list[dict[str, Any]]:
    rounds = []
    for i in range(args.rounds):
        rounds.append(measure(args.payload_tasks))
        log(f"payloads round {i + 1}/{args.rounds} done")
    return rounds


def report(rounds: Sequence[dict[str, Any]], args: argparse.Namespace) -> Section:
    lines = [
        f"{args.payload_tasks} tasks per point, median of {len(rounds)} rounds (min-max). Tasks per second.",
        "",
        f"| concurrency | mesh, by reference | direct Triton | mesh / direct | mesh, {SMALL_BYTES} bytes inline |",
        "|---|---|---|---|---|",
    ]
    for concurrency in CONCURRENCY:
        points = [r[str(concurrency)] for r in rounds]
        ratios = [p["mesh"] / p["direct"] for p in points]
        each = ", ".join(f"{r:.2f}" for r in ratios)
        lines.append(
            f"| {concurrency} | {spread([p['mesh'] for p in points])} | {spread([p['direct'] for p in points])} "
            f"| {median(ratios):.2f} ({each}) | {spread([p['inline'] for p in points])} |"
        )
    return Section(TITLE, METHOD, "\n".join(lines))
