"""Two Triton servers behind the workers: both receive batches, and one SIGKILLed in the middle of a run costs no
task and no duplicate; started again, it receives batches again."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator

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
from prometheus_client.parser import text_string_to_metric_families

from aimesh.devstack.stack import Stack, StackSettings
from aimesh.v1 import result_pb2

from .conftest import FAULT_ENV, WORKER_GROUP, WORKERS
from .dead_letters import dead_letters_of

pytestmark = [pytest.mark.fault, pytest.mark.timeout(300)]

# Waves submitted a little apart, each batch sleeping longer than the gap: requests are always outstanding on both
# servers, so the kill (after KILL_AFTER_WAVES waves) lands in the middle of the run, with requests inside the
# killed server, and later waves can only run on the other one.
WAVES, WAVE_TASKS, WAVE_GAP_S, KILL_AFTER_WAVES = 8, 50, 0.3, 3
DELAY_MS = "300"
KILLED = 1


@pytest.fixture(scope="module")
def two_tritons(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    settings = StackSettings.on_free_ports(tmp_path_factory.mktemp("tritons"), workers=WORKERS, triton_servers=2)
    with Stack(settings, extra_env=FAULT_ENV) as stack:
        yield stack


@pytest.fixture
async def client(two_tritons: Stack) -> AsyncIterator[MeshClient]:
    c = MeshClient(two_tritons.ingest_address, two_tritons.notifier_address)
    yield c
    await c.close()


def scrape(url: str) -> dict[str, float]:
    """Sums of a metrics endpoint's samples by metric family (all label sets together; a counter's family name is
    without ``_total``, which the parser adds to the samples of Triton's counters)."""
    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            sums[family.name] = sums.get(family.name, 0.0) + sample.value
    return sums


def executions(stack: Stack, index: int) -> float:
    """Batches Triton server ``index`` has executed (every model), from its own metrics."""
    return scrape(stack.tritons[index].metrics_url).get("nv_inference_exec_count", 0.0)


def requests_served(stack: Stack, index: int) -> float:
    """Requests Triton server ``index`` has answered successfully (every model), from its own metrics."""
    return scrape(stack.tritons[index].metrics_url).get("nv_inference_request_success", 0.0)


def worker_metric(stack: Stack, name: str, **labels: str) -> list[float]:
    """``name`` with ``labels`` on each worker."""
    values = []
    for index in range(WORKERS):
        with urllib.request.urlopen(stack.metrics_url(f"worker-{index}"), timeout=5) as reply:
            text = reply.read().decode()
        values.append(
            sum(
                s.value
                for family in text_string_to_metric_families(text)
                for s in family.samples
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
            )
        )
    return values


async def wait_until(condition: str, check: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:.0f} s: {condition}")
        await asyncio.sleep(0.1)


async def test_a_triton_server_killed_mid_run_costs_no_task_and_both_serve(
    two_tritons: Stack, client: MeshClient
) -> None:
    stack = two_tritons
    killed_url = stack.triton_urls[KILLED]
    before = [executions(stack, i) for i in range(2)]
    requests_before = [requests_served(stack, i) for i in range(2)]
    retries_before = sum(worker_metric(stack, "aimesh_worker_retries_total"))
    task_ids: list[str] = []
    kill_now = asyncio.Event()

    async def submit_waves() -> None:
        for wave in range(WAVES):
            texts = [f"wave {wave} task {i}" for i in range(WAVE_TASKS)]
            task_ids.extend(await client.submit_many("sleep", texts, parameters={"delay_ms": DELAY_MS}))
            if wave + 1 == KILL_AFTER_WAVES:
                kill_now.set()
            await asyncio.sleep(WAVE_GAP_S)

    with TopicReader(stack.kafka_bootstrap, stack.topics.results_topic) as results:
        submitting = asyncio.ensure_future(submit_waves())
        await kill_now.wait()
        await wait_until(
            "both Triton servers executed batches", lambda: all(executions(stack, i) > before[i] for i in range(2))
        )
        served = [executions(stack, i) - before[i] for i in range(2)]
        answered = [requests_served(stack, i) - requests_before[i] for i in range(2)]
        assert all(a > 0 for a in answered), f"requests answered by each server: {answered}"
        stack.stop_triton(kill=True, index=KILLED)
        killed_at, submitted_at_kill = time.monotonic(), len(task_ids)
        await submitting
        wait_for_results(results, task_ids, timeout_s=120)
        recovered_s = time.monotonic() - killed_at
    wait_caught_up(stack.kafka_bootstrap, WORKER_GROUP, stack.topics.tasks_topic)

    by_task = terminal_results(read_topic(stack.kafka_bootstrap, stack.topics.results_topic))
    problem = not_exactly_once(task_ids, {t: len(by_task.get(t, [])) for t in task_ids})
    assert not problem, f"after one of two Triton servers was killed: {problem}"
    failed = [
        (t, r.error.message) for t in task_ids for r in by_task[t] if r.status != result_pb2.TASK_STATUS_SUCCEEDED
    ]
    assert not failed, f"{len(failed)} tasks did not succeed, such as {failed[:5]}"
    dead = dead_letters_of(read_topic(stack.kafka_bootstrap, stack.topics.dead_letter_topic), task_ids)
    assert not dead, f"{len(dead)} tasks went to the dead-letter topic: {dead[:5]}"
    unreachable = sum(
        worker_metric(stack, "aimesh_worker_triton_endpoint_requests_total", endpoint=killed_url, outcome="unreachable")
    )
    retries = sum(worker_metric(stack, "aimesh_worker_retries_total")) - retries_before
    await wait_until(  # each worker's health check probes the up endpoints every second
        "every worker marked the killed server down",
        lambda: worker_metric(stack, "aimesh_worker_triton_endpoint_up", endpoint=killed_url) == [0.0] * WORKERS,
    )
    slowest_s = max(r.timings.total.ToNanoseconds() / 1e9 for t in task_ids for r in by_task[t])
    print(
        f"{len(task_ids)} tasks; before the kill the servers executed {served[0]:.0f} and {served[1]:.0f} batches "
        f"for {answered[0]:.0f} and {answered[1]:.0f} requests; killed with "
        f"{submitted_at_kill} submitted; all done {recovered_s:.1f} s after the kill; {unreachable:.0f} requests "
        f"found the killed server unreachable and were sent again; {retries:.0f} task retries; slowest task "
        f"{slowest_s:.1f} s"
    )

    # Started again, it is probed, found ready, and given batches again.
    stack.start_triton(index=KILLED)
    await wait_until(
        "every worker marked the restarted server up",
        lambda: worker_metric(stack, "aimesh_worker_triton_endpoint_up", endpoint=killed_url) == [1.0] * WORKERS,
    )
    restarted = executions(stack, KILLED)
    later = await client.submit_many("sleep", [f"after restart {i}" for i in range(100)], parameters={"delay_ms": "50"})
    with TopicReader(stack.kafka_bootstrap, stack.topics.results_topic) as results:
        wait_for_results(results, later, timeout_s=60)
    assert executions(stack, KILLED) > restarted, "the restarted server received no batch"
