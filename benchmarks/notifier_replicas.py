"""One notifier against three partitioned replicas: the rate at which they take in retained results, each
process's memory and CPU, and how fast live updates reach subscribers spread over them.

    python benchmarks/run.py --only notifier_replicas [--intake-tasks 200000] [--live-watchers 300]

Only a Kafka broker is started, with six partitions per topic. ``--intake-tasks`` tasks are written straight to it
once: per task its record on the tasks topic and its terminal result (280-550 bytes) on the results topic, the
records of benchmarks/notifier_state.py. Each round then measures (a) one standalone notifier and (b) three
partitioned replicas (``AIMESH_NOTIFIER_PARTITIONED``, one group), in turn, each with fresh state folders:

- intake: from starting the processes until GetTask, asked of the first process, answers for the last task written
  to each of the six partitions. A partition's tasks answer only once its owner has read the partition up to the
  end it had when assigned (UNAVAILABLE before), so this is the moment the last replica has caught up with its
  last partition. Neither the time to SERVING nor the sum of ``aimesh_notifier_tasks_known`` marks that moment: a
  replica reports SERVING once its first assignment is read, and a partition that moves to another replica while
  the group forms stays counted where it was read first. Rate: tasks written / that time.
- per process, at that moment: time to SERVING, ``aimesh_notifier_tasks_known`` (a replica's share of the tasks),
  resident memory and its peak, and CPU seconds (user + system, /proc/<pid>/stat) since the start; the broker's
  CPU seconds and the machine's CPU use (all of them / elapsed time, out of ``os.cpu_count()``).
- live: ``--live-watchers`` WatchTask streams, round-robin over the processes (with three replicas two thirds of
  them reach their task through a forwarding replica), on tasks not written yet; once every stream is counted in
  ``aimesh_notifier_active_subscriptions``, each task's record and terminal result are written, 200 tasks a
  second; the latency is from writing a task's result until its stream receives the terminal update.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from confluent_kafka import Producer
from grpc_health.v1 import health_pb2_grpc

from aimesh import events
from aimesh.devstack.kafka import KafkaCluster
from aimesh.devstack.process import ManagedProcess
from aimesh.notifier.ownership import partition_of
from aimesh.settings import KafkaSettings
from aimesh.v1 import notifier_pb2, notifier_pb2_grpc
from benchmarks import sections
from benchmarks.common import AUTH, Section, log, median, quantile
from benchmarks.notifier_state import (
    QUICK_RECONNECT,
    kafka_broker,
    memory_mb,
    notifier_env,
    produce,
    result_event,
    serving,
    task_event,
    task_id,
)

TITLE = sections.NOTIFIER_REPLICAS
METHOD = (__doc__ or "").split("\n\n", 2)[2].strip()
PARTITIONS = 6
REPLICAS = 3
INTAKE_TIMEOUT_S = 600.0
LIVE_RATE_PER_S = 200.0
SETUPS = ("standalone", "partitioned")


@dataclass
class Notifiers:
    """The notifier processes of one setup, with their environments."""

    processes: list[ManagedProcess]
    envs: list[dict[str, str]]

    @property
    def addresses(self) -> list[str]:
        return [env["AIMESH_NOTIFIER_ADDRESS"] for env in self.envs]

    def stop(self) -> None:
        for process in self.processes:
            process.stop(timeout_s=60)


# --- the broker and the records ---------------------------------------------------------------------------------
def last_of_each_partition(tasks: int) -> list[str]:
    """The id of the last task written to each partition, of tasks 0 to ``tasks`` - 1."""
    last: dict[int, str] = {}
    for index in range(tasks - 1, -1, -1):
        tid = task_id(index)
        last.setdefault(partition_of(tid, PARTITIONS), tid)
        if len(last) == PARTITIONS:
            break
    return list(last.values())


# --- the processes ----------------------------------------------------------------------------------------------
def start_notifiers(bootstrap: str, topics: KafkaSettings, run_dir: Path, setup: str, tag: str) -> Notifiers:
    """Start the setup's processes, each with a fresh state folder; does not wait for them."""
    count = 1 if setup == "standalone" else REPLICAS
    group = {"AIMESH_NOTIFIER_PARTITIONED": "true", "AIMESH_NOTIFIER_GROUP": f"bench-replicas-{uuid.uuid4().hex[:8]}"}
    envs, processes = [], []
    for index in range(count):
        state_dir = run_dir / f"state-{tag}-{index}"
        state_dir.mkdir()
        env = notifier_env(bootstrap, topics, state_dir, group if setup == "partitioned" else {})
        name = f"notifier-{tag}-{index}"
        envs.append(env)
        processes.append(
            ManagedProcess(
                name, [sys.executable, "-m", "aimesh.notifier"], env=env, log_path=run_dir / "logs" / f"{name}.log"
            )
        )
    for process in processes:
        process.start()
    return Notifiers(processes, envs)


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float:
    """CPU seconds every process on the machine has used since boot (all cores: user, nice, system, irq)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(f) for f in fields[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def gauge(env: dict[str, str], name: str) -> float | None:
    """The value of an unlabelled gauge on the process's metrics port; None while it does not answer."""
    url = f"http://{env['AIMESH_METRICS_HOST']}:{env['AIMESH_METRICS_PORT']}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    return None


def answered(stub: Any, task_ids: Sequence[str]) -> set[str]:
    """Which of ``task_ids`` GetTask answers with their terminal state, asked all at once."""
    calls = {t: stub.GetTask.future(notifier_pb2.GetTaskRequest(task_id=t), timeout=2, metadata=AUTH) for t in task_ids}
    done = set()
    for tid, call in calls.items():
        try:
            if events.is_terminal(call.result().state.status):
                done.add(tid)
        except grpc.RpcError:
            pass
    return done


# --- intake -----------------------------------------------------------------------------------------------------
def measure_intake(notifiers: Notifiers, broker_pid: int, tasks: int, started: float) -> dict[str, Any]:
    """Wait until the last task of every partition answers; the figures of the module's docstring."""
    pending = set(last_of_each_partition(tasks))
    serving_s: dict[int, float] = {}
    broker_cpu, machine_cpu = cpu_s(broker_pid), machine_busy_s()
    with grpc.insecure_channel(notifiers.addresses[0], options=QUICK_RECONNECT) as channel:
        stub = notifier_pb2_grpc.NotifierServiceStub(channel)
        healths = [_health(a) for a in notifiers.addresses]
        while pending:
            for index, process in enumerate(notifiers.processes):
                if not process.alive():
                    raise RuntimeError(f"{process.name} exited:\n{process.log_tail()}")
                if index not in serving_s and serving(healths[index][1]):
                    serving_s[index] = time.monotonic() - started
            if time.monotonic() - started > INTAKE_TIMEOUT_S:
                raise TimeoutError(f"the notifiers did not take in {tasks:,} tasks in {INTAKE_TIMEOUT_S:.0f}s")
            pending -= answered(stub, sorted(pending))
            time.sleep(0.05)
        intake_s = time.monotonic() - started
        for index in range(len(notifiers.processes)):
            if index not in serving_s and serving(healths[index][1]):  # SERVING came with the last answers
                serving_s[index] = intake_s
        for channel_, _ in healths:
            channel_.close()
    pids = [p.pid for p in notifiers.processes if p.pid is not None]
    memory = [memory_mb(pid) for pid in pids]
    return {
        "tasks": tasks,
        "intake_s": intake_s,
        "rate_per_s": tasks / intake_s,
        "serving_s": [serving_s.get(i, float("nan")) for i in range(len(pids))],
        "known": [gauge(env, "aimesh_notifier_tasks_known") or 0.0 for env in notifiers.envs],
        "rss_mb": [m["VmRSS"] for m in memory],
        "peak_rss_mb": [m["VmHWM"] for m in memory],
        "cpu_s": [cpu_s(pid) for pid in pids],
        "broker_cpu_s": cpu_s(broker_pid) - broker_cpu,
        "machine_cpu_s": machine_busy_s() - machine_cpu,
    }


def _health(address: str) -> tuple[grpc.Channel, Any]:
    channel = grpc.insecure_channel(address, options=QUICK_RECONNECT)
    return channel, health_pb2_grpc.HealthStub(channel)


# --- live -------------------------------------------------------------------------------------------------------
async def measure_live(
    notifiers: Notifiers, bootstrap: str, topics: KafkaSettings, first: int, watchers: int
) -> dict[str, Any]:
    """Watch ``watchers`` tasks not written yet (from index ``first``), round-robin over the processes, write them,
    and time each terminal update's way from the write to its stream."""
    ids = [task_id(first + j) for j in range(watchers)]
    channels = [grpc.aio.insecure_channel(a) for a in notifiers.addresses]
    stubs = [notifier_pb2_grpc.NotifierServiceStub(c) for c in channels]
    received: dict[str, float] = {}

    async def watch(j: int) -> None:
        request = notifier_pb2.WatchTaskRequest(task_id=ids[j])
        async for response in stubs[j % len(stubs)].WatchTask(request, metadata=AUTH, timeout=120):
            if events.is_terminal(response.state.status):
                received[ids[j]] = time.monotonic()

    try:
        streams = [asyncio.create_task(watch(j)) for j in range(watchers)]
        await _until_subscribed(notifiers, watchers)
        written = await asyncio.to_thread(_write_paced, bootstrap, topics, first, watchers)
        await asyncio.wait_for(asyncio.gather(*streams), timeout=60)
    finally:
        for channel in channels:
            await channel.close()
    latencies = [(received[t] - written[t]) * 1000 for t in ids if t in received]
    return {
        "received": len(received),
        "watchers": watchers,
        "p50_ms": quantile(latencies, 0.5),
        "p99_ms": quantile(latencies, 0.99),
    }


async def _until_subscribed(notifiers: Notifiers, watchers: int) -> None:
    deadline = time.monotonic() + 30
    while True:
        counts = [await asyncio.to_thread(gauge, env, "aimesh_notifier_active_subscriptions") for env in notifiers.envs]
        if sum(c or 0.0 for c in counts) >= watchers:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {counts} of {watchers} streams subscribed after 30 s")
        await asyncio.sleep(0.1)


def _write_paced(bootstrap: str, topics: KafkaSettings, first: int, count: int) -> dict[str, float]:
    """Write tasks ``first`` .. ``first + count - 1`` (record, then result) at LIVE_RATE_PER_S; when each result
    was handed to the producer."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0, "acks": 1})
    task_headers, result_headers = events.task_headers(), events.result_headers()
    written: dict[str, float] = {}
    start = time.monotonic()
    for j in range(count):
        time.sleep(max(0.0, start + j / LIVE_RATE_PER_S - time.monotonic()))
        index = first + j
        key = task_id(index)
        producer.produce(topics.tasks_topic, task_event(index).SerializeToString(), key, headers=task_headers)
        producer.produce(topics.results_topic, result_event(index).SerializeToString(), key, headers=result_headers)
        written[key] = time.monotonic()
        producer.poll(0)
    if producer.flush(30):
        raise RuntimeError("the live records were not all delivered")
    return written


# --- rounds -----------------------------------------------------------------------------------------------------
def measure_setup(
    kafka: KafkaCluster, topics: KafkaSettings, run_dir: Path, setup: str, tag: str, tasks: int, watchers: int
) -> dict[str, Any]:
    assert kafka.pid is not None
    started = time.monotonic()
    notifiers = start_notifiers(kafka.bootstrap, topics, run_dir, setup, tag)
    try:
        measured = measure_intake(notifiers, kafka.pid, tasks, started)
        measured["live"] = asyncio.run(measure_live(notifiers, kafka.bootstrap, topics, tasks, watchers))
    finally:
        notifiers.stop()
    for index in range(len(notifiers.processes)):
        shutil.rmtree(run_dir / f"state-{tag}-{index}", ignore_errors=True)
    log(
        f"  {setup}: {measured['rate_per_s']:,.0f} tasks/s ({measured['intake_s']:.1f}s), known {measured['known']}, "
        f"CPU {[round(c, 1) for c in measured['cpu_s']]} s + broker {measured['broker_cpu_s']:.1f} s, "
        f"RSS {[round(m) for m in measured['rss_mb']]} MB, live p50 {measured['live']['p50_ms']:.1f} ms "
        f"p99 {measured['live']['p99_ms']:.1f} ms ({measured['live']['received']}/{watchers})"
    )
    return measured


def run_rounds(args: argparse.Namespace) -> list[dict[str, dict[str, Any]]]:
    run_dir = Path(tempfile.mkdtemp(prefix="aimesh-bench-replicas-"))
    log(f"starting Kafka in {run_dir}")
    rounds = []
    with kafka_broker(run_dir, PARTITIONS) as (kafka, topics):
        produce_s = produce(kafka.bootstrap, topics, args.intake_tasks)
        log(f"wrote {2 * args.intake_tasks:,} records in {produce_s:.1f}s")
        tasks = args.intake_tasks
        for i in range(args.rounds):
            measured = {}
            for setup in SETUPS if i % 2 == 0 else reversed(SETUPS):
                measured[setup] = measure_setup(
                    kafka, topics, run_dir, setup, f"{i}-{setup}", tasks, args.live_watchers
                )
                tasks += args.live_watchers  # the live tasks are retained too: the next intake reads them
            rounds.append(measured)
            log(f"notifier replicas round {i + 1}/{args.rounds} done")
    shutil.rmtree(run_dir, ignore_errors=True)  # kept, with its logs, when a round failed
    return rounds


# --- the report ---------------------------------------------------------------------------------------------------
def _cell(values: Sequence[float], digits: int = 1) -> str:
    return f"{median(values):,.{digits}f} ({', '.join(f'{v:,.{digits}f}' for v in values)})"


def _utilisation(m: dict[str, Any]) -> float:
    return (sum(m["cpu_s"]) + m["broker_cpu_s"]) / m["intake_s"]


def _notifier_cores(m: dict[str, Any]) -> float:
    return sum(m["cpu_s"]) / m["intake_s"]


def _cpu_ms_per_task(m: dict[str, Any]) -> float:
    return 1000 * sum(m["cpu_s"]) / m["tasks"]


def _row(name: str, a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]], figure: Any, digits: int = 1) -> str:
    return f"| {name} | {_cell([figure(m) for m in a], digits)} | {_cell([figure(m) for m in b], digits)} |"


def report(rounds: Sequence[dict[str, dict[str, Any]]], args: argparse.Namespace) -> Section:
    a = [r["standalone"] for r in rounds]
    b = [r["partitioned"] for r in rounds]
    ratios = [y["rate_per_s"] / x["rate_per_s"] for x, y in zip(a, b, strict=True)]
    lines = [
        f"{args.intake_tasks:,} retained tasks ({2 * args.intake_tasks:,} records; each setup's live tasks add "
        f"{args.live_watchers} more for the next), {PARTITIONS} partitions per topic, {len(rounds)} round(s), (a) "
        f"and (b) alternating first; {os.cpu_count()} CPU cores. Each cell the median and, in brackets, every "
        "round's figure.",
        "",
        "| figure | (a) one notifier | (b) three replicas |",
        "|---|---|---|",
        _row("intake rate, tasks/s", a, b, lambda m: m["rate_per_s"], 0),
        _row("intake time, s", a, b, lambda m: m["intake_s"]),
        _row("CPU seconds, notifiers (sum)", a, b, lambda m: sum(m["cpu_s"])),
        _row("CPU seconds, broker", a, b, lambda m: m["broker_cpu_s"]),
        _row("notifier CPU ms per task", a, b, _cpu_ms_per_task, 3),
        _row("cores busy with the notifiers (their CPU seconds / intake time)", a, b, _notifier_cores, 2),
        _row("cores busy with the notifiers and the broker (their CPU seconds / intake time)", a, b, _utilisation, 2),
        _row(
            "cores busy on the machine, any process (/proc/stat)", a, b, lambda m: m["machine_cpu_s"] / m["intake_s"], 2
        ),
        _row("live delivery p50, ms", a, b, lambda m: m["live"]["p50_ms"]),
        _row("live delivery p99, ms", a, b, lambda m: m["live"]["p99_ms"]),
        _row(
            f"live streams (of {args.live_watchers}) given their terminal update",
            a,
            b,
            lambda m: m["live"]["received"],
            0,
        ),
        "",
        f"Ratio (b)/(a) of the intake rate, each round's own: {_cell(ratios, 2)}. The rate is the cores the "
        "notifiers kept busy over the CPU time a task costs, so the ratio is the product of the cores' ratio "
        f"({_cell([_notifier_cores(y) / _notifier_cores(x) for x, y in zip(a, b, strict=True)], 2)}) and the "
        "inverse ratio of CPU per task "
        f"({_cell([_cpu_ms_per_task(x) / _cpu_ms_per_task(y) for x, y in zip(a, b, strict=True)], 2)}).",
        "",
        "Each process, each round (tasks known: its share of the tasks written):",
        "",
        "| round | process | SERVING, s | tasks known (share) | CPU s | RSS MB (peak) |",
        "|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(rounds):
        for setup, m in r.items():
            for j in range(len(m["cpu_s"])):
                lines.append(
                    f"| {i + 1} | {setup} {j} | {m['serving_s'][j]:.1f} | {m['known'][j]:,.0f} "
                    f"({m['known'][j] / m['tasks']:.2f}) | {m['cpu_s'][j]:.1f} | {m['rss_mb'][j]:.0f} "
                    f"({m['peak_rss_mb'][j]:.0f}) |"
                )
    return Section(TITLE, METHOD, "\n".join(lines))
