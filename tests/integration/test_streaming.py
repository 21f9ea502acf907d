"""Token streaming through the real mesh: a decoupled Triton model (``generate``) run by the workers over
Triton's streaming API, each token published as a partial RUNNING update, then the whole text as the result."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import InferInput

from aimesh import events
from aimesh.devstack.stack import Stack
from aimesh.v1 import result_pb2
from aimesh.worker.results import derived_seed

from .mesh_client import MeshClient, TopicReader, task_updates

pytestmark = pytest.mark.integration

PROMPT = "The worker"


async def direct_tokens(stack: Stack, prompt: str, parameters: dict[str, str]) -> list[str]:
    """The tokens ``generate`` streams for this prompt and these parameters, straight from Triton."""
    assert stack.triton is not None
    client = triton_aio.InferenceServerClient(stack.triton.grpc_url)
    data = np.array([[prompt.encode()]], dtype=np.object_)
    tensor = InferInput("TEXT", list(data.shape), "BYTES")
    tensor.set_data_from_numpy(data)
    done = asyncio.Event()

    async def requests():  # type: ignore[no-untyped-def]
        yield {"model_name": "generate", "inputs": [tensor], "parameters": parameters}
        await done.wait()

    tokens: list[str] = []
    try:
        async for result, error in client.stream_infer(requests(), stream_timeout=60):
            assert error is None, error
            tokens.append(result.as_numpy("TEXT").reshape(-1)[0].decode())
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
    finally:
        done.set()
        await client.close()
    return tokens


def text_of(event: result_pb2.AIResultEvent) -> str:
    [tensor] = event.output.tensors
    assert (tensor.name, tensor.datatype) == ("TEXT", "BYTES")
    return "".join(tensor.string_data)


async def test_generate_streams_its_tokens_in_order_and_the_result_is_their_concatenation(
    mesh: Stack, client: MeshClient
) -> None:
    parameters = {"max_tokens": "24", "seed": "1", "token_delay_ms": "20"}
    expected = await direct_tokens(mesh, PROMPT, parameters)
    assert len(expected) > 3
    with TopicReader(mesh.kafka_bootstrap, mesh.topics.results_topic) as reader:
        task_id = await client.submit("generate", PROMPT, parameters=parameters)
        updates = await asyncio.to_thread(task_updates, reader, [task_id])
    records = updates[task_id]
    running = [e for e in records if e.status == result_pb2.TASK_STATUS_RUNNING and not e.partial]
    partials = [e for e in records if e.partial]
    [final] = [e for e in records if events.is_terminal(e.status)]
    print(f"{len(partials)} partial updates, then {result_pb2.TaskStatus.Name(final.status)} seq {final.sequence}")

    assert [e.sequence for e in running] == [events.RUNNING_SEQUENCE]
    assert all(e.status == result_pb2.TASK_STATUS_RUNNING for e in partials)
    # One partial per token, numbered from 3 in order, each holding just its token (a rerun would repeat them).
    assert [e.sequence for e in partials] == list(range(3, 3 + len(expected)))
    assert [text_of(e) for e in partials] == expected
    assert final.status == result_pb2.TASK_STATUS_SUCCEEDED and not final.partial
    assert final.sequence == 3 + len(expected)
    assert text_of(final) == "".join(text_of(e) for e in partials) == "".join(expected)
    assert records.index(final) == len(records) - 1  # the terminal result comes after every partial


async def test_a_task_without_a_seed_is_seeded_from_its_id(mesh: Stack, client: MeshClient) -> None:
    # What makes a rerun after a crash stream the same tokens under the same sequence numbers.
    with TopicReader(mesh.kafka_bootstrap, mesh.topics.results_topic) as reader:
        task_id = await client.submit("generate", PROMPT, parameters={"max_tokens": "12"})
        updates = await asyncio.to_thread(task_updates, reader, [task_id])
    partials = [text_of(e) for e in updates[task_id] if e.partial]
    [final] = [e for e in updates[task_id] if events.is_terminal(e.status)]
    assert final.status == result_pb2.TASK_STATUS_SUCCEEDED
    assert text_of(final) == "".join(partials) and final.sequence == 3 + len(partials)
    expected = await direct_tokens(mesh, PROMPT, {"max_tokens": "12", "seed": str(derived_seed(task_id))})
    assert partials == expected
