"""Cancellation through the real mesh: AICancelEvent records on the cancellations topic (what the notifier's
CancelTask writes; produced here directly, so these tests do not depend on the notifier) reach every worker."""

from __future__ import annotations

import asyncio
import time

import pytest

from aimesh import events
from aimesh.devstack.stack import Stack
from aimesh.v1 import result_pb2

from .mesh_client import MeshClient, TopicReader, cancel_record, produce_raw, task_record, task_updates
from .test_streaming import PROMPT, direct_tokens, text_of

pytestmark = pytest.mark.integration

# How long a worker's cancellations reader may take to see a record (it polls every 0.2 s).
CANCEL_PROPAGATION_S = 3.0


async def test_a_task_cancelled_before_a_worker_reaches_it_ends_cancelled_and_never_runs(mesh: Stack) -> None:
    cancelled_key, cancelled_value = task_record("sleep", "never run", parameters={"delay_ms": "10"})
    other_tenant_key, other_tenant_value = task_record("sleep", "runs anyway", parameters={"delay_ms": "10"})
    # The cancellations come first: the task is still "queued" (not yet written) when the workers learn of them.
    produce_raw(
        mesh.kafka_bootstrap,
        mesh.topics.cancel_topic,
        [cancel_record(cancelled_key), cancel_record(other_tenant_key, tenant="someone-else")],
    )
    await asyncio.sleep(CANCEL_PROPAGATION_S)
    with TopicReader(mesh.kafka_bootstrap, mesh.topics.results_topic) as reader:
        produce_raw(
            mesh.kafka_bootstrap,
            mesh.topics.tasks_topic,
            [(cancelled_key, cancelled_value), (other_tenant_key, other_tenant_value)],
        )
        updates = await asyncio.to_thread(task_updates, reader, [cancelled_key, other_tenant_key])

    [cancelled] = updates[cancelled_key]  # the terminal result alone: no RUNNING, it never ran
    assert cancelled.status == result_pb2.TASK_STATUS_CANCELLED
    assert "cancelled by the client before it ran" in cancelled.error.message
    assert cancelled.sequence == events.FIRST_PARTIAL_SEQUENCE and not cancelled.output.tensors
    # A cancellation whose tenant is not the task's is ignored.
    assert [e.status for e in updates[other_tenant_key]] == [
        result_pb2.TASK_STATUS_RUNNING,
        result_pb2.TASK_STATUS_SUCCEEDED,
    ]


async def test_a_streaming_task_cancelled_mid_stream_stops_in_triton_and_keeps_its_text(
    mesh: Stack, client: MeshClient
) -> None:
    parameters = {"max_tokens": "200", "seed": "1", "token_delay_ms": "100"}
    full = await direct_tokens(mesh, PROMPT, {**parameters, "token_delay_ms": "0"})
    assert len(full) >= 20, f"seed 1 streams only {len(full)} tokens now: pick another seed"
    with TopicReader(mesh.kafka_bootstrap, mesh.topics.results_topic) as reader:
        task_id = await client.submit("generate", PROMPT, parameters=parameters)
        before = await asyncio.to_thread(
            task_updates, reader, [task_id], until=lambda u: sum(e.partial for e in u[task_id]) >= 3
        )
        cancelled_at = time.monotonic()
        produce_raw(mesh.kafka_bootstrap, mesh.topics.cancel_topic, [cancel_record(task_id)])
        after = await asyncio.to_thread(task_updates, reader, [task_id])
        took_s = time.monotonic() - cancelled_at
    records = before[task_id] + after[task_id]
    partials = [e for e in records if e.partial]
    [final] = [e for e in records if events.is_terminal(e.status)]
    print(f"cancelled after {len(partials)} of {len(full)} tokens; CANCELLED result {took_s:.2f}s after the request")
    assert final.status == result_pb2.TASK_STATUS_CANCELLED
    assert "cancelled by the client while it ran" in final.error.message
    assert 3 <= len(partials) < len(full)
    assert text_of(final) == "".join(text_of(e) for e in partials) == "".join(full[: len(partials)])
    assert final.sequence == 3 + len(partials)
    assert took_s < 10  # the whole stream would take 20 s or more
