"""CancelTask against the running mesh: the notifier publishes the request to the cancellations topic and the
task ends CANCELLED; an ended task is left alone; an unknown task is NOT_FOUND."""

from __future__ import annotations

import uuid

import grpc
import pytest

from aimesh import events
from aimesh.devstack.stack import Stack
from aimesh.v1 import notifier_pb2, result_pb2

from .mesh_client import MeshClient, TopicReader

pytestmark = pytest.mark.integration


def cancel(client: MeshClient, task_id: str):  # type: ignore[no-untyped-def]
    return client.notifier.CancelTask(notifier_pb2.CancelTaskRequest(task_id=task_id), timeout=30)


async def test_an_ended_task_is_already_ended(client: MeshClient) -> None:
    task_id = await client.submit("sleep", "quick")
    final = await client.result(task_id)
    reply = await cancel(client, task_id)
    assert reply.outcome == notifier_pb2.CANCEL_OUTCOME_ALREADY_ENDED
    assert reply.state.status == final.status == result_pb2.TASK_STATUS_SUCCEEDED


async def test_an_unknown_task_is_not_found(client: MeshClient) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await cancel(client, str(uuid.uuid4()))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_task_cancelled_right_after_submitting_is_requested_and_ends_cancelled(
    mesh: Stack, client: MeshClient
) -> None:
    # A slow stream: about 10 s of tokens, so the cancellation finds it queued or running.
    parameters = {"max_tokens": "100", "token_delay_ms": "100"}
    task_id = await client.submit("generate", "Cancel me", parameters=parameters)
    reply = await cancel(client, task_id)  # at once: the notifier may not have read the task yet, and waits
    assert reply.outcome == notifier_pb2.CANCEL_OUTCOME_REQUESTED
    assert reply.state.task_id == task_id and not events.is_terminal(reply.state.status)
    again = await cancel(client, task_id)
    assert again.outcome in (notifier_pb2.CANCEL_OUTCOME_REQUESTED, notifier_pb2.CANCEL_OUTCOME_ALREADY_ENDED)

    with TopicReader(mesh.kafka_bootstrap, mesh.topics.cancel_topic) as reader:
        records = [m for m in reader.read_to_end(30) if (m.key() or b"").decode() == task_id]
    cancels = [events.decode_cancel(m.value()) for m in records]
    assert len(cancels) >= 1 and all(c.task_id == task_id and c.tenant == "default" for c in cancels)

    # The worker honours it: the task ends CANCELLED (helper B's worker side of cancellation).
    final = await client.result(task_id, timeout_s=60)
    assert final.status == result_pb2.TASK_STATUS_CANCELLED, final
