"""The mesh on a three-broker cluster against the one-broker stack, in the same round: batched throughput at one
concurrency and light-load latency, each on a fresh mesh of each kind."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence
from typing import Any

from benchmarks import latency, sections, throughput
from benchmarks.common import Section, Workers, bench_stack, log, median, quantile, tasks_for

TITLE = sections.CLUSTER
METHOD = (
    "Each round starts a fresh mesh on the one-broker stack and one on the three-broker cluster "
    "(`AIMESH_STACK_BROKERS=3`: combined broker and controller nodes, every topic and the internal ones at "
    "replication factor 3 and `min.insync.replicas` 2; every producer `acks=all`, so each record, and each "
    "transaction marker and offset commit, waits for a second replica), all on this one machine. On each: the "
    "batched throughput of the `sleep` model at one concurrency (the throughput section's method: a burst of "
    "tasks once 2 new workers hold their partitions), then light-load latency (the latency section's method: "
    "sequential `sentiment` tasks through SubmitTask and WatchTask, alternating with direct Triton calls; "
    "overhead is the mesh's percentile minus the direct call's). The figures are three brokers over one, the "
    "median across rounds."
)
BROKERS = (1, 3)


def measure(brokers: int, args: argparse.Namespace) -> dict[str, Any]:
    concurrency = int(max(args.concurrency))
    tasks = tasks_for(concurrency, args.seconds, args.delay_ms)
    with bench_stack(brokers=brokers) as stack:
        # Latency first, on the stack's own workers; the throughput point then starts its own.
        timings = asyncio.run(latency.drive(stack, args.latency_model, args.latency_tasks, args.warmup))
        workers = Workers(stack)
        workers.stop()
        rate = throughput.mesh_rate(workers, concurrency, tasks, args.delay_ms, stack.settings.workers)
    log(f"  {brokers} broker(s): {rate:.1f} tasks/s at concurrency {concurrency}")
    return {"rate": rate, "mesh_ms": timings["mesh_ms"], "direct_ms": timings["direct_ms"]}


def run_rounds(args: argparse.Namespace) -> list[dict[int, dict[str, Any]]]:
    rounds = []
    for i in range(args.rounds):
        rounds.append({brokers: measure(brokers, args) for brokers in BROKERS})
        log(f"cluster round {i + 1}/{args.rounds} done")
    return rounds


def overhead(measured: dict[str, Any], q: float) -> float:
    return quantile(measured["mesh_ms"], q) - quantile(measured["direct_ms"], q)


def report(rounds: Sequence[dict[int, dict[str, Any]]], args: argparse.Namespace) -> Section:
    rows = [
        ("throughput, tasks/s", lambda m: m["rate"]),
        ("light-load latency p50, ms", lambda m: quantile(m["mesh_ms"], 0.5)),
        ("light-load latency p99, ms", lambda m: quantile(m["mesh_ms"], 0.99)),
        ("overhead over direct Triton p50, ms", lambda m: overhead(m, 0.5)),
        ("overhead over direct Triton p99, ms", lambda m: overhead(m, 0.99)),
    ]
    lines = [
        f"Throughput at concurrency {int(max(args.concurrency))} (`sleep`, `delay_ms` {args.delay_ms}); latency of "
        f"{args.latency_tasks} sequential `{args.latency_model}` tasks after {args.warmup} warm-up; "
        f"{len(rounds)} round(s).",
        "",
        "| figure | one broker | three brokers | three / one (per round) |",
        "|---|---|---|---|",
    ]
    for name, figure in rows:
        one = [figure(r[1]) for r in rounds]
        three = [figure(r[3]) for r in rounds]
        ratios = [t / o for t, o in zip(three, one, strict=True) if o]
        cell = f"{median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})" if ratios else "-"
        lines.append(f"| {name} | {median(one):.1f} | {median(three):.1f} | {cell} |")
    return Section(TITLE, METHOD, "\n".join(lines))
