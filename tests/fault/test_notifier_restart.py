"""A notifier holding 100,000 retained tasks, stopped (SIGTERM) or killed (SIGKILL) and started again on its state
directory: SERVING within 15 s, and every task still answerable.

It runs against a Kafka broker of its own (no Triton, no other notifier): the fault stack's three replicas would
read the same 200,000 records and share this machine's cores with the notifier whose restart is timed. One
standalone notifier process (``python -m aimesh.notifier``) is started on free ports, with authentication on and a
retention of a day; the records are written straight to Kafka (benchmarks/notifier_state.py), as ingest and a
worker would publish them. Before each timed start every record is deleted from the topics, so the tasks it then
answers for can only have come from its state directory: a notifier that rereads Kafka at start would know none.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from confluent_kafka import OFFSET_END, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from grpc_health.v1 import health_pb2_grpc

from aimesh import events
from aimesh.devstack.process import ManagedProcess
from aimesh.settings import KafkaSettings
from aimesh.v1 import notifier_pb2, notifier_pb2_grpc, result_pb2
from benchmarks.common import AUTH
from benchmarks.notifier_state import (
    QUICK_RECONNECT,
    kafka_broker,
    notifier_env,
    produce,
    result_event,
    serving,
    task_event,
    task_id,
    tasks_known,
)

pytestmark = pytest.mark.fault

TASKS = 100_000
SERVING_LIMIT_S = 15.0  # the bound, there for 1,000,000 tasks
FIRST_READ_LIMIT_S = 240.0  # the first start reads all 200,000 records; two busy cores are slow at that
SAMPLE = 2_000
GET_CONCURRENCY = 50  # GetTask calls in flight at once on the one connection
WATCH_BATCH = 1_000  # the notifier's default AIMESH_MAX_SUBSCRIPTIONS_PER_CONNECTION
WATCH_CONNECTIONS = 4  # each its own connection, so each stream has the per-connection limit to itself
LATE_TASKS = 1_000  # written while the notifier that is then killed runs


@dataclass
class Notifier:
    """The notifier of a state directory and the broker it reads: how to start it, and how many tasks there are."""

    env: dict[str, str]
    log_dir: Path
    topics: KafkaSettings
    tasks: int = TASKS
    starts: int = 0

    @property
    def address(self) -> str:
        return self.env["AIMESH_NOTIFIER_ADDRESS"]

    def start(self) -> ManagedProcess:
        self.starts += 1
        process = ManagedProcess(
            f"notifier-{self.starts}",
            [sys.executable, "-m", "aimesh.notifier"],
            env=self.env,
            log_path=self.log_dir / f"notifier-{self.starts}.log",
        )
        process.start()
        return process

    def wait(
        self, process: ManagedProcess, limit_s: float, what: str, started: float, ready: Callable[[], bool]
    ) -> float:
        """Seconds from ``started`` until it is SERVING and ``ready()``; fails the test if the process exits or
        ``limit_s`` passes."""
        with grpc.insecure_channel(self.address, options=QUICK_RECONNECT) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while not (serving(health) and ready()):
                assert process.alive(), f"the notifier exited before {what}:\n{process.log_tail()}"
                elapsed = time.monotonic() - started
                assert elapsed < limit_s, f"no {what} {elapsed:.1f} s after the start:\n{process.log_tail()}"
                time.sleep(0.05)
        return time.monotonic() - started

    def start_timed(self) -> tuple[ManagedProcess, float]:
        """Start it; the seconds until it is SERVING, failing past SERVING_LIMIT_S."""
        started = time.monotonic()
        process = self.start()
        return process, self.wait(process, SERVING_LIMIT_S, "SERVING", started, lambda: True)

    def delete_records(self) -> None:
        """Delete every record of the tasks and results topics, as retention would: from now on the tasks exist
        only in the notifier's state directory, so a notifier that answers for them read them from there."""
        bootstrap = self.env["AIMESH_KAFKA_BOOTSTRAP"]
        topics = [self.topics.tasks_topic, self.topics.batch_tasks_topic, self.topics.results_topic]
        admin = AdminClient({"bootstrap.servers": bootstrap})
        metadata = admin.list_topics(timeout=10).topics
        everything = [TopicPartition(t, p, OFFSET_END) for t in topics for p in metadata[t].partitions]
        for future in admin.delete_records(everything, request_timeout=30).values():
            future.result()
        consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "notifier-restart-test"})
        try:
            for tp in everything:
                low, high = consumer.get_watermark_offsets(tp, timeout=10, cached=False)
                assert low == high, f"{tp.topic}[{tp.partition}] still holds offsets {low} to {high}"
        finally:
            consumer.close()

    def write_late_tasks(self, count: int) -> None:
        """Write ``count`` more tasks' records and terminal results."""
        producer = Producer({"bootstrap.servers": self.env["AIMESH_KAFKA_BOOTSTRAP"], "linger.ms": 20})
        for index in range(self.tasks, self.tasks + count):
            key = task_id(index)
            producer.produce(
                self.topics.tasks_topic, task_event(index).SerializeToString(), key, headers=events.task_headers()
            )
            producer.produce(
                self.topics.results_topic, result_event(index).SerializeToString(), key, headers=events.result_headers()
            )
        assert producer.flush(30) == 0
        self.tasks += count


@pytest.fixture(scope="module")
def retained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Notifier]:
    """A broker with TASKS tasks' records and terminal results, and a notifier state directory that holds them
    all: a first notifier read them and was stopped."""
    run_dir = tmp_path_factory.mktemp("notifier-restart")
    with kafka_broker(run_dir) as (kafka, topics):
        bootstrap = kafka.bootstrap
        produce(bootstrap, topics, TASKS)
        notifier = Notifier(notifier_env(bootstrap, topics, run_dir / "state", {}), run_dir / "logs", topics)
        process = notifier.start()
        try:
            notifier.wait(
                process,
                FIRST_READ_LIMIT_S,
                f"all {TASKS:,} tasks known",
                time.monotonic(),
                lambda: tasks_known(notifier.env) == TASKS,
            )
        finally:
            process.stop(timeout_s=60)
        yield notifier


def get_request(index: int) -> notifier_pb2.GetTaskRequest:
    return notifier_pb2.GetTaskRequest(task_id=task_id(index))


def assert_answers(address: str, indexes: list[int]) -> None:
    """GetTask answers SUCCEEDED, with the task's submission, for each of these tasks."""
    with grpc.insecure_channel(address) as channel:
        stub = notifier_pb2_grpc.NotifierServiceStub(channel)
        states = []
        for start in range(0, len(indexes), GET_CONCURRENCY):
            chunk = indexes[start : start + GET_CONCURRENCY]
            calls = [stub.GetTask.future(get_request(i), timeout=30, metadata=AUTH) for i in chunk]
            states += [call.result().state for call in calls]
    assert [s.task_id for s in states] == [task_id(i) for i in indexes]
    assert all(s.status == result_pb2.TASK_STATUS_SUCCEEDED and s.HasField("submitted_at") for s in states)


async def watched_once(address: str, tasks: int) -> Counter[str]:
    """WatchTasks with after_sequence 0 over every task, WATCH_BATCH at a time: how often each task id came with
    its terminal state (each stream gives every task's current state, then ends)."""
    seen: Counter[str] = Counter()
    batches = [range(start, min(start + WATCH_BATCH, tasks)) for start in range(0, tasks, WATCH_BATCH)]
    channels = [
        grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(WATCH_CONNECTIONS)
    ]

    async def watch_on(connection: int) -> None:
        stub = notifier_pb2_grpc.NotifierServiceStub(channels[connection])
        for batch in batches[connection::WATCH_CONNECTIONS]:
            request = notifier_pb2.WatchTasksRequest(
                tasks=[notifier_pb2.WatchTaskRequest(task_id=task_id(i), after_sequence=0) for i in batch]
            )
            async for response in stub.WatchTasks(request, timeout=60, metadata=AUTH):
                if response.state.status == result_pb2.TASK_STATUS_SUCCEEDED:
                    seen[response.state.task_id] += 1

    try:
        await asyncio.gather(*(watch_on(c) for c in range(WATCH_CONNECTIONS)))
    finally:
        for channel in channels:
            await channel.close()
    return seen


async def test_a_stopped_notifier_serves_again_within_15_s_with_every_task(retained: Notifier) -> None:
    tasks = retained.tasks
    retained.delete_records()
    process, serving_s = retained.start_timed()
    try:
        assert tasks_known(retained.env) == tasks
        assert_answers(retained.address, random.Random(1).sample(range(tasks), SAMPLE))
        seen = await watched_once(retained.address, tasks)
        assert len(seen) == tasks and set(seen.values()) == {1}, (
            f"{tasks - len(seen)} tasks missing, {sum(1 for n in seen.values() if n > 1)} repeated"
        )
        assert set(seen) == {task_id(i) for i in range(tasks)}
    finally:
        process.stop(timeout_s=60)
    print(f"SIGTERM restart: SERVING in {serving_s:.1f} s with {tasks:,} tasks")


def test_a_killed_notifier_resumes_what_it_had_written(retained: Notifier) -> None:
    running, _ = retained.start_timed()
    try:
        retained.write_late_tasks(LATE_TASKS)
        late = list(range(retained.tasks - LATE_TASKS, retained.tasks))
        retained.wait(
            running, 60, "the late tasks", time.monotonic(), lambda: tasks_known(retained.env) == retained.tasks
        )
        # GetTask runs on the loop after the callbacks that applied the late tasks and wrote them with their offsets.
        assert_answers(retained.address, late)
    finally:
        running.kill()  # SIGKILL: no shutdown, only what RocksDB's write-ahead log holds
    retained.delete_records()
    process, serving_s = retained.start_timed()
    try:
        assert tasks_known(retained.env) == retained.tasks
        assert_answers(retained.address, [*late, *random.Random(2).sample(range(retained.tasks), SAMPLE)])
    finally:
        process.stop(timeout_s=60)
    print(f"SIGKILL restart: SERVING in {serving_s:.1f} s with {retained.tasks:,} tasks")
