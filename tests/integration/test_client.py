"""The client library against the real mesh (auth off): submit and wait, watch, get, cancel, streaming."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import grpc
import pytest

from aimesh import events
from aimesh.client import AsyncClient, Client, ClientError, TaskSpec
from aimesh.client.render import partial_text, text_output
from aimesh.devstack.stack import Stack
from aimesh.v1 import notifier_pb2, result_pb2

pytestmark = pytest.mark.integration

ARTICLE = (
    "Kafka keeps every accepted task durable until a worker has answered it. "
    "The cafeteria menu changed on Tuesday. "
    "Workers pull tasks from Kafka and run inference on the Triton server. "
    "Results return through Kafka to the notifier, which streams them to subscribers."
)


@pytest.fixture
async def client(mesh: Stack) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(mesh.ingest_address, mesh.notifier_address) as c:
        yield c


def outputs(state: notifier_pb2.TaskState) -> dict[str, list[str]]:
    return {t.name: list(t.string_data) for t in state.result.output.tensors}


async def test_submit_and_result(client: AsyncClient) -> None:
    positive = await client.submit("sentiment", "I love how fast and friendly this is!")
    summary = await client.submit("summarize", ARTICLE, parameters={"sentences": "2"}, priority="batch")
    first = await client.result(positive, timeout_s=60)
    second = await client.result(summary, timeout_s=60)
    assert first.status == second.status == result_pb2.TASK_STATUS_SUCCEEDED, (first, second)
    assert outputs(first)["LABEL"] == ["positive"]
    assert "cafeteria" not in outputs(second)["SUMMARY"][0]
    assert (await client.get(positive)).status == result_pb2.TASK_STATUS_SUCCEEDED


async def test_watch_yields_increasing_sequences_ending_terminal(client: AsyncClient) -> None:
    task_id = await client.submit("sleep", "watch me", parameters={"delay_ms": "300"})
    updates = [state async for state in client.watch(task_id, timeout_s=60)]
    sequences = [u.sequence for u in updates]
    assert sequences == sorted(set(sequences)) and sequences[0] >= 1, sequences
    assert all(u.task_id == task_id for u in updates)
    assert [events.is_terminal(u.status) for u in updates] == [False] * (len(updates) - 1) + [True]
    assert updates[-1].status == result_pb2.TASK_STATUS_SUCCEEDED

    # Resuming after an update sends only the later ones.
    resumed = [state async for state in client.watch(task_id, after_sequence=sequences[0], timeout_s=30)]
    assert [u.sequence for u in resumed] == sequences[1:]


async def test_idempotent_submit_and_batches(client: AsyncClient) -> None:
    key = f"client-test-{uuid.uuid4()}"
    first = await client.submit_task(TaskSpec("sentiment", "fine", idempotency_key=key))
    again = await client.submit_task(TaskSpec("sentiment", "fine", idempotency_key=key))
    assert again.task_id == first.task_id and again.duplicate
    batch = await client.submit_many([TaskSpec("sentiment", f"text {i}") for i in range(3)])
    finals = [await client.result(answer.task_id, timeout_s=60) for answer in batch]
    assert all(f.status == result_pb2.TASK_STATUS_SUCCEEDED for f in finals)


async def test_errors_carry_the_grpc_code_and_details(client: AsyncClient) -> None:
    with pytest.raises(ClientError) as info:
        await client.submit("sentiment", "")
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [field for field, _ in info.value.field_violations] == ["input.text"]
    with pytest.raises(ClientError) as info:
        await client.submit("no-such-model", "text")
    assert info.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(ClientError) as info:
        await client.get("not-a-uuid")
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_the_blocking_client(mesh: Stack) -> None:
    with Client(mesh.ingest_address, mesh.notifier_address) as client:
        task_id = client.submit("sentiment", "This is awful and broken.")
        updates = list(client.watch(task_id, timeout_s=60))
        assert updates[-1].status == result_pb2.TASK_STATUS_SUCCEEDED
        assert outputs(updates[-1])["LABEL"] == ["negative"]


async def test_cancel(client: AsyncClient) -> None:
    done = await client.submit("sentiment", "quick")
    await client.result(done, timeout_s=60)
    try:
        ended = await client.cancel(done)
    except ClientError as e:
        if e.code == grpc.StatusCode.UNIMPLEMENTED:
            pytest.skip("the notifier does not implement CancelTask yet")
        raise
    assert ended.outcome == notifier_pb2.CANCEL_OUTCOME_ALREADY_ENDED
    assert ended.state.status == result_pb2.TASK_STATUS_SUCCEEDED

    slow = await client.submit("generate", "Cancel me", parameters={"max_tokens": "100", "token_delay_ms": "100"})
    requested = await client.cancel(slow)
    assert requested.outcome in (notifier_pb2.CANCEL_OUTCOME_REQUESTED, notifier_pb2.CANCEL_OUTCOME_ALREADY_ENDED)
    final = await client.result(slow, timeout_s=60)
    if final.status == result_pb2.TASK_STATUS_FAILED:
        pytest.skip(f"the worker does not run streaming tasks yet: {final.result.error.message}")
    assert final.status == result_pb2.TASK_STATUS_CANCELLED, final


async def test_streamed_tokens_add_up_to_the_result(client: AsyncClient) -> None:
    task_id = await client.submit("generate", "The mesh", parameters={"max_tokens": "12", "seed": "7"})
    tokens: list[str] = []
    sequences: list[int] = []
    final: notifier_pb2.TaskState | None = None
    async for state in client.watch(task_id, timeout_s=60):
        sequences.append(state.sequence)
        if (text := partial_text(state)) is not None:
            tokens.append(text)
        final = state
    assert final is not None and events.is_terminal(final.status)
    if not tokens:
        pytest.skip(f"the worker does not stream yet (the task ended {result_pb2.TaskStatus.Name(final.status)})")
    assert final.status == result_pb2.TASK_STATUS_SUCCEEDED, final
    assert sequences == sorted(set(sequences))
    assert "".join(tokens) == text_output(final.result)
