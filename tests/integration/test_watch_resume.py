"""Sequence numbers against the running mesh: a watcher that drops its stream and resumes with after_sequence
misses nothing and sees nothing twice; WatchTasks carries many tasks on one stream."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from aimesh import events
from aimesh.v1 import notifier_pb2, result_pb2, task_pb2

from .mesh_client import MeshClient, tensor

pytestmark = pytest.mark.integration


async def watch_then_resume(client: MeshClient, task_id: str, first_part: int) -> list[notifier_pb2.TaskState]:
    """Watch ``task_id``, read ``first_part`` updates, drop the stream, and resume after the last one seen; return
    every update read, in order."""
    stream = client.notifier.WatchTask(notifier_pb2.WatchTaskRequest(task_id=task_id), timeout=60)
    seen: list[notifier_pb2.TaskState] = []
    async for update in stream:
        seen.append(update.state)
        if len(seen) == first_part or events.is_terminal(update.state.status):
            break
    stream.cancel()
    if events.is_terminal(seen[-1].status):
        return seen
    resumed = client.notifier.WatchTask(
        notifier_pb2.WatchTaskRequest(task_id=task_id, after_sequence=seen[-1].sequence), timeout=60
    )
    seen += [update.state async for update in resumed]
    return seen


def assert_complete(states: list[notifier_pb2.TaskState]) -> None:
    """Each update once, in order, none left out, and the last one terminal."""
    sequences = [s.sequence for s in states]
    assert sequences == list(range(sequences[0], sequences[0] + len(sequences))), sequences
    assert sequences[0] in (events.QUEUED_SEQUENCE, events.RUNNING_SEQUENCE)
    assert events.is_terminal(states[-1].status) and not any(events.is_terminal(s.status) for s in states[:-1])


async def test_a_dropped_watch_resumes_without_gaps_or_repeats(client: MeshClient) -> None:
    task_id = await client.submit("sleep", "slowly", parameters={"delay_ms": "1500"})
    states = await watch_then_resume(client, task_id, first_part=1)
    assert_complete(states)
    assert states[-1].status == result_pb2.TASK_STATUS_SUCCEEDED and len(states) >= 2
    assert tensor(states[-1].result, "TEXT").string_data == ["slowly"]


async def test_a_dropped_stream_of_partial_outputs_resumes_and_adds_up_to_the_whole_text(client: MeshClient) -> None:
    parameters = {"max_tokens": "12", "seed": "7", "token_delay_ms": "100"}
    task_id = await client.submit("generate", "Kafka keeps every task", parameters=parameters)
    states = await watch_then_resume(client, task_id, first_part=4)  # QUEUED or RUNNING, then some tokens
    partials = [s for s in states if s.result.partial]
    if not partials and states[-1].status == result_pb2.TASK_STATUS_FAILED:
        pytest.skip(f"the worker does not stream `generate` yet (worker streaming is helper B's part): {states[-1]}")
    assert_complete(states)
    final = states[-1]
    assert final.status == result_pb2.TASK_STATUS_SUCCEEDED and not final.result.partial
    assert final.sequence == events.FIRST_PARTIAL_SEQUENCE + len(partials)
    assert all(s.status == result_pb2.TASK_STATUS_RUNNING for s in partials)
    tokens = [tensor(s.result, "TEXT").string_data[0] for s in partials]
    assert len(tokens) >= 4 and "".join(tokens) == tensor(final.result, "TEXT").string_data[0]
    # A watcher that comes late, and one that resumes after QUEUED, see the whole text too.
    everything = client.notifier.WatchTask(
        notifier_pb2.WatchTaskRequest(task_id=task_id, after_sequence=events.QUEUED_SEQUENCE), timeout=10
    )
    replayed = [u.state async for u in everything]
    assert [s.sequence for s in replayed] == list(range(events.RUNNING_SEQUENCE, final.sequence + 1))


async def test_watch_tasks_gets_each_tasks_terminal_update_exactly_once(client: MeshClient) -> None:
    task_ids = await client.submit_many("sleep", [f"task {i}" for i in range(20)], parameters={"delay_ms": "200"})
    request = notifier_pb2.WatchTasksRequest(tasks=[notifier_pb2.WatchTaskRequest(task_id=t) for t in task_ids])
    updates = [u.state async for u in client.notifier.WatchTasks(request, timeout=60)]
    terminal = [s.task_id for s in updates if events.is_terminal(s.status)]
    assert sorted(terminal) == sorted(task_ids)  # each exactly once, and the stream ended after the last
    for task_id in task_ids:
        mine = [s.sequence for s in updates if s.task_id == task_id]
        assert mine == sorted(set(mine)), (task_id, mine)
    assert all(s.status == result_pb2.TASK_STATUS_SUCCEEDED for s in updates if events.is_terminal(s.status))


async def test_watch_tasks_refuses_a_repeated_task(client: MeshClient) -> None:
    task_id = await client.submit("sleep", "twice")
    request = notifier_pb2.WatchTasksRequest(tasks=[notifier_pb2.WatchTaskRequest(task_id=task_id)] * 2)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.notifier.WatchTasks(request, timeout=10).read()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await asyncio.wait_for(client.result(task_id), 60)


async def test_a_batch_priority_task_shows_queued_then_its_result(client: MeshClient) -> None:
    # Batch tasks travel on their own topic; the notifier reads it too, so the task is known from its record.
    task_id = await client.submit("sleep", "later", priority=task_pb2.PRIORITY_BATCH, parameters={"delay_ms": "500"})
    states = await client.updates(task_id)
    assert states[-1].status == result_pb2.TASK_STATUS_SUCCEEDED
    reply = await client.notifier.GetTask(notifier_pb2.GetTaskRequest(task_id=task_id), timeout=10)
    assert reply.state.model_name == "sleep" and reply.state.HasField("submitted_at")  # from the batch task record
