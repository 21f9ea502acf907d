"""Triton killed for 15 s in the middle of a run: the workers wait for it, and every task then succeeds."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest
from integration.mesh_client import (
    MeshClient,
    TopicReader,
    not_exactly_once,
    read_topic,
    terminal_results,
    wait_caught_up,
    wait_for_results,
)

from aimesh.devstack.stack import Stack
from aimesh.v1 import result_pb2

from .conftest import WORKER_GROUP, assert_workers_rejoined
from .dead_letters import dead_letters_of

# Generous: a failing run should end on the tests' own timeouts, whose messages name the tasks concerned.
pytestmark = [pytest.mark.fault, pytest.mark.timeout(600)]

# Two waves: the first is running when Triton dies (some of its batches inside Triton, their requests cut
# off); the second is submitted during the outage, so it cannot succeed before Triton is back however fast the
# first wave went. A single wave once finished before the kill on a fast run and tested nothing.
WAVE = 300
TASKS = 2 * WAVE
DELAY_MS = "200"
OUTAGE_S = 15.0


async def test_tasks_wait_out_a_triton_outage_and_all_succeed(stack: Stack, client: MeshClient) -> None:
    with TopicReader(stack.kafka_bootstrap, stack.topics.results_topic) as results:
        first = await client.submit_many(
            "sleep", [f"before outage {i}" for i in range(WAVE)], parameters={"delay_ms": DELAY_MS}
        )
        done_at_kill = len(wait_for_results(results, first, at_least=WAVE // 3, timeout_s=120))
        stack.stop_triton(kill=True)
        killed = time.monotonic()
        second = await client.submit_many(
            "sleep", [f"during outage {i}" for i in range(WAVE)], parameters={"delay_ms": DELAY_MS}
        )
        task_ids = first + second
        await asyncio.sleep(OUTAGE_S)  # the outage itself: nothing to wait for
        done_in_outage = wait_for_results(results, task_ids, at_least=0)
        stack.start_triton()  # returns once every model is ready again
        back_after_s = time.monotonic() - killed
        finished_without_triton = sorted(set(second) & done_in_outage.keys())
        assert not finished_without_triton, (
            f"tasks submitted while Triton was down finished: {finished_without_triton[:5]}"
        )
        wait_for_results(results, task_ids, timeout_s=120)
    wait_caught_up(stack.kafka_bootstrap, WORKER_GROUP, stack.topics.tasks_topic)
    print(
        f"Triton killed with {done_at_kill} of the first {WAVE} done, back after {back_after_s:.1f} s with "
        f"{len(done_in_outage)} of {TASKS} done"
    )

    wait_caught_up(stack.kafka_bootstrap, WORKER_GROUP, stack.topics.tasks_topic)
    print(
        f"Triton killed with {done_at_kill} of {TASKS} done, back after {back_after_s:.1f} s with {done_in_outage} done"
    )

    by_task = terminal_results(read_topic(stack.kafka_bootstrap, stack.topics.results_topic))
    problem = not_exactly_once(task_ids, {t: len(by_task.get(t, [])) for t in task_ids})
    assert not problem, f"after a {OUTAGE_S:.0f} s Triton outage: {problem}"
    statuses = Counter(result_pb2.TaskStatus.Name(r.status) for t in task_ids for r in by_task[t])
    failed = [
        (t, r.error.message) for t in task_ids for r in by_task[t] if r.status != result_pb2.TASK_STATUS_SUCCEEDED
    ]
    assert not failed, f"not all tasks SUCCEEDED ({dict(statuses)}), such as {failed[:5]}"
    dead = dead_letters_of(read_topic(stack.kafka_bootstrap, stack.topics.dead_letter_topic), task_ids)
    assert not dead, f"{len(dead)} tasks went to the dead-letter topic: {dead[:5]}"
    assert_workers_rejoined(stack)
