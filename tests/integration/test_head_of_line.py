"""A fast task never waits for a slow one fetched before it: on the real broker, Triton and the mesh's workers, 40
``sentiment`` tasks submitted behind an 8-second ``sleep`` task on every tasks partition reach their watchers long
before any slow task ends (before out-of-order publishing they waited for it: 7.8 s at the median)."""

from __future__ import annotations

import asyncio
import statistics
import time

import pytest

from aimesh.devstack.stack import Stack
from aimesh.v1 import result_pb2

from .mesh_client import MeshClient, TopicReader, slow_head_on_every_partition, wait_for_results

pytestmark = pytest.mark.integration

FAST = 40
SLOW_MS = 8000


async def latencies(client: MeshClient, texts: list[str]) -> list[float]:
    """Submit each text to ``sentiment`` and watch it: seconds from the submit call to its terminal update."""

    async def one(text: str) -> float:
        started = time.monotonic()
        result = await client.result(await client.submit("sentiment", text), timeout_s=60)
        assert result.status == result_pb2.TASK_STATUS_SUCCEEDED, result
        return time.monotonic() - started

    return list(await asyncio.gather(*(one(t) for t in texts)))


async def test_fast_tasks_do_not_wait_for_slow_ones_on_their_partitions(mesh: Stack, client: MeshClient) -> None:
    alone = await latencies(client, [f"a fine day number {i}" for i in range(FAST)])
    partitions = mesh.settings.tasks_partitions
    slow = slow_head_on_every_partition(mesh.kafka_bootstrap, mesh.topics.tasks_topic, partitions, SLOW_MS)
    with TopicReader(mesh.kafka_bootstrap, mesh.topics.results_topic) as results:
        slow_started = time.monotonic()
        behind = await latencies(client, [f"a great day number {i}" for i in range(FAST)])
        fast_done_s = time.monotonic() - slow_started
        slow_done = wait_for_results(results, slow, timeout_s=60)
        slow_done_s = time.monotonic() - slow_started

    print(
        f"fast tasks alone: p50 {statistics.median(alone) * 1000:.0f} ms, max {max(alone) * 1000:.0f} ms; "
        f"behind {partitions} slow ones: p50 {statistics.median(behind) * 1000:.0f} ms, "
        f"max {max(behind) * 1000:.0f} ms; all fast done {fast_done_s:.1f} s, slow done {slow_done_s:.1f} s"
    )
    assert all(r[0].status == result_pb2.TASK_STATUS_SUCCEEDED for r in slow_done.values())
    # Generous bounds for a busy 2-core machine: the point is that no fast task waited for a slow one.
    assert max(behind) < SLOW_MS / 1000 / 2, f"a fast task took {max(behind):.1f} s behind {SLOW_MS} ms tasks"
    assert fast_done_s < slow_done_s - 2
