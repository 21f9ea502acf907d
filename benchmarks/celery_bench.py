"""A peer Python users pick for the same job: Celery with a Redis broker and result backend, its task calling the
same Triton model synchronously (``benchmarks/celery_app.py``). Throughput on a prefilled queue at the mesh's top
concurrency, and light-load end-to-end latency (submit to result available) of Celery, the mesh and a direct call."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import redis
from celery import Celery

from aimesh.devstack.ports import free_ports
from aimesh.devstack.process import ManagedProcess
from benchmarks import sections
from benchmarks.common import (
    ROOT,
    SLEEP_MODEL,
    TEXT,
    DirectTriton,
    MeshClient,
    Section,
    Workers,
    log,
    median,
    median_ratio,
    quantile,
    sequential,
    sleep_parameters,
    spread,
    steady_rate,
    tasks_for,
)
from benchmarks.throughput import mesh_at_top, timeout_for, top

TITLE = sections.CELERY
METHOD = (
    "Celery 5 with a Redis broker and result backend (Debian's `redis-server` on a free port, no persistence), "
    "a worker process with the thread pool (`--pool threads --concurrency` = the mesh's top concurrency) and "
    "late acknowledgement (`task_acks_late`: like the mesh, a task is acknowledged after it ran). The task calls "
    "the same `sleep` model on the same Triton synchronously with tritonclient gRPC. **Throughput**: the queue is "
    "prefilled with no worker running, then the worker starts; the steady rate (10th to 90th percentile) of the "
    "results' `date_done` in the result backend. **Latency**: one task at a time, submit to result available "
    "(`AsyncResult.get`), alternating with one mesh task (`SubmitTask`, then `WatchTask` to its terminal update; "
    "2 workers) and one direct Triton call, on the `sleep` model with `delay_ms` 0."
)
TASK = "aimesh_bench.infer"


@contextlib.contextmanager
def redis_server(run_dir: Path) -> Iterator[str]:
    """A throw-away redis-server on a free loopback port, without persistence; yields its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed: run `make bench-tools` (apt-get install redis-server)")
    (port,) = free_ports(1)
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    process = ManagedProcess("redis", [*argv, "--dir", str(run_dir)], env={}, log_path=run_dir / "redis.log")
    process.start()
    client = redis.Redis(port=port)
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(redis.ConnectionError):
                if client.ping():
                    break
            if time.monotonic() > deadline or not process.alive():
                raise RuntimeError(f"redis-server did not start:\n{process.log_tail()}")
            time.sleep(0.1)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        client.close()
        process.stop()


def celery_worker(url: str, triton_url: str, concurrency: int, log_dir: Path) -> ManagedProcess:
    """A Celery worker with a thread pool of ``concurrency`` (each thread runs one task at a time, as an
    in-flight slot of the mesh does)."""
    argv = [sys.executable, "-m", "celery", "-A", "benchmarks.celery_app", "worker", "--pool", "threads"]
    argv += ["--concurrency", str(concurrency), "--loglevel", "WARNING", "--without-gossip", "--without-mingle"]
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "AIMESH_BENCH_REDIS_URL": url,
        "AIMESH_BENCH_TRITON_URL": triton_url,
    }
    return ManagedProcess("celery", argv, env=env, log_path=log_dir / "celery-worker.log")


def finish_times(client: redis.Redis, task_ids: Sequence[str], timeout_s: float) -> list[float]:
    """When each task's result was stored (``date_done``), once all are; raise if one failed."""
    keys = [f"celery-task-meta-{t}" for t in task_ids]
    deadline = time.monotonic() + timeout_s
    while True:
        values = client.mget(keys)
        if all(values):
            break
        if time.monotonic() > deadline:
            done = sum(v is not None for v in values)
            raise TimeoutError(f"{done} of {len(keys)} Celery results stored in {timeout_s:.0f}s")
        time.sleep(0.2)
    metas = [json.loads(v) for v in values]
    failed = [m for m in metas if m["status"] != "SUCCESS"]
    if failed:
        raise RuntimeError(f"{len(failed)} Celery tasks failed, e.g. {failed[0]}")
    return [datetime.fromisoformat(m["date_done"]).timestamp() for m in metas]


def measure(workers: Workers, args: argparse.Namespace) -> dict[str, Any]:
    stack = workers.stack
    concurrency = top(args)
    tasks = tasks_for(concurrency, args.seconds, args.delay_ms)
    workers.stop()
    with redis_server(stack.settings.run_dir) as url:
        app = Celery("aimesh_bench_client", broker=url, backend=url)
        client = redis.Redis.from_url(url)
        parameters = sleep_parameters(args.delay_ms)
        # Prefill the queue with no worker running: one worker process takes it all, so (unlike the mesh's group,
        # which forms before its burst) no start-up leaves one part of the backlog to run alone.
        task_ids = [app.send_task(TASK, (SLEEP_MODEL, TEXT, parameters)).id for _ in range(tasks)]
        worker = celery_worker(url, stack.triton_url, concurrency, stack.log_dir)
        worker.start()
        try:
            rate = steady_rate(finish_times(client, task_ids, timeout_for(tasks, concurrency, args.delay_ms)))
            log(f"  Celery, concurrency {concurrency}: {tasks} tasks, {rate:.1f}/s")
            latencies = asyncio.run(light_load(app, workers, args))
        finally:
            worker.stop()
            workers.stop()
            client.close()
    celery_ms, mesh_ms, direct_ms = latencies
    log(
        f"  light load p50: Celery {quantile(celery_ms, 0.5):.1f} ms, mesh {quantile(mesh_ms, 0.5):.1f} ms, "
        f"direct {quantile(direct_ms, 0.5):.1f} ms"
    )
    return {"points": {concurrency: rate}, "celery_ms": celery_ms, "mesh_ms": mesh_ms, "direct_ms": direct_ms}


async def light_load(app: Celery, workers: Workers, args: argparse.Namespace) -> list[list[float]]:
    """One task at a time through Celery, the mesh and Triton directly, interleaved; the sleep model with
    ``delay_ms`` 0, so what is measured is the path, not the model."""
    stack = workers.stack
    group = f"bench-latency-{uuid.uuid4().hex[:8]}"
    workers.start_group_at(group, workers.mark())
    count = stack.settings.workers
    workers.start(count, max(1, top(args) // count), group)
    await asyncio.to_thread(stack.wait_workers, count, group)
    parameters = sleep_parameters(0)

    async def through_celery() -> float:
        started = time.perf_counter()
        result = await asyncio.to_thread(app.send_task, TASK, (SLEEP_MODEL, TEXT, parameters))
        await asyncio.to_thread(result.get, timeout=30)
        return (time.perf_counter() - started) * 1000

    async with MeshClient(stack) as mesh, DirectTriton(stack.triton_url) as direct:
        return await sequential(
            [through_celery, lambda: mesh.run(SLEEP_MODEL, parameters), lambda: direct.run(SLEEP_MODEL, parameters)],
            args.latency_tasks,
            args.warmup,
        )


def report(rounds: Sequence[dict[str, Any]], args: argparse.Namespace, plots: Path) -> Section:
    c = top(args)
    celery = [r["celery"]["points"][c] for r in rounds]
    mesh = mesh_at_top(rounds, args)

    def q(name: str, p: float) -> list[float]:
        return [quantile(r["celery"][name], p) for r in rounds]

    rows = [
        "| path | p50 ms | p99 ms | p50 over direct ms | p99 over direct ms |",
        "|---|---|---|---|---|",
    ]
    for name, label in (("celery_ms", "Celery + Redis"), ("mesh_ms", "mesh"), ("direct_ms", "direct Triton")):
        overhead50 = [a - b for a, b in zip(q(name, 0.5), q("direct_ms", 0.5), strict=True)]
        overhead99 = [a - b for a, b in zip(q(name, 0.99), q("direct_ms", 0.99), strict=True)]
        rows.append(
            f"| {label} | {median(q(name, 0.5)):.1f} | {median(q(name, 0.99)):.1f} | {median(overhead50):.1f} "
            f"| {median(overhead99):.1f} |"
        )
    results = "\n".join(
        [
            f"Median of {len(rounds)} rounds (min-max). Throughput at concurrency {c}, `delay_ms` = {args.delay_ms}:",
            "",
            "| system | tasks/s | mesh / system |",
            "|---|---|---|",
            f"| Celery + Redis ({c} threads) | {spread(celery)} | {median_ratio(mesh, celery):.2f} |",
            f"| mesh ({c} in flight) | {spread(mesh)} | 1.00 |",
            "",
            f"Light-load end-to-end latency, `delay_ms` = 0, {args.latency_tasks} sequential tasks after "
            f"{args.warmup} warm-up, each path in turn:",
            "",
            *rows,
            "",
            f"Ratio of p50 latencies, mesh / Celery: {median_ratio(q('mesh_ms', 0.5), q('celery_ms', 0.5)):.2f}.",
        ]
    )
    return Section(TITLE, METHOD, results)
