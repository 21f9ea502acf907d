"""A worker SIGKILLed in the middle of a run: no task is lost and none is answered twice."""

from __future__ import annotations

import asyncio
import hashlib
import time

import numpy as np
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

from aimesh.client import AsyncClient
from aimesh.devstack.stack import Stack
from aimesh.v1 import result_pb2

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


OUTPUT_TASKS = 240
OUTPUT_BYTES = 512 * 1024  # over the inline limit: every output goes by reference


async def test_a_killed_worker_leaves_every_output_by_reference_whole(stack: Stack, client: MeshClient) -> None:
    """Outputs stored by reference while a worker is SIGKILLed: every task still gets one result, and the object
    each result names holds exactly the bytes its SHA-256 says (downloaded through any notifier replica)."""
    payloads = [np.frombuffer(np.random.default_rng(i).bytes(OUTPUT_BYTES), dtype=np.uint8) for i in range(8)]
    async with AsyncClient(stack.ingest_address, stack.notifier_address, timeout_s=120) as library:
        with TopicReader(stack.kafka_bootstrap, stack.topics.results_topic) as results:
            # Submitted 8 at a time: one after another, the uploads took longer than the workers took to run the
            # tasks, and a CI run had all 240 done before the kill.
            submitting = asyncio.Semaphore(8)

            async def submit(i: int) -> str:
                async with submitting:
                    return await library.submit("identity", tensors={"UINT8_1": payloads[i % len(payloads)]})

            task_ids = list(await asyncio.gather(*(submit(i) for i in range(OUTPUT_TASKS))))
            done = wait_for_results(results, task_ids, at_least=OUTPUT_TASKS // 4, timeout_s=120)
            stack.kill_worker(0)
            done_at_kill = len(done)
            stack.restart_worker(0)
            wait_for_results(results, task_ids, timeout_s=180)
        wait_caught_up(stack.kafka_bootstrap, WORKER_GROUP, stack.topics.tasks_topic)
        assert done_at_kill < OUTPUT_TASKS, "the run ended before the kill: make it longer"

        counts = terminal_results_by_task(stack.kafka_bootstrap, stack.topics.results_topic)
        problem = not_exactly_once(task_ids, counts)
        assert not problem, f"after worker-0 was killed with {done_at_kill} of {OUTPUT_TASKS} done: {problem}"
        for i, task_id in enumerate(task_ids):
            state = await library.result(task_id, timeout_s=60)
            assert state.status == result_pb2.TASK_STATUS_SUCCEEDED, (task_id, state.result.error)
            (output,) = state.result.output.tensors
            expected = payloads[i % len(payloads)].tobytes()
            assert output.object.sha256 == hashlib.sha256(expected).hexdigest(), task_id
            assert await library.download(task_id, output.name) == expected, task_id
    assert not stack.object_store_client().pending_uploads()
    assert_workers_rejoined(stack)
