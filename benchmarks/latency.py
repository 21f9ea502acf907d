"""End-to-end latency at light load, as ratios measured in one run on one machine.

For each configuration a fresh mesh is started on free ports, warmed up, then driven by one client that
submits a task and waits for its terminal update on a WatchTask stream, alternating with a direct
tritonclient call on the same model against the same Triton server. Reported per configuration: p50 and
p99 of both, the mesh's overhead (mesh minus direct), and the tracing-on / tracing-off ratio. Each
configuration runs ``--rounds`` times; the medians across rounds are the figures.

    python benchmarks/latency.py [--tasks 200] [--rounds 3] [--model sentiment] [--markdown docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import InferInput

from aimesh.devstack.otlp import OtlpReceiver
from aimesh.devstack.ports import free_ports
from aimesh.devstack.stack import Stack, StackSettings
from aimesh.v1 import ingest_pb2, ingest_pb2_grpc, notifier_pb2, notifier_pb2_grpc, task_pb2

TEXT = "The release went smoothly and everyone was pleased."


@dataclass
class Round:
    mesh_ms: list[float]
    direct_ms: list[float]


def quantile(values: list[float], q: float) -> float:
    return float(np.quantile(np.array(values), q))


async def drive(stack: Stack, model: str, tasks: int, warmup: int) -> Round:
    mesh_ms: list[float] = []
    direct_ms: list[float] = []
    async with (
        grpc.aio.insecure_channel(stack.ingest_address) as ingest_channel,
        grpc.aio.insecure_channel(stack.notifier_address) as notifier_channel,
        triton_aio.InferenceServerClient(stack.triton_url) as triton,
    ):
        ingest = ingest_pb2_grpc.IngestServiceStub(ingest_channel)
        notifier = notifier_pb2_grpc.NotifierServiceStub(notifier_channel)
        data = np.array([[TEXT.encode()]], dtype=np.object_)
        tensor = InferInput("TEXT", [1, 1], "BYTES")
        tensor.set_data_from_numpy(data)

        async def through_mesh() -> float:
            started = time.perf_counter()
            reply = await ingest.SubmitTask(
                ingest_pb2.SubmitTaskRequest(model_name=model, input=task_pb2.TaskInput(text=TEXT)), timeout=30
            )
            async for _ in notifier.WatchTask(notifier_pb2.WatchTaskRequest(task_id=reply.task_id), timeout=30):
                pass  # the stream ends after the terminal update
            return (time.perf_counter() - started) * 1000

        async def direct() -> float:
            started = time.perf_counter()
            await triton.infer(model, [tensor], client_timeout=30)
            return (time.perf_counter() - started) * 1000

        for i in range(warmup + tasks):
            m, d = await through_mesh(), await direct()
            if i >= warmup:
                mesh_ms.append(m)
                direct_ms.append(d)
    return Round(mesh_ms, direct_ms)


def run_configuration(tracing: bool, args: argparse.Namespace) -> list[Round]:
    rounds = []
    receiver = OtlpReceiver() if tracing else None
    if receiver:
        receiver.start()
    try:
        for _ in range(args.rounds):
            ports = free_ports(7)
            settings = StackSettings(
                run_dir=Path(tempfile.mkdtemp(prefix="aimesh-bench-")),
                kafka_port=ports[0],
                kafka_controller_port=ports[1],
                triton_grpc_port=ports[2],
                triton_http_port=ports[3],
                triton_metrics_port=ports[4],
                ingest_port=ports[5],
                notifier_port=ports[6],
            )
            env = {"AIMESH_LOG_LEVEL": "WARNING"}
            if receiver:
                env |= {
                    "OTEL_TRACES_EXPORTER": "otlp",
                    "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                    "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                    "OTEL_EXPORTER_OTLP_INSECURE": "true",
                }
            with Stack(settings, extra_env=env) as stack:
                rounds.append(asyncio.run(drive(stack, args.model, args.tasks, args.warmup)))
            print(f"  {'tracing on ' if tracing else 'tracing off'}: round {len(rounds)} done", file=sys.stderr)
    finally:
        if receiver:
            receiver.stop()
    return rounds


def summarize(rounds: list[Round]) -> dict[str, float]:
    def median_of(f: object) -> float:
        return statistics.median(f(r) for r in rounds)  # type: ignore[operator]

    return {
        "mesh_p50": median_of(lambda r: quantile(r.mesh_ms, 0.5)),
        "mesh_p99": median_of(lambda r: quantile(r.mesh_ms, 0.99)),
        "direct_p50": median_of(lambda r: quantile(r.direct_ms, 0.5)),
        "direct_p99": median_of(lambda r: quantile(r.direct_ms, 0.99)),
        "overhead_p50": median_of(lambda r: quantile(r.mesh_ms, 0.5) - quantile(r.direct_ms, 0.5)),
        "overhead_p99": median_of(lambda r: quantile(r.mesh_ms, 0.99) - quantile(r.direct_ms, 0.99)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default="sentiment")
    parser.add_argument("--markdown", type=Path, help="write the table into this file")
    args = parser.parse_args()

    off = summarize(run_configuration(False, args))
    on = summarize(run_configuration(True, args))
    lines = [
        f"Light-load latency, model `{args.model}`, {args.tasks} sequential tasks after {args.warmup} warm-up, "
        f"median of {args.rounds} rounds (each round a fresh mesh). Milliseconds.",
        "",
        "| configuration | mesh p50 | mesh p99 | direct Triton p50 | direct Triton p99 | overhead p50 | overhead p99 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in (("tracing off", off), ("tracing on (OTLP/gRPC export)", on)):
        lines.append(
            f"| {name} | {s['mesh_p50']:.1f} | {s['mesh_p99']:.1f} | {s['direct_p50']:.1f} | {s['direct_p99']:.1f} "
            f"| {s['overhead_p50']:.1f} | {s['overhead_p99']:.1f} |"
        )
    lines += [
        "",
        f"Ratios: mesh p50 / direct p50 = {off['mesh_p50'] / off['direct_p50']:.1f} (tracing off); "
        f"tracing on / tracing off, mesh p50 = {on['mesh_p50'] / off['mesh_p50']:.2f}, "
        f"mesh p99 = {on['mesh_p99'] / off['mesh_p99']:.2f}.",
    ]
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        command = " ".join(["python", "benchmarks/latency.py", *sys.argv[1:]])
        args.markdown.write_text(
            "# Benchmarks\n\nMade by `make bench` on the project's 2-core machine, everything on loopback; absolute"
            " times are noise there, the ratios are the figures.\n\n"
            f"## End-to-end latency and the cost of tracing\n\nCommand: `{command}`\n\n{table}\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
