"""The notifier holding many retained tasks: its resident memory, GetTask latency, and the time to SERVING on a
first start and on a restart.

    python benchmarks/run.py --only notifier_state [--notifier-tasks 1000000] [--notifier-env KEY=VALUE ...]

Only a Kafka broker is started (no Triton, no ingest, no workers). ``--notifier-tasks`` tasks are written straight to
it, once: per task its record on the tasks topic and its terminal result on the results topic, as ingest and a
worker would publish them (keyed by task id, with their content-type headers), through one producer with big
batches. Each round then starts the real notifier process (``python -m aimesh.notifier``) with a fresh state folder
(``AIMESH_NOTIFIER_STATE_DIR``) and measures, from the moment the process is started:

- serving: until its gRPC health check answers SERVING;
- answering: until GetTask answers for each of the last tasks written (a notifier may report SERVING before it has
  read every record: the one before the on-disk store did after a minute of reading);
- memory: the process's resident memory (VmRSS, and the peak VmHWM) from /proc once it answers, in MB of 10^6
  bytes;
- GetTask: ``--notifier-gets`` calls for random retained tasks, one after another over one channel; p50 and p99, and
  how many were not found;

then stops it (SIGTERM) and starts it again on the same state folder: the restart, measured the same way. The
notifier runs with authentication on (the tasks belong to the benchmark's tenant) and ``AIMESH_RETENTION_S`` of a
day, so no task expires during a run; ``--notifier-env`` sets or overrides any of its settings.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
from confluent_kafka import Producer
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aimesh import events
from aimesh.devstack.kafka import KafkaCluster, create_topics, ensure_kafka_jars
from aimesh.devstack.ports import free_ports
from aimesh.devstack.process import ManagedProcess
from aimesh.devstack.stack import StackSettings
from aimesh.settings import KafkaSettings
from aimesh.v1 import notifier_pb2, notifier_pb2_grpc, result_pb2, task_pb2
from benchmarks import sections
from benchmarks.common import AUTH, AUTH_ENV, ROOT, Section, log, median, quantile

TITLE = sections.NOTIFIER_STATE
METHOD = (__doc__ or "").split("\n\n", 2)[2].strip()
TENANT = "bench"  # the tenant of AUTH's API key
PROBE_TASKS = 100  # the last tasks written, which the notifier must answer for before it is measured
START_TIMEOUT_S = 900.0
TEXT = "The release went smoothly and everyone was pleased. "
# While the notifier starts its port refuses connections; by default the channel then waits ever longer (up to
# 2 minutes) before trying again, which would count in the time to SERVING.
QUICK_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 100),
]


# --- the records ---------------------------------------------------------------------------------------------
def task_id(index: int) -> str:
    """Task ``index``'s id, a version-4 UUID computed from the index: random ids cost no list in memory."""
    return str(uuid.UUID(int=(index * 0x9E3779B97F4A7C15F39CC0605CEDC835) % (1 << 128), version=4))


def task_event(index: int) -> task_pb2.AITaskEvent:
    model = "sentiment" if index % 2 else "generate"
    return task_pb2.AITaskEvent(
        schema_version=events.SCHEMA_VERSION, task_id=task_id(index), model_name=model,
        input=task_pb2.TaskInput(text=TEXT), submitted_at=events.now_timestamp(), tenant=TENANT,
        priority=task_pb2.PRIORITY_INTERACTIVE,
    )  # fmt: skip


def result_event(index: int) -> result_pb2.AIResultEvent:
    """Task ``index``'s terminal result: a sentiment label and scores, or (every other task) a short generated
    text; 280-550 bytes serialized inside a TaskState."""
    model = "sentiment" if index % 2 else "generate"
    result = result_pb2.AIResultEvent(
        schema_version=events.SCHEMA_VERSION, task_id=task_id(index), status=result_pb2.TASK_STATUS_SUCCEEDED,
        model_name=model, model_version="1", worker_id=f"aimesh-worker-7f9c6d5b8-{index % 4}x2k4q",
        produced_at=events.now_timestamp(), tenant=TENANT, sequence=events.FIRST_PARTIAL_SEQUENCE,
    )  # fmt: skip
    result.timings.queue_wait.FromMilliseconds(3 + index % 50)
    result.timings.inference.FromMilliseconds(20 + index % 90)
    result.timings.total.FromMilliseconds(25 + index % 140)
    if index % 2:
        scores = [0.05, 0.1 + (index % 7) / 100, 0.7, 0.12]  # neg, neu, pos, compound
        result.output.tensors.add(name="LABEL", datatype="BYTES", shape=[1], string_data=["positive"])
        result.output.tensors.add(name="SCORES", datatype="FP32", shape=[4], float_data=scores)
    else:
        text = (TEXT * (2 + index % 5))[: 160 + index % 280]
        result.output.tensors.add(name="TEXT", datatype="BYTES", shape=[1], string_data=[text])
    return result


def produce(bootstrap: str, topics: KafkaSettings, tasks: int) -> float:
    """Write every task's record and terminal result; the seconds it took."""
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "linger.ms": 50,
            "batch.size": 1 << 20,
            "batch.num.messages": 10_000,
            "compression.type": "lz4",
            "queue.buffering.max.messages": 1_000_000,
            "queue.buffering.max.kbytes": 1 << 20,
            "acks": 1,
        }
    )
    failures: list[str] = []

    def on_delivery(err: Any, _msg: Any) -> None:
        if err is not None:
            failures.append(str(err))

    started = time.monotonic()
    task_headers, result_headers = events.task_headers(), events.result_headers()
    for index in range(tasks):
        key = task_id(index)
        for topic, value, headers in (
            (topics.tasks_topic, task_event(index).SerializeToString(), task_headers),
            (topics.results_topic, result_event(index).SerializeToString(), result_headers),
        ):
            while True:
                try:
                    producer.produce(topic, value=value, key=key, headers=headers, on_delivery=on_delivery)
                    break
                except BufferError:
                    producer.poll(0.05)  # the local queue is full: let deliveries drain it
        if index % 10_000 == 0:
            producer.poll(0)
    if producer.flush(120) or failures:
        raise RuntimeError(f"producing the records failed: {failures[:3]}")
    return time.monotonic() - started


# --- the notifier --------------------------------------------------------------------------------------------
@contextmanager
def kafka_broker(run_dir: Path, partitions: int = 6) -> Iterator[tuple[KafkaCluster, KafkaSettings]]:
    """One Kafka broker on free ports with the mesh's topics, ``partitions`` each (one for cancels and dead
    letters); the broker and the topic names."""
    settings = StackSettings.on_free_ports(run_dir)
    topics = KafkaSettings()
    kafka = KafkaCluster(
        data_dir=run_dir / "kafka",
        ports=settings.kafka_ports(),
        lib_dir=ensure_kafka_jars(settings.cache_dir / "kafka"),
        log_dir=run_dir / "logs" / "kafka",
    )
    with kafka:
        counts = {
            topics.tasks_topic: partitions,
            topics.batch_tasks_topic: partitions,
            topics.cancel_topic: 1,
            topics.results_topic: partitions,
            topics.dead_letter_topic: 1,
        }
        create_topics(kafka.bootstrap, counts)
        yield kafka, topics


def parse_env(pairs: Sequence[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--notifier-env takes KEY=VALUE, not {pair!r}")
        env[key] = value
    return env


def notifier_env(
    bootstrap: str, topics: KafkaSettings, state_dir: Path, overrides: Mapping[str, str]
) -> dict[str, str]:
    grpc_port, metrics_port = free_ports(2)
    return {
        **os.environ,
        **AUTH_ENV,
        "AIMESH_KAFKA_BOOTSTRAP": bootstrap,
        "AIMESH_TASKS_TOPIC": topics.tasks_topic,
        "AIMESH_BATCH_TASKS_TOPIC": topics.batch_tasks_topic,
        "AIMESH_CANCEL_TOPIC": topics.cancel_topic,
        "AIMESH_RESULTS_TOPIC": topics.results_topic,
        "AIMESH_NOTIFIER_ADDRESS": f"127.0.0.1:{grpc_port}",
        "AIMESH_NOTIFIER_GROUP": f"aimesh-bench-notifier-{uuid.uuid4().hex[:8]}",
        "AIMESH_NOTIFIER_STATE_DIR": str(state_dir),
        "AIMESH_RETENTION_S": "86400",
        "AIMESH_METRICS_HOST": "127.0.0.1",
        "AIMESH_METRICS_PORT": str(metrics_port),
        "AIMESH_LOG_LEVEL": "INFO",
        "PYTHONUNBUFFERED": "1",
        **overrides,
    }


def memory_mb(pid: int) -> dict[str, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            fields[name] = int(value.split()[0]) * 1024 / 1e6  # /proc's kB are KiB
    return fields


def tasks_known(env: Mapping[str, str]) -> float | None:
    """The notifier's ``aimesh_notifier_tasks_known`` gauge, None when it serves no such figure."""
    url = f"http://{env['AIMESH_METRICS_HOST']}:{env['AIMESH_METRICS_PORT']}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("aimesh_notifier_tasks_known "):
            return float(line.split()[1])
    return None


def wait_until(what: str, process: ManagedProcess, check: Any, deadline: float) -> None:
    while not check():
        if not process.alive():
            raise RuntimeError(f"the notifier exited with {process.returncode()} before {what}:\n{process.log_tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the notifier did not reach {what} in {START_TIMEOUT_S:.0f}s")
        time.sleep(0.05)


def serving(health: Any) -> bool:
    try:
        reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
    except grpc.RpcError:
        return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def answers(notifier: Any, task_ids: Sequence[str]) -> bool:
    """Whether GetTask knows each task's record (its submission time) and its terminal result."""
    try:
        for tid in task_ids:
            reply = notifier.GetTask(notifier_pb2.GetTaskRequest(task_id=tid), timeout=5, metadata=AUTH)
            if not (events.is_terminal(reply.state.status) and reply.state.HasField("submitted_at")):
                return False
    except grpc.RpcError:
        return False
    return True


def get_latencies(notifier: Any, tasks: int, calls: int, seed: int) -> tuple[list[float], int]:
    """Milliseconds of ``calls`` GetTask calls for random retained tasks, and how many were not found."""
    rng = random.Random(seed)
    latencies, missing = [], 0
    for _ in range(calls):
        request = notifier_pb2.GetTaskRequest(task_id=task_id(rng.randrange(tasks)))
        started = time.perf_counter()
        try:
            notifier.GetTask(request, timeout=10, metadata=AUTH)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND:
                raise
            missing += 1
        latencies.append((time.perf_counter() - started) * 1000)
    return latencies, missing


def start_and_measure(
    name: str, env: dict[str, str], log_path: Path, tasks: int, calls: int
) -> tuple[ManagedProcess, dict[str, Any]]:
    """Start the notifier, measure it as the module's docstring says; it is left running."""
    process = ManagedProcess(name, [sys.executable, "-m", "aimesh.notifier"], env=env, log_path=log_path)
    probes = [task_id(i) for i in range(max(0, tasks - PROBE_TASKS), tasks)]
    with grpc.insecure_channel(env["AIMESH_NOTIFIER_ADDRESS"], options=QUICK_RECONNECT) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        notifier = notifier_pb2_grpc.NotifierServiceStub(channel)
        started = time.monotonic()
        deadline = started + START_TIMEOUT_S
        process.start()
        assert process.pid is not None
        wait_until("SERVING", process, lambda: serving(health), deadline)
        serving_s = time.monotonic() - started
        wait_until("answering for the last tasks", process, lambda: answers(notifier, probes), deadline)
        answering_s = time.monotonic() - started
        memory = memory_mb(process.pid)
        known = tasks_known(env)
        latencies, missing = get_latencies(notifier, tasks, calls, seed=len(name))
        after_gets = memory_mb(process.pid)
    measured = {
        "serving_s": serving_s,
        "answering_s": answering_s,
        "rss_mb": memory["VmRSS"],
        "rss_anon_mb": memory["RssAnon"],
        "peak_rss_mb": after_gets["VmHWM"],
        "rss_after_gets_mb": after_gets["VmRSS"],
        "tasks_known": known,
        "get_p50_ms": quantile(latencies, 0.5),
        "get_p99_ms": quantile(latencies, 0.99),
        "get_missing": missing,
    }
    log(f"  {name}: " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in measured.items()))
    return process, measured


def measure_round(
    bootstrap: str, topics: KafkaSettings, run_dir: Path, round_index: int, args: argparse.Namespace
) -> dict[str, dict[str, Any]]:
    state_dir = run_dir / f"state-{round_index}"
    state_dir.mkdir()
    env = notifier_env(bootstrap, topics, state_dir, parse_env(args.notifier_env))
    measured = {}
    for start in ("first", "restart"):
        process, measured[start] = start_and_measure(
            f"notifier-{start}",
            env,
            run_dir / "logs" / f"notifier-{round_index}-{start}.log",
            args.notifier_tasks,
            args.notifier_gets,
        )
        stopping = time.monotonic()
        process.stop(timeout_s=60)
        measured[start]["stop_s"] = time.monotonic() - stopping
    shutil.rmtree(state_dir, ignore_errors=True)
    return measured


def run_rounds(args: argparse.Namespace) -> list[dict[str, dict[str, Any]]]:
    parse_env(args.notifier_env)  # a malformed pair fails before a broker starts
    run_dir = Path(tempfile.mkdtemp(prefix="aimesh-bench-notifier-"))
    log(f"starting Kafka in {run_dir}")
    rounds = []
    with kafka_broker(run_dir) as (kafka, topics):
        bootstrap = kafka.bootstrap
        produce_s = produce(bootstrap, topics, args.notifier_tasks)
        log(f"wrote {2 * args.notifier_tasks:,} records in {produce_s:.1f}s")
        for i in range(args.rounds):
            rounds.append(measure_round(bootstrap, topics, run_dir, i, args))
            log(f"notifier state round {i + 1}/{args.rounds} done")
    shutil.rmtree(run_dir, ignore_errors=True)  # kept, with its logs, when a round failed
    return rounds


ROWS = [
    ("time to SERVING, s", "serving_s"),
    ("time until GetTask answers for the last tasks written, s", "answering_s"),
    ("resident memory (VmRSS) once answering, MB", "rss_mb"),
    ("of which anonymous (RssAnon), MB", "rss_anon_mb"),
    ("peak resident memory (VmHWM), MB", "peak_rss_mb"),
    ("GetTask p50, ms", "get_p50_ms"),
    ("GetTask p99, ms", "get_p99_ms"),
    ("GetTask calls answered NOT_FOUND", "get_missing"),
    ("time to stop (SIGTERM until exit), s", "stop_s"),
]


def cell(values: Sequence[float], *, count: bool = False) -> str:
    digits = 0 if count else 2 if median(values) < 10 else 1 if median(values) < 1000 else 0
    return f"{median(values):.{digits}f} ({', '.join(f'{v:.{digits}f}' for v in values)})"


def code_measured(overrides: Mapping[str, str]) -> str:
    """Which notifier code ran: the checkout's (its commit, and whether services/notifier differs from it), or
    the one a ``PYTHONPATH`` override put first."""
    if "PYTHONPATH" in overrides:
        return f"the notifier imported from `PYTHONPATH={overrides['PYTHONPATH']}`"

    def git(*argv: str) -> str:
        return subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()

    changed = git("status", "--porcelain", "services/notifier")
    return f"the notifier of commit {git('log', '-1', '--format=%h')}" + (
        " with uncommitted changes to services/notifier" if changed else ""
    )


def report(rounds: Sequence[dict[str, dict[str, Any]]], args: argparse.Namespace) -> Section:
    overrides = " ".join(f"`{pair}`" for pair in args.notifier_env) or "none"
    lines = [
        f"{args.notifier_tasks:,} retained tasks ({2 * args.notifier_tasks:,} records), {args.notifier_gets:,} "
        f"GetTask calls per start, {len(rounds)} round(s); {code_measured(parse_env(args.notifier_env))}; "
        f"settings passed with `--notifier-env`: {overrides}. Each cell the median and, in brackets, every round's "
        "figure.",
        "",
        "| figure | first start | restart |",
        "|---|---|---|",
    ]
    for name, key in ROWS:
        first = [float(r["first"][key]) for r in rounds]
        restart = [float(r["restart"][key]) for r in rounds]
        count = key == "get_missing"
        lines.append(f"| {name} | {cell(first, count=count)} | {cell(restart, count=count)} |")
    return Section(TITLE, METHOD, "\n".join(lines))
