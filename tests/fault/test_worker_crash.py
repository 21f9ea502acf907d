"""A worker SIGKILLed in the middle of a run: no task is lost and none is answered twice."""

from __future__ import annotations

import time

import pytest
from integration.mesh_client import (
    MeshClient,
    TopicReader,
    not_exactly_once,
    read_topic,
    terminal_results_by_task,
    wait_caught_up,
    wait_for_results,
)

from aimesh.devstack.stack import Stack

from .conftest import WORKER_GROUP, assert_workers_rejoined
from .dead_letters import dead_letters_of

# Generous: a failing run should end on the tests' own timeouts, whose messages name the tasks concerned.
pytestmark = [pytest.mark.fault, pytest.mark.timeout(600)]

TASKS = 2000
# Per Triton batch (the sleep model sleeps once per batch of up to 64): stretches the run over several seconds.
DELAY_MS = "100"


async def test_a_killed_worker_loses_no_task_and_answers_none_twice(stack: Stack, client: MeshClient) -> None:
    with TopicReader(stack.kafka_bootstrap, stack.topics.results_topic) as results:
        started = time.monotonic()
        task_ids = await client.submit_many(
            "sleep", [f"crash {i}" for i in range(TASKS)], parameters={"delay_ms": DELAY_MS}
        )
        assert len(set(task_ids)) == TASKS
        done = wait_for_results(results, task_ids, at_least=TASKS // 3, timeout_s=120)
        stack.kill_worker(1)
        killed_after_s, done_at_kill = time.monotonic() - started, len(done)
        assert done_at_kill < TASKS, "the run ended before the kill: make it longer"
        # Same worker id, hence the same transactional id: the new instance fences the killed one's transaction.
        stack.restart_worker(1)
        wait_for_results(results, task_ids, timeout_s=120)
    # Every task record processed for good: no re-run can add a late duplicate after this.
    wait_caught_up(stack.kafka_bootstrap, WORKER_GROUP, stack.topics.tasks_topic)
    print(
        f"killed worker-1 after {killed_after_s:.1f} s with {done_at_kill} of {TASKS} done; all done after "
        f"{time.monotonic() - started:.1f} s"
    )

    counts = terminal_results_by_task(stack.kafka_bootstrap, stack.topics.results_topic)
    problem = not_exactly_once(task_ids, counts)
    assert not problem, f"after worker-1 was killed with {done_at_kill} of {TASKS} done: {problem}"
    dead = dead_letters_of(read_topic(stack.kafka_bootstrap, stack.topics.dead_letter_topic), task_ids)
    assert not dead, f"{len(dead)} tasks went to the dead-letter topic: {dead[:5]}"
    assert_workers_rejoined(stack)
