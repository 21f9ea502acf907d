"""The at_least_once processing guarantee with a worker SIGKILLed in the middle of a run: no task is lost; a task whose
result was acknowledged but whose offset was not yet committed runs again, so its terminal result may be on the
results topic twice; every watcher still gets exactly one terminal update, the first, and GetTask answers it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
from integration.mesh_client import (
    MeshClient,
    TopicReader,
    metric_total,
    read_topic,
    terminal_results,
    wait_caught_up,
    wait_for_results,
)

from aimesh import events
from aimesh.devstack.stack import Stack
from aimesh.v1 import notifier_pb2, result_pb2

from .conftest import WORKER_GROUP, WORKERS, assert_workers_rejoined
from .dead_letters import dead_letters_of

pytestmark = [pytest.mark.fault, pytest.mark.timeout(600)]

TASKS = 2000
DELAY_MS = "100"  # per Triton batch of the sleep model: stretches the run over several seconds
# Offsets committed every 5 s: the kill always finds results published and not yet committed, so tasks run twice.
AT_LEAST_ONCE = {"AIMESH_PROCESSING_GUARANTEE": "at_least_once", "AIMESH_COMMIT_INTERVAL_S": "5"}
# Watched from before the kill: the tasks around the point the kill comes (a third done), where a re-run is likeliest.
WATCHED = range(TASKS // 4, TASKS // 2)


@pytest.fixture
def at_least_once(stack: Stack) -> Iterator[Stack]:
    """The fault stack's workers under at_least_once; the default guarantee again afterwards."""
    switch_workers(stack, AT_LEAST_ONCE)
    try:
        yield stack
    finally:
        switch_workers(stack, {})


def switch_workers(stack: Stack, env: dict[str, str]) -> None:
    for index in range(WORKERS):
        stack.services[f"worker-{index}"].stop(timeout_s=40)
    for index in range(WORKERS):
        stack.start_worker(index, env)
    stack.wait_workers(WORKERS, WORKER_GROUP)


def notifiers(stack: Stack) -> list[str]:
    return [stack.replica_name("notifier", i) for i in range(len(stack.replica_addresses("notifier")))]


def repeated_results(stack: Stack, name: str) -> float:
    """Notifier ``name``'s count of terminal results it dropped because their task had one already."""
    return metric_total(stack.metrics_url(name), "aimesh_notifier_repeated_results_total")


def same_result(a: result_pb2.AIResultEvent, b: result_pb2.AIResultEvent) -> bool:
    """The same terminal result record (a re-run's has another ``produced_at``, at least)."""
    return a.status == b.status and a.worker_id == b.worker_id and a.produced_at == b.produced_at


async def test_at_least_once_loses_nothing_and_delivers_one_terminal_update(
    at_least_once: Stack, client: MeshClient
) -> None:
    stack = at_least_once
    with TopicReader(stack.kafka_bootstrap, stack.topics.results_topic) as results:
        started = time.monotonic()
        task_ids = await client.submit_many(
            "sleep", [f"at least once {i}" for i in range(TASKS)], parameters={"delay_ms": DELAY_MS}
        )
        watchers = {task_ids[i]: asyncio.create_task(client.updates(task_ids[i], timeout_s=300)) for i in WATCHED}
        done = wait_for_results(results, task_ids, at_least=TASKS // 3, timeout_s=120)
        stack.kill_worker(1)
        done_at_kill = len(done)
        assert done_at_kill < TASKS, "the run ended before the kill: make it longer"
        stack.restart_worker(1, AT_LEAST_ONCE)
        wait_for_results(results, task_ids, timeout_s=120)
        watched = {task_id: await watcher for task_id, watcher in watchers.items()}
    wait_caught_up(stack.kafka_bootstrap, WORKER_GROUP, stack.topics.tasks_topic)

    on_topic = terminal_results(read_topic(stack.kafka_bootstrap, stack.topics.results_topic))
    missing = [t for t in task_ids if t not in on_topic]
    assert not missing, f"{len(missing)} tasks have no terminal result, such as {missing[:10]}"
    repeated = {t: len(on_topic[t]) for t in task_ids if len(on_topic[t]) > 1}
    print(
        f"killed worker-1 with {done_at_kill} of {TASKS} done; all done after {time.monotonic() - started:.1f} s; "
        f"{len(repeated)} tasks have their terminal result on the topic more than once "
        f"({sum(repeated.values()) - len(repeated)} repeats), {len(repeated.keys() & watched.keys())} of them watched"
    )
    # Without repeats this test would check nothing of what at_least_once allows.
    assert repeated, "no task's terminal result is on the topic twice: were the workers at_least_once?"

    for task_id, updates in watched.items():
        terminal = [u for u in updates if events.is_terminal(u.status)]
        assert len(terminal) == 1, f"a watcher of {task_id} got {len(terminal)} terminal updates"
        assert same_result(terminal[0].result, on_topic[task_id][0]), f"{task_id}: not the first terminal result"
    dropped = sum(repeated_results(stack, name) for name in notifiers(stack))
    assert dropped >= 1, "the notifiers count no repeated terminal result they dropped"
    for task_id in set(repeated) | set(task_ids[:: TASKS // 50]):
        reply = await client.notifier.GetTask(notifier_pb2.GetTaskRequest(task_id=task_id), timeout=10)
        assert same_result(reply.state.result, on_topic[task_id][0]), f"GetTask({task_id}): not the first result"
    dead = dead_letters_of(read_topic(stack.kafka_bootstrap, stack.topics.dead_letter_topic), task_ids)
    assert not dead, f"{len(dead)} tasks went to the dead-letter topic: {dead[:5]}"
    assert_workers_rejoined(stack)
