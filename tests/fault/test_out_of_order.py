"""Faults while results are published out of order: a slow task holds the lowest offset of every tasks partition
while many later fast tasks have published their results (recorded in the offset commit's metadata). A worker
SIGKILLed, the broker restarted, or a worker joining the group must lose no task, answer none twice, and run no
fast task again whose result was committed."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable

import pytest
from integration.mesh_client import (
    MeshClient,
    TopicReader,
    not_exactly_once,
    read_topic,
    slow_head_on_every_partition,
    terminal_results_by_task,
    wait_caught_up,
    wait_for_results,
)

from aimesh.devstack.stack import Stack
from aimesh.v1 import result_pb2

from .conftest import WORKER_GROUP, WORKERS, assert_workers_rejoined

pytestmark = [pytest.mark.fault, pytest.mark.timeout(600)]

PARTITIONS = 6  # the fault stack's tasks partitions
FAST = 300
SLOW_MS = 15_000


def running_updates(stack: Stack, task_ids: list[str]) -> Counter[str]:
    """How many RUNNING updates each task got: one per run (a task run again announces itself again)."""
    wanted = set(task_ids)
    counts: Counter[str] = Counter()
    for record in read_topic(stack.kafka_bootstrap, stack.topics.results_topic):
        event = result_pb2.AIResultEvent.FromString(record.value())
        if event.task_id in wanted and event.status == result_pb2.TASK_STATUS_RUNNING and not event.partial:
            counts[event.task_id] += 1
    return counts


async def fault_with_fast_results_published_past_slow_heads(
    stack: Stack, client: MeshClient, fault: Callable[[], None]
) -> None:
    with TopicReader(stack.kafka_bootstrap, stack.topics.results_topic) as results:
        slow = slow_head_on_every_partition(stack.kafka_bootstrap, stack.topics.tasks_topic, PARTITIONS, SLOW_MS)
        await asyncio.sleep(1.0)  # the workers take the slow heads first
        started = time.monotonic()
        fast = await client.submit_many("sentiment", [f"fast {i} is great" for i in range(FAST)])
        wait_for_results(results, fast, timeout_s=SLOW_MS / 1000 - 3)
        fast_s = time.monotonic() - started
        slow_done = wait_for_results(results, slow, at_least=0, timeout_s=0.1)
        assert not slow_done, f"{len(slow_done)} slow tasks ended before the fault: make them slower"
        fault()
        wait_for_results(results, slow + fast, timeout_s=180)
    wait_caught_up(stack.kafka_bootstrap, WORKER_GROUP, stack.topics.tasks_topic)
    print(f"{FAST} fast tasks done {fast_s:.1f} s after submission, behind {PARTITIONS} slow heads of {SLOW_MS} ms")

    counts = terminal_results_by_task(stack.kafka_bootstrap, stack.topics.results_topic)
    problem = not_exactly_once(slow + fast, counts)
    assert not problem, problem
    reruns = {task_id: n for task_id, n in running_updates(stack, fast).items() if n != 1}
    assert not reruns, f"{len(reruns)} fast tasks whose result was committed ran again: {list(reruns.items())[:5]}"
    assert_workers_rejoined(stack)


async def test_a_killed_worker_reruns_only_its_unpublished_tasks(stack: Stack, client: MeshClient) -> None:
    def kill() -> None:
        stack.kill_worker(1)
        stack.restart_worker(1)

    await fault_with_fast_results_published_past_slow_heads(stack, client, kill)


async def test_a_restarted_broker_reruns_only_unpublished_tasks(stack: Stack, client: MeshClient) -> None:
    def restart_broker() -> None:
        stack.stop_kafka()
        stack.start_kafka()

    await fault_with_fast_results_published_past_slow_heads(stack, client, restart_broker)


async def test_a_joining_worker_skips_what_its_new_partitions_published(stack: Stack, client: MeshClient) -> None:
    stack.services.pop(f"worker-{WORKERS - 1}").stop()  # a graceful leave: worker-0 owns every partition
    stack.wait_workers(WORKERS - 1, WORKER_GROUP, timeout_s=60)

    def join() -> None:
        stack.start_worker(WORKERS - 1)
        stack.wait_workers(WORKERS, WORKER_GROUP, timeout_s=60)

    await fault_with_fast_results_published_past_slow_heads(stack, client, join)
