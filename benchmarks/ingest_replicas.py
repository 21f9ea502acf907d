"""Ingest replicas: the SubmitTask rate of concurrent clients against one ingest replica and against two behind one
round-robin target, in the same mesh and round, with the CPU each process used meanwhile."""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
import psutil

from aimesh.client.targets import ROUND_ROBIN
from aimesh.devstack.stack import Stack
from aimesh.v1 import ingest_pb2_grpc
from benchmarks import sections
from benchmarks.common import (
    AUTH,
    SLEEP_MODEL,
    Section,
    Workers,
    bench_stack,
    log,
    median,
    median_ratio,
    sleep_parameters,
    spread,
    submit_request,
)

TITLE = sections.INGEST_REPLICAS
CLIENTS = 16
CHANNELS = 2
# Each channel its own connections: by default gRPC shares one connection per address among a process's channels.
CHANNEL_OPTIONS = (*ROUND_ROBIN, ("grpc.use_local_subchannel_pool", 1))
MODES = ("one", "two")
METHOD = (
    f"One mesh per round with two ingest replicas (`ingest_replicas=2`), one notifier and no worker (the tasks only "
    f"queue: ingest's accept rate alone is measured). {CLIENTS} closed-loop callers in one asyncio process call "
    f"`SubmitTask` (one `sleep` task each, no idempotency key) over {CHANNELS} gRPC channels with the `round_robin` "
    "policy, as the client library makes them, for a fixed time: to the first replica's address alone and to the "
    "`ipv4:` target of both, one after the other in each round, which goes first alternating from round to round. "
    "The rate is the calls answered over the time; the CPU columns are each process's user and system CPU time over "
    "the same time, in cores (psutil), so they show where the machine's cores went."
)


async def submit_for(target: str, seconds: float) -> float:
    """SubmitTask calls answered per second by ``CLIENTS`` callers over ``seconds``, after a warm-up."""
    channels = [grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) for _ in range(CHANNELS)]
    try:
        stubs = [ingest_pb2_grpc.IngestServiceStub(c) for c in channels]
        request = submit_request(SLEEP_MODEL, sleep_parameters(0))
        answered = 0
        deadline = 0.0

        async def caller(index: int) -> None:
            nonlocal answered
            stub = stubs[index % CHANNELS]
            while time.perf_counter() < deadline:
                await stub.SubmitTask(request, timeout=30, metadata=AUTH)
                answered += 1

        deadline = time.perf_counter() + min(1.0, seconds / 4)  # connections up, every replica reached
        await asyncio.gather(*(caller(i) for i in range(CLIENTS)))
        answered = 0
        started = time.perf_counter()
        deadline = started + seconds
        await asyncio.gather(*(caller(i) for i in range(CLIENTS)))
        return answered / (time.perf_counter() - started)
    finally:
        for channel in channels:
            await channel.close()


def processes(stack: Stack) -> dict[str, psutil.Process]:
    """The mesh's processes by name, and this one (the clients) as ``client``."""
    found = {name: psutil.Process(pid) for name, pid in stack.state().pids.items()}
    found["client"] = psutil.Process(os.getpid())
    return found


def cpu_s(procs: Mapping[str, psutil.Process]) -> dict[str, float]:
    """User plus system CPU seconds of each process (its threads included) so far."""
    return {name: sum(p.cpu_times()[:2]) for name, p in procs.items()}


def machine_busy_s() -> float:
    """CPU seconds every core of the machine spent on anything (any process, anyone's) so far."""
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def measure_mode(stack: Stack, target: str, seconds: float) -> dict[str, Any]:
    procs = processes(stack)
    before, machine_before, started = cpu_s(procs), machine_busy_s(), time.perf_counter()
    rate = asyncio.run(submit_for(target, seconds))
    elapsed = time.perf_counter() - started
    after, machine = cpu_s(procs), (machine_busy_s() - machine_before) / elapsed
    return {"rate": rate, "machine": machine, "cores": {name: (after[name] - before[name]) / elapsed for name in procs}}


def run_rounds(args: argparse.Namespace) -> list[dict[str, dict[str, Any]]]:
    rounds = []
    for i in range(args.rounds):
        with bench_stack(workers=1, ingest_replicas=2, gateway_port=0) as stack:
            Workers(stack).stop()  # nobody runs the tasks: ingest is measured alone
            targets = {"one": stack.ingest_address, "two": stack.ingest_target}
            measured: dict[str, dict[str, Any]] = {}
            for mode in MODES if i % 2 == 0 else MODES[::-1]:  # neither always first, as load drifts
                measured[mode] = measure_mode(stack, targets[mode], args.replicas_seconds)
                m = measured[mode]
                log(f"  {mode}: {m['rate']:.0f} SubmitTask/s; machine {m['machine']:.2f}; {cores_line(m['cores'])}")
            rounds.append(measured)
        log(f"ingest replicas round {i + 1}/{args.rounds} done")
    return rounds


def cores_line(cores: Mapping[str, float]) -> str:
    busy = sorted(cores.items(), key=lambda item: -item[1])
    return ", ".join(f"{name} {used:.2f}" for name, used in busy if used >= 0.01)


def report(rounds: Sequence[dict[str, dict[str, Any]]], args: argparse.Namespace) -> Section:
    rates = {mode: [r[mode]["rate"] for r in rounds] for mode in MODES}
    names = sorted({name for r in rounds for mode in MODES for name in r[mode]["cores"]})
    busy = [n for n in names if max(r[mode]["cores"][n] for r in rounds for mode in MODES) >= 0.05]

    def cores(mode: str, name: str) -> str:
        return f"{median([r[mode]['cores'][name] for r in rounds]):.2f}"

    def total(mode: str) -> str:
        return f"{median([sum(r[mode]['cores'].values()) for r in rounds]):.2f}"

    def machine(mode: str) -> str:
        return f"{median([r[mode]['machine'] for r in rounds]):.2f}"

    lines = [
        f"Median of {len(rounds)} rounds (min-max), {args.replicas_seconds:g} s per measurement; CPU in cores used "
        f"(this machine has {os.cpu_count()}).",
        "",
        "| ingest replicas | SubmitTask/s | two / one | "
        + " | ".join(f"{n} CPU" for n in busy)
        + " | the mesh's CPU | the machine's CPU (anyone's) |",
        "|---|---|---|" + "---|" * len(busy) + "---|---|",
    ]
    for mode in MODES:
        ratio = f"{median_ratio(rates[mode], rates['one']):.2f}"
        row = [mode, spread(rates[mode]), ratio, *(cores(mode, n) for n in busy), total(mode), machine(mode)]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", reading(rounds)]
    return Section(TITLE, METHOD, "\n".join(lines))


def reading(rounds: Sequence[dict[str, dict[str, Any]]]) -> str:
    """What limited the rate, from the figures: the cores left idle, or none."""
    cpus = os.cpu_count() or 1
    one_rate = median([r["one"]["rate"] for r in rounds])
    machine, mesh = (median([f(r["one"]) for r in rounds]) for f in (lambda m: m["machine"], mesh_cores))
    ingest = {mode: median([ingest_cores(r[mode]) for r in rounds]) for mode in MODES}
    two_machine = median([r["two"]["machine"] for r in rounds])
    ratio = median_ratio([r["two"]["rate"] for r in rounds], [r["one"]["rate"] for r in rounds])
    if machine >= 0.9 * cpus:
        why = (
            f"the machine's {cpus} cores were busy already with one replica ({machine:.2f} in use: the mesh "
            f"{mesh:.2f}, other work the rest), so a second replica could only take CPU from Kafka, the client and "
            f"the first one: both ingest processes together used {ingest['two']:.2f} cores, one alone "
            f"{ingest['one']:.2f}"
        )
    else:
        why = (
            f"with one replica, ingest used {ingest['one']:.2f} of a core and the machine {machine:.2f} of its {cpus}, "
            f"so CPU was left idle: each call took {1000 * CLIENTS / one_rate:.0f} ms with {CLIENTS} in flight, a "
            "rate bounded by what one replica's calls wait for (its event loop, its producer's round trips to "
            f"Kafka), not by CPU; two replicas, each waiting so for its own calls, used {ingest['two']:.2f} cores "
            f"between them and the machine {two_machine:.2f}"
        )
    return f"Two replicas answered {ratio:.2f} times the calls of one: {why}."


def mesh_cores(measured: Mapping[str, Any]) -> float:
    return float(sum(measured["cores"].values()))


def ingest_cores(measured: Mapping[str, Any]) -> float:
    return float(sum(used for name, used in measured["cores"].items() if name.startswith("ingest")))
