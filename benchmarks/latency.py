"""End-to-end latency at light load, and the cost of tracing.

For each configuration (tracing off, tracing on with OTLP/gRPC export) a fresh mesh is started, warmed up, then
driven by one client that submits a task and waits for its terminal update on a WatchTask stream, alternating with
a direct tritonclient call on the same model against the same Triton server. Reported per configuration: p50 and
p99 of both, the mesh's overhead (mesh minus direct), and the tracing-on / tracing-off ratio; the medians across
rounds are the figures. The latency distribution (all rounds pooled) goes to ``latency.png``.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from aimesh.devstack.otlp import OtlpReceiver
from benchmarks.common import (
    DirectTriton,
    MeshClient,
    Section,
    bench_stack,
    log,
    median,
    new_figure,
    plain_log_ticks,
    quantile,
    save_plot,
    sequential,
)

TITLE = "End-to-end latency and the cost of tracing"
METHOD = (
    "For each configuration (tracing off; tracing on, exported over OTLP/gRPC to an in-process receiver) a "
    "fresh mesh is started, then one client submits a task (`SubmitTask`) and follows its `WatchTask` stream to "
    "the terminal update, alternating with a direct tritonclient grpc.aio call on the same model against the "
    "same Triton. Overhead is the mesh's percentile minus the direct call's, per round. The plot is the "
    "cumulative distribution of every sample, all rounds pooled."
)
CONFIGURATIONS = (("off", "tracing off"), ("on", "tracing on (OTLP/gRPC export)"))
TARGET_P50_MS, TARGET_P99_MS = 10.0, 30.0


async def drive(stack: Any, model: str, tasks: int, warmup: int) -> dict[str, Any]:
    async with MeshClient(stack) as mesh, DirectTriton(stack.triton_url) as direct:
        mesh_ms, direct_ms = await sequential([lambda: mesh.run(model), lambda: direct.run(model)], tasks, warmup)
    return {"mesh_ms": mesh_ms, "direct_ms": direct_ms, "stages": [list(s) for s in mesh.stages[-tasks:]]}


def measure(tracing: bool, args: argparse.Namespace) -> dict[str, Any]:
    receiver = OtlpReceiver() if tracing else None
    env: dict[str, str] = {}
    if receiver:
        receiver.start()
        env = {
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
        }
    try:
        with bench_stack(extra_env=env) as stack:
            return asyncio.run(drive(stack, args.latency_model, args.latency_tasks, args.warmup))
    finally:
        if receiver:
            receiver.stop()


def run_rounds(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each round: a fresh mesh per configuration."""
    rounds = []
    for i in range(args.rounds):
        rounds.append({key: measure(key == "on", args) for key, _ in CONFIGURATIONS})
        log(f"latency round {i + 1}/{args.rounds} done")
    return rounds


def summarize(rounds: Sequence[dict[str, Any]], key: str) -> dict[str, float]:
    def across(f: Any) -> float:
        return median([f(r[key]) for r in rounds])

    return {
        "mesh_p50": across(lambda r: quantile(r["mesh_ms"], 0.5)),
        "mesh_p99": across(lambda r: quantile(r["mesh_ms"], 0.99)),
        "direct_p50": across(lambda r: quantile(r["direct_ms"], 0.5)),
        "direct_p99": across(lambda r: quantile(r["direct_ms"], 0.99)),
        "overhead_p50": across(lambda r: quantile(r["mesh_ms"], 0.5) - quantile(r["direct_ms"], 0.5)),
        "overhead_p99": across(lambda r: quantile(r["mesh_ms"], 0.99) - quantile(r["direct_ms"], 0.99)),
    }


# Where a light-load task's time goes, from the timings the worker puts in each result (ingest stamps the task
# when it accepts it; the worker notes when it started the task, how long the Triton call took, and when the result
# was produced) and the end-to-end time the client measured. One clock: every process runs on this machine.
STAGES = (
    "accepted by ingest until a worker starts it (ingest's produce and acknowledgement, the worker's fetch)",
    "the Triton call, as the worker timed it",
    "in the worker around that call (decode, micro-batching, the result's encoding)",
    "result produced until the client has it (the transaction's commit, read_committed visibility, the notifier, "
    "gRPC), plus the client's call to ingest",
)


def stage_values(stages: Sequence[float]) -> tuple[float, float, float, float]:
    """One task's ``Stages`` as the four STAGES, in milliseconds."""
    end_to_end, queue_wait, inference, total = stages
    return queue_wait, inference, total - queue_wait - inference, end_to_end - total


def breakdown(rounds: Sequence[dict[str, Any]]) -> list[str]:
    lines = [
        "Where the time goes (tracing off; per stage the median across rounds of each round's p50, ms; the "
        "stages' p50s need not add up to the end-to-end p50):",
        "",
        "| stage | p50 |",
        "|---|---|",
    ]
    for index, name in enumerate(STAGES):
        value = median([quantile([stage_values(s)[index] for s in r["off"]["stages"]], 0.5) for r in rounds])
        lines.append(f"| {name} | {value:.1f} |")
    return lines


def report(rounds: Sequence[dict[str, Any]], args: argparse.Namespace, plots: Path) -> Section:
    summary = {key: summarize(rounds, key) for key, _ in CONFIGURATIONS}
    lines = [
        f"Light-load latency, model `{args.latency_model}`, {args.latency_tasks} sequential tasks after "
        f"{args.warmup} warm-up, median of {len(rounds)} rounds (each round a fresh mesh). Milliseconds.",
        "",
        "| configuration | mesh p50 | mesh p99 | direct Triton p50 | direct Triton p99 | overhead p50 | overhead p99 |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, name in CONFIGURATIONS:
        s = summary[key]
        lines.append(
            f"| {name} | {s['mesh_p50']:.1f} | {s['mesh_p99']:.1f} | {s['direct_p50']:.1f} | {s['direct_p99']:.1f} "
            f"| {s['overhead_p50']:.1f} | {s['overhead_p99']:.1f} |"
        )
    off, on = summary["off"], summary["on"]
    met = off["overhead_p50"] < TARGET_P50_MS and off["overhead_p99"] < TARGET_P99_MS
    lines += [
        "",
        f"Ratios: mesh p50 / direct p50 = {off['mesh_p50'] / off['direct_p50']:.1f} (tracing off); "
        f"tracing on / tracing off, mesh p50 = {on['mesh_p50'] / off['mesh_p50']:.2f}, "
        f"mesh p99 = {on['mesh_p99'] / off['mesh_p99']:.2f}.",
        "",
        f"Target (tracing off): overhead p50 < {TARGET_P50_MS:g} ms and p99 < {TARGET_P99_MS:g} ms: "
        f"{'met' if met else 'not met'}.",
        "",
        *breakdown(rounds),
    ]

    figure, axes = new_figure()
    for key, name in CONFIGURATIONS:
        for series, path, color in (("mesh_ms", "mesh", "C0"), ("direct_ms", "direct Triton", "C1")):
            values = np.sort(np.concatenate([r[key][series] for r in rounds]))
            fraction = np.arange(1, len(values) + 1) / len(values)
            style = "-" if key == "off" else "--"
            axes.step(values, fraction, style, color=color, where="post", label=f"{path}, {name}")
    axes.set_xscale("log")
    plain_log_ticks(axes.xaxis)
    axes.set_xlabel("end-to-end latency, ms (log scale)")
    axes.set_ylabel("fraction of tasks at or below")
    axes.set_title(f"model {args.latency_model}, light load, {len(rounds)} rounds pooled")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="center")
    save_plot(figure, plots / "latency.png")

    return Section(TITLE, METHOD, "\n".join(lines), "latency.png")
