"""Priority classes through the real mesh: under a flood of batch tasks, interactive ones overtake them.

The batch flood is written straight onto the batch tasks topic (as ingest writes a PRIORITY_BATCH task), so the
test does not depend on ingest's admission control; the interactive tasks go through ingest."""

from __future__ import annotations

import asyncio
import statistics
import time

import pytest

from aimesh import events
from aimesh.devstack.stack import Stack
from aimesh.v1 import result_pb2, task_pb2

from .mesh_client import MeshClient, TopicReader, produce_raw, task_record, task_updates

pytestmark = pytest.mark.integration

BATCH_TASKS = 600
INTERACTIVE_TASKS = 5
DELAY_MS = "1000"  # per Triton execution of up to 64 tasks (two instances): the flood takes several seconds


async def test_interactive_tasks_finish_well_before_a_batch_backlog_drains(mesh: Stack, client: MeshClient) -> None:
    flood = [
        task_record("sleep", f"batch {i}", parameters={"delay_ms": DELAY_MS}, priority=task_pb2.PRIORITY_BATCH)
        for i in range(BATCH_TASKS)
    ]
    batch_ids = [key for key, _ in flood]
    with TopicReader(mesh.kafka_bootstrap, mesh.topics.results_topic) as reader:
        flood_at = time.time()
        produce_raw(mesh.kafka_bootstrap, mesh.topics.batch_tasks_topic, flood)
        # Once the workers are busy with the flood, the interactive tasks arrive.
        updates = await asyncio.to_thread(
            task_updates, reader, batch_ids, until=lambda u: any(u.values()), timeout_s=60
        )
        submitted_at = time.time()
        interactive_ids = list(
            await asyncio.gather(
                *(
                    client.submit("sleep", f"interactive {i}", parameters={"delay_ms": DELAY_MS})
                    for i in range(INTERACTIVE_TASKS)
                )
            )
        )
        rest = await asyncio.to_thread(task_updates, reader, [*batch_ids, *interactive_ids], timeout_s=180)
    for task_id, more in rest.items():
        updates.setdefault(task_id, []).extend(more)

    def finished_at(task_id: str) -> float:
        [final] = [e for e in updates[task_id] if events.is_terminal(e.status)]
        assert final.status == result_pb2.TASK_STATUS_SUCCEEDED, final
        return events.timestamp_s(final.produced_at)

    batch_done = sorted(finished_at(t) for t in batch_ids)
    interactive_done = sorted(finished_at(t) for t in interactive_ids)
    last_interactive = interactive_done[-1]
    batch_before = sum(1 for t in batch_done if t <= last_interactive)
    drain_s = batch_done[-1] - flood_at
    interactive_s = [t - submitted_at for t in interactive_done]
    print(
        f"\n{BATCH_TASKS} batch tasks drained {drain_s:.2f}s after the flood; {INTERACTIVE_TASKS} interactive tasks "
        f"submitted {submitted_at - flood_at:.2f}s into it finished in {statistics.median(interactive_s):.2f}s "
        f"(median), {interactive_s[-1]:.2f}s (last), {last_interactive - flood_at:.2f}s after the flood, when "
        f"{batch_before} of {BATCH_TASKS} batch tasks had finished"
    )
    # Interactive tasks overtake the backlog: they do not wait for most of it.
    assert batch_before <= 0.6 * BATCH_TASKS
    assert batch_done[-1] - last_interactive >= 0.3 * drain_s
