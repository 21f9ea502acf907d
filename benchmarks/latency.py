"""End-to-end latency at light load, against Kafka's own floor, and the cost of tracing.

For each configuration (``exactly_once`` with tracing off and on, ``at_least_once`` with tracing off) a fresh mesh
is started, then driven by one client that submits a task and waits for its terminal update on a WatchTask stream,
alternating with a direct tritonclient call on the same model against the same Triton server and with the two bare
Kafka chains of ``kafka_floor`` on the same broker. Reported per configuration: p50 and p99 of each, the mesh's
overhead (mesh minus direct) and its ratio to each chain, and issue 15's targets as ratios; each ratio is taken per
round and the median across rounds quoted. The latency distribution (all rounds pooled) goes to ``latency.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from aimesh.devstack.otlp import receiver_process
from benchmarks import sections
from benchmarks.common import (
    DirectTriton,
    MeshClient,
    Section,
    bench_stack,
    log,
    median,
    median_ratio,
    new_figure,
    plain_log_ticks,
    quantile,
    save_plot,
    sequential,
    submit_request,
)
from benchmarks.grpc_floor import GrpcPath, floor_server
from benchmarks.kafka_floor import GUARANTEES, Guarantee, floor_chains, sample_records

TITLE = sections.LATENCY
METHOD = (
    "For each configuration (the workers' processing guarantee `exactly_once` with tracing off, and with tracing "
    "on, exported over OTLP/gRPC to a receiver in a process of its own, as a collector would be; `at_least_once` "
    "with tracing off) a fresh mesh is started, then one client submits a task (`SubmitTask`) and follows its "
    "`WatchTask` stream to the terminal update, alternating with a direct tritonclient grpc.aio call on the same "
    "model against the same Triton and with the two bare Kafka chains under the mesh (`benchmarks/kafka_floor.py`),"
    " one record at a time. Each chain runs on the mesh's broker, on topics of its own with the partitions and "
    "replication of the mesh's tasks and results topics, with the byte sizes of a task record and a result record "
    "of the same model, and with the services' client settings: an idempotent producer publishes the task record "
    "and waits for its acknowledgement; a group consumer (read_committed, on a thread of its own) receives it and "
    "publishes the result record, either in a transaction that also commits the consumer's offset (`exactly_once`: "
    "`send_offsets_to_transaction`, `commit_transaction`) or with an idempotent producer, waiting for the "
    "acknowledgement before committing the offset synchronously (`at_least_once`); a read_committed consumer on "
    "another thread receives it. A chain's time runs from the task record's produce to the result's arrival. "
    "Overhead is the mesh's percentile minus the direct call's, per round; every ratio is taken per round, then the"
    " median across rounds. The plot is the cumulative distribution of every sample, all rounds pooled. In the "
    "same rotation runs the bare gRPC path (`benchmarks/grpc_floor.py`): a grpc.aio server in a process of its own "
    "with a unary call and a server stream, no work behind them; the client opens the stream, then makes the call, "
    "whose handler answers and puts one message on the stream; timed from the call until the message arrives, "
    "with the byte sizes of the mesh's SubmitTask request and reply and its terminal WatchTask update. These are "
    "the two gRPC hops on a task's path (client to ingest, notifier to client) that the chains lack."
)
TRACING_ENV = {
    "OTEL_TRACES_EXPORTER": "otlp",
    "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
    "OTEL_EXPORTER_OTLP_INSECURE": "true",
}
SERIES = ("mesh_ms", "direct_ms", "exactly_once_ms", "at_least_once_ms", "grpc_ms")


class Configuration(NamedTuple):
    key: str
    name: str
    guarantee: Guarantee
    tracing: bool


CONFIGURATIONS = (
    Configuration("exactly_once", "`exactly_once`, tracing off", "exactly_once", False),
    Configuration("exactly_once_traced", "`exactly_once`, tracing on (OTLP/gRPC)", "exactly_once", True),
    Configuration("at_least_once", "`at_least_once`, tracing off", "at_least_once", False),
)


async def drive(stack: Any, model: str, tasks: int, warmup: int, *, grpc_address: str | None = None) -> dict[str, Any]:
    """The mesh, the direct call and the chains in turn (and the bare gRPC path, given its server's address)."""
    async with (
        MeshClient(stack) as mesh,
        DirectTriton(stack.triton_url) as direct,
        contextlib.AsyncExitStack() as grpc_path,
    ):
        records = await sample_records(mesh, submit_request(model))
        async with floor_chains(stack, records) as chains:
            calls = [lambda: mesh.run(model), lambda: direct.run(model), *(c.run for c in chains.values())]
            if grpc_address is not None:
                calls.append((await grpc_path.enter_async_context(GrpcPath(grpc_address, records.sizes))).run)
            samples = await sequential(calls, tasks, warmup)
    return {**dict(zip(SERIES, samples, strict=False)), "stages": [list(s) for s in mesh.stages[-tasks:]]}


def measure(configuration: Configuration, args: argparse.Namespace) -> dict[str, Any]:
    env: dict[str, str] = {"AIMESH_PROCESSING_GUARANTEE": configuration.guarantee}
    with contextlib.ExitStack() as receiver:
        if configuration.tracing:
            env |= {**TRACING_ENV, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.enter_context(receiver_process())}
        with bench_stack(extra_env=env) as stack, floor_server() as grpc_address:
            timings = drive(stack, args.latency_model, args.latency_tasks, args.warmup, grpc_address=grpc_address)
            return asyncio.run(timings)


def run_rounds(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each round: a fresh mesh per configuration."""
    rounds = []
    for i in range(args.rounds):
        rounds.append({c.key: measure(c, args) for c in CONFIGURATIONS})
        log(f"latency round {i + 1}/{args.rounds} done")
    return rounds


def percentile(series: str, q: float) -> Callable[[dict[str, Any]], float]:
    """One round's (one configuration's) percentile of a series; ``overhead_ms``: the mesh's minus the direct's."""
    if series == "overhead_ms":
        return lambda r: quantile(r["mesh_ms"], q) - quantile(r["direct_ms"], q)
    return lambda r: quantile(r[series], q)


def across(rounds: Sequence[dict[str, Any]], key: str, series: str, q: float) -> list[float]:
    """Per round, configuration ``key``'s percentile of ``series``."""
    return [percentile(series, q)(r[key]) for r in rounds]


def overhead_p50(rounds: Sequence[dict[str, Any]], key: str) -> float:
    return median(across(rounds, key, "overhead_ms", 0.5))


# Where a light-load task's time goes, from the timings the worker puts in each result (ingest stamps the task
# when it accepts it; the worker notes when it started the task, how long the Triton call took, and when the result
# was produced) and the end-to-end time the client measured. One clock: every process runs on this machine.
STAGES = (
    "accepted by ingest until a worker starts it (ingest's produce and acknowledgement, the worker's fetch)",
    "the Triton call, as the worker timed it",
    "in the worker around that call (decode, micro-batching, the result's encoding)",
    "result produced until the client has it (the transaction's commit or the acknowledgement, read_committed "
    "visibility, the notifier, gRPC), plus the client's call to ingest",
)


def stage_values(stages: Sequence[float]) -> tuple[float, float, float, float]:
    """One task's ``Stages`` as the four STAGES, in milliseconds."""
    end_to_end, queue_wait, inference, total = stages
    return queue_wait, inference, total - queue_wait - inference, end_to_end - total


def breakdown(rounds: Sequence[dict[str, Any]]) -> list[str]:
    tracing_off = [c for c in CONFIGURATIONS if not c.tracing]
    lines = [
        "Where the time goes (tracing off; per stage the median across rounds of each round's p50, ms; the "
        "stages' p50s need not add up to the end-to-end p50):",
        "",
        "| stage | " + " | ".join(c.guarantee for c in tracing_off) + " |",
        "|---" * (len(tracing_off) + 1) + "|",
    ]
    for index, name in enumerate(STAGES):
        values = [
            median([quantile([stage_values(s)[index] for s in r[c.key]["stages"]], 0.5) for r in rounds])
            for c in tracing_off
        ]
        lines.append(f"| {name} | " + " | ".join(f"{v:.1f}" for v in values) + " |")
    return lines


Column = Callable[[Sequence[dict[str, Any]], str], float]
Target = tuple[str, tuple[str, str, float], tuple[str, str, float], float]


def median_of(series: str, q: float) -> Column:
    return lambda rounds, key: median(across(rounds, key, series, q))


def ratio_of(series: str, q: float, chain: str) -> Column:
    return lambda rounds, key: median_ratio(across(rounds, key, series, q), across(rounds, key, chain, q))


def latencies(direct: str) -> dict[str, Column]:
    """The mesh's, the direct call's (named ``direct``) and the overhead's p50 and p99."""
    series = {"mesh": "mesh_ms", direct: "direct_ms", "overhead": "overhead_ms"}
    return {f"{name} p{round(q * 100)}": median_of(s, q) for name, s in series.items() for q in (0.5, 0.99)}


FLOORS: dict[str, Column] = {
    "exactly-once chain p50": median_of("exactly_once_ms", 0.5),
    "exactly-once chain p99": median_of("exactly_once_ms", 0.99),
    "at-least-once chain p50": median_of("at_least_once_ms", 0.5),
    "at-least-once chain p99": median_of("at_least_once_ms", 0.99),
    "overhead p50 / exactly-once chain p50": ratio_of("overhead_ms", 0.5, "exactly_once_ms"),
    "overhead p99 / exactly-once chain p99": ratio_of("overhead_ms", 0.99, "exactly_once_ms"),
    "overhead p50 / at-least-once chain p50": ratio_of("overhead_ms", 0.5, "at_least_once_ms"),
    "gRPC path p50": median_of("grpc_ms", 0.5),
    "gRPC path p99": median_of("grpc_ms", 0.99),
}


def overhead_target(configuration: Configuration, chain: Guarantee, q: float, most: float) -> Target:
    """The mesh's overhead under ``configuration`` over ``chain``'s, both at quantile ``q``: at most ``most``."""
    p = f"p{round(q * 100)}"
    what = f"`{configuration.guarantee}`: overhead {p} / {chain.replace('_', '-')} chain {p}"
    return what, (configuration.key, "overhead_ms", q), (configuration.key, f"{chain}_ms", q), most


# Issue 15's targets: (what, numerator and denominator as (configuration, series, quantile), most allowed).
TARGETS: tuple[Target, ...] = (
    overhead_target(CONFIGURATIONS[0], "exactly_once", 0.5, 1.2),
    overhead_target(CONFIGURATIONS[0], "exactly_once", 0.99, 1.5),
    overhead_target(CONFIGURATIONS[2], "at_least_once", 0.5, 1.3),
    (
        "tracing on / tracing off, mesh p50 (`exactly_once`)",
        ("exactly_once_traced", "mesh_ms", 0.5),
        ("exactly_once", "mesh_ms", 0.5),
        1.1,
    ),
)


def headroom(rounds: Sequence[dict[str, Any]], wanted: Sequence[Target] = TARGETS) -> list[str]:
    """For each p50 target on the overhead over a chain: what the target leaves for the mesh's own work beyond that
    chain ((at most - 1) x the chain's p50), what that work takes now (overhead p50 minus the chain's p50), and the
    bare gRPC path's p50 against the room left (above 1: the two gRPC hops alone need more than the target leaves).
    Each per round, then the median across rounds."""
    lines = [
        "| target | chain p50 | room the target leaves | the mesh's own share now | bare gRPC path p50 "
        "| gRPC path / room |",
        "|---|---|---|---|---|---|",
    ]
    for what, (key, series, q), (_, chain, _), most in wanted:
        if series != "overhead_ms" or q != 0.5:
            continue
        chains, overheads = across(rounds, key, chain, 0.5), across(rounds, key, "overhead_ms", 0.5)
        rooms = [(most - 1) * c for c in chains]
        own = [o - c for o, c in zip(overheads, chains, strict=True)]
        grpc_path = across(rounds, key, "grpc_ms", 0.5)
        lines.append(
            f"| {what} at most {most:g} | {median(chains):.1f} | {median(rooms):.1f} | {median(own):.1f} "
            f"| {median(grpc_path):.1f} | {median_ratio(grpc_path, rooms):.2f} |"
        )
    return lines


def table(
    rounds: Sequence[dict[str, Any]],
    columns: dict[str, Column],
    configurations: Sequence[Configuration] = CONFIGURATIONS,
) -> list[str]:
    """A row per configuration, a column per figure (ratios, named ``a / b``, to two decimals)."""
    lines = ["| configuration | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for c in configurations:
        lines.append(
            f"| {c.name} | "
            + " | ".join(f"{f(rounds, c.key):.{1 if ' / ' not in h else 2}f}" for h, f in columns.items())
            + " |"
        )
    return lines


def targets(rounds: Sequence[dict[str, Any]], wanted: Sequence[Target] = TARGETS) -> list[str]:
    """Each target's ratio per round, its median across rounds (min-max), and whether that median meets it."""
    lines = ["| target | ratio, median (min-max) | at most | |", "|---|---|---|---|"]
    for what, numerator, denominator, most in wanted:
        ratios = [n / d for n, d in zip(across(rounds, *numerator), across(rounds, *denominator), strict=True)]
        met = "met" if median(ratios) <= most else "not met"
        lines.append(f"| {what} | {median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) | {most:g} | {met} |")
    return lines


def report(rounds: Sequence[dict[str, Any]], args: argparse.Namespace, plots: Path) -> Section:
    lines = [
        f"Light-load latency, model `{args.latency_model}`, {args.latency_tasks} sequential tasks after "
        f"{args.warmup} warm-up, median of {len(rounds)} rounds (each round a fresh mesh per configuration). "
        "Milliseconds.",
        "",
        *table(rounds, latencies("direct Triton")),
        "",
        "Kafka's floor: the bare chains measured in the same rounds as each configuration's mesh.",
        "",
        *table(rounds, FLOORS),
        "",
        "Targets (each ratio per round, then the median across rounds):",
        "",
        *targets(rounds),
        "",
        "What each p50 target leaves for the mesh's own work beyond the chain, against the two gRPC hops alone "
        "(milliseconds; each per round, then the median across rounds):",
        "",
        *headroom(rounds),
        "",
        *breakdown(rounds),
    ]
    plot(rounds, args, plots / "latency.png")
    return Section(TITLE, METHOD, "\n".join(lines), "latency.png")


def plot(rounds: Sequence[dict[str, Any]], args: argparse.Namespace, path: Path) -> None:
    """Every configuration's mesh, the direct call (beside `exactly_once`, tracing off) and each chain (beside the
    configuration of its guarantee, tracing off)."""
    lines = [(c.key, "mesh_ms", f"mesh, {c.name.replace('`', '')}") for c in CONFIGURATIONS]
    lines += [("exactly_once", "direct_ms", "direct Triton")]
    lines += [(g, f"{g}_ms", f"bare Kafka chain, {g}") for g in GUARANTEES]
    lines += [("exactly_once", "grpc_ms", "bare gRPC path (SubmitTask and one WatchTask update)")]
    figure, axes = new_figure(height=5.5)
    for key, series, label in lines:
        values = np.sort(np.concatenate([r[key][series] for r in rounds]))
        axes.step(values, np.arange(1, len(values) + 1) / len(values), where="post", label=label)
    axes.set_xscale("log")
    plain_log_ticks(axes.xaxis)
    axes.set_xlabel("end-to-end latency, ms (log scale)")
    axes.set_ylabel("fraction of tasks at or below")
    axes.set_title(f"model {args.latency_model}, light load, {len(rounds)} rounds pooled")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2, fontsize="small")
    save_plot(figure, path)
