"""The benchmark suite (``make bench``): every figure a ratio of two measurements made in the same round on the
same machine, each round repeated ``--rounds`` times and the median quoted.

    python benchmarks/run.py [--only throughput blog celery ingest latency ttft hol cluster gateway store_choice
                             notifier_state notifier_replicas ingest_replicas payloads] [--rounds 3] [--quick]
                             [--guarantees exactly_once at_least_once] [--markdown docs/benchmarks.md] [--plots docs]

Throughput, blog, Celery and ingest share one fresh mesh per round (the throughput sweep runs its workers under
each processing guarantee in turn); latency starts its own (`exactly_once` with tracing off and on,
`at_least_once`), each measured beside the bare Kafka chains of ``kafka_floor``, and so do ttft (time to first token
of a streaming model, under each guarantee), hol (fast tasks behind slow ones) and cluster (a
three-broker cluster against one broker), and so does gateway (Server-Sent Events through the HTTP gateway against
WatchTask, and idle event streams on one gateway process). store_choice compares the two embedded stores for the
notifier's state without any mesh; notifier_state starts only a Kafka broker and the notifier, notifier_replicas a
broker with one notifier and then three partitioned replicas; ingest_replicas starts a mesh with two ingest
replicas; payloads starts a mesh and sends 1 MiB tensors by reference through it and straight to its Triton.
The blog and Celery baselines are compared with the mesh's throughput in the same round, so they bring the
throughput sweep along.
"""

from __future__ import annotations

import argparse
import faulthandler
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable for ``benchmarks.*``
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import (  # noqa: E402
    blog,
    celery_bench,
    cluster,
    gateway,
    head_of_line,
    ingest,
    ingest_replicas,
    latency,
    notifier_replicas,
    notifier_state,
    payloads,
    sections,
    state_store_choice,
    throughput,
    ttft,
)
from benchmarks.common import Section, Workers, bench_stack, log, median, quantile, write_markdown  # noqa: E402
from benchmarks.kafka_floor import GUARANTEES  # noqa: E402

# In the order they are measured in a round and listed in the document.
MESH_BENCHMARKS = {"throughput": throughput, "blog": blog, "celery": celery_bench, "ingest": ingest}
ALL = [
    *MESH_BENCHMARKS,
    *("latency", "ttft", "hol", "cluster", "gateway", "store_choice", "notifier_state", "notifier_replicas"),
    "ingest_replicas",
    "payloads",
]
ORDER = sections.ORDER


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=ALL, default=ALL, metavar="NAME", help=f"of {', '.join(ALL)}")
    parser.add_argument("--rounds", type=int, default=3, help="fresh meshes per benchmark; medians are quoted")
    parser.add_argument("--concurrency", type=int, nargs="+", help="sweep (default 1 8 32 64 128; quick: 1 8 64)")
    parser.add_argument(
        "--guarantees",
        nargs="+",
        choices=GUARANTEES,
        default=list(GUARANTEES),
        help="the workers' processing guarantees the throughput sweep runs the mesh under",
    )
    parser.add_argument("--delay-ms", type=int, default=50, help="sleep model's cost per batch")
    parser.add_argument("--seconds", type=float, default=3.0, help="throughput point length at Triton's best rate")
    parser.add_argument("--ingest-requests", type=int, default=10_000)
    parser.add_argument("--latency-tasks", type=int, default=200, help="sequential tasks per latency round")
    parser.add_argument("--latency-model", default="sentiment")
    parser.add_argument("--ttft-tasks", type=int, default=100, help="sequential streaming tasks per ttft round")
    parser.add_argument("--hol-tasks", type=int, default=40, help="fast tasks per burst of the head-of-line round")
    parser.add_argument("--gateway-tasks", type=int, default=200, help="sequential tasks per path per gateway round")
    parser.add_argument("--gateway-streams", type=int, default=1000, help="idle event streams held per gateway round")
    parser.add_argument("--store-tasks", type=int, default=1_000_000, help="tasks per store in store_choice")
    parser.add_argument("--store-gets", type=int, default=100_000, help="random point gets per store in store_choice")
    parser.add_argument("--notifier-tasks", type=int, default=1_000_000, help="retained tasks in notifier_state")
    parser.add_argument("--notifier-gets", type=int, default=3000, help="GetTask calls per notifier start")
    parser.add_argument(
        "--notifier-env", action="append", default=[], metavar="KEY=VALUE", help="notifier setting (repeatable)"
    )
    parser.add_argument("--intake-tasks", type=int, default=200_000, help="retained tasks in notifier_replicas")
    parser.add_argument("--live-watchers", type=int, default=300, help="live WatchTask streams in notifier_replicas")
    parser.add_argument("--replicas-seconds", type=float, default=5.0, help="each ingest_replicas measurement")
    parser.add_argument("--payload-tasks", type=int, default=200, help="1 MiB tasks per point in payloads")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="a short smoke run: 1 round, small counts")
    parser.add_argument("--markdown", type=Path, help="write the sections measured into this file")
    parser.add_argument("--plots", type=Path, default=Path("docs"), help="folder for throughput.png, latency.png")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.seconds, args.ingest_requests = 1, 1.0, 1000
        args.latency_tasks, args.ttft_tasks, args.warmup = 30, 30, 5
        args.gateway_tasks, args.gateway_streams = 30, 100
        args.replicas_seconds, args.payload_tasks = 2.0, 40
        args.intake_tasks, args.live_watchers = 20_000, 60
        args.store_tasks, args.store_gets, args.notifier_tasks, args.notifier_gets = 50_000, 10_000, 20_000, 1000
    args.concurrency = sorted(args.concurrency or ([1, 8, 64] if args.quick else [1, 8, 32, 64, 128]))
    if {"blog", "celery"} & set(args.only) and "throughput" not in args.only:
        args.only = ["throughput", *args.only]
    return args


def mesh_rounds(names: list[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    rounds = []
    for i in range(args.rounds):
        with bench_stack() as stack:
            workers = Workers(stack)
            measured: dict[str, Any] = {}
            for name in names:
                log(f"round {i + 1}/{args.rounds}: {name}")
                measured[name] = MESH_BENCHMARKS[name].measure(workers, args)
            rounds.append(measured)
    return rounds


def celery_target(celery_rounds: list[dict[str, Any]], latency_rounds: list[dict[str, Any]]) -> str:
    """Issue 15's target against Celery: the `at_least_once` mesh's overhead p50 (latency's rounds) below Celery +
    Redis's (the Celery section's rounds, the sleep model with no delay), both over a direct call in their rounds."""
    celery = median(
        [quantile(r["celery"]["celery_ms"], 0.5) - quantile(r["celery"]["direct_ms"], 0.5) for r in celery_rounds]
    )
    mesh = latency.overhead_p50(latency_rounds, "at_least_once")
    verdict = "met" if mesh < celery else "not met"
    return (
        f"\n\nTarget: `at_least_once` overhead p50 ({mesh:.1f} ms, above) below Celery + Redis's overhead p50 in "
        f"the same run ({celery:.1f} ms, in its own section): {verdict}."
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>` prints where a stuck run is
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind, so the meshes started are stopped
    started = time.monotonic()
    sections: list[Section] = []
    names = [n for n in MESH_BENCHMARKS if n in args.only]
    rounds = mesh_rounds(names, args) if names else []
    sections += [MESH_BENCHMARKS[n].report(rounds, args, args.plots) for n in names]
    if "latency" in args.only:
        latency_rounds = latency.run_rounds(args)
        sections.append(latency.report(latency_rounds, args, args.plots))
        if "celery" in names:
            sections[-1].results += celery_target(rounds, latency_rounds)
    if "ttft" in args.only:
        sections.append(ttft.report(ttft.run_rounds(args), args))
    if "hol" in args.only:
        sections.append(head_of_line.report(head_of_line.run_rounds(args), args, args.plots))
    if "cluster" in args.only:
        sections.append(cluster.report(cluster.run_rounds(args), args))
    if "gateway" in args.only:
        sections.append(gateway.report(gateway.run_rounds(args), args))
    if "store_choice" in args.only:
        sections.append(state_store_choice.report(state_store_choice.run_rounds(args), args))
    if "notifier_state" in args.only:
        sections.append(notifier_state.report(notifier_state.run_rounds(args), args))
    if "notifier_replicas" in args.only:
        sections.append(notifier_replicas.report(notifier_replicas.run_rounds(args), args))
    if "ingest_replicas" in args.only:
        sections.append(ingest_replicas.report(ingest_replicas.run_rounds(args), args))
    if "payloads" in args.only:
        sections.append(payloads.report(payloads.run_rounds(args), args))
    for section in sections:
        print(f"\n## {section.title}\n\n{section.results}")
    command = shlex.join(["python", "benchmarks/run.py", *(sys.argv[1:] if argv is None else argv)])
    if args.markdown:
        write_markdown(args.markdown, sections, command, ORDER)
        log(f"wrote {args.markdown}")
    log(f"benchmarks took {(time.monotonic() - started) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
