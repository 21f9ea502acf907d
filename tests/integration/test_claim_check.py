"""Payloads larger than a Kafka record, by reference (claim check), through the real mesh and a real S3 server
(SeaweedFS): a 50 MB input and a 20 MB output pass with their digests verified, a tampered object fails its task
DIGEST_MISMATCH, another tenant's or a missing object is refused, and with the store stopped ingest answers
UNAVAILABLE for large inputs while small ones are still accepted and run."""

from __future__ import annotations

import asyncio
import hashlib
import uuid

import grpc
import numpy as np
import pytest
from PIL import Image

from aimesh import events
from aimesh.client import AsyncClient, input_tensor
from aimesh.devstack.stack import Stack
from aimesh.objects import upload_key
from aimesh.v1 import ingest_pb2, notifier_pb2, result_pb2, task_pb2, tensor_pb2

from .mesh_client import MeshClient, produce_raw, tensor
from .test_tensors import submit_tensors, violations

MB = 1024 * 1024


async def upload(client: MeshClient, data: bytes) -> tensor_pb2.ObjectRef:
    async def messages():  # type: ignore[no-untyped-def]
        yield ingest_pb2.UploadInputRequest(header=ingest_pb2.UploadHeader(size=len(data)))
        for start in range(0, len(data), MB):
            yield ingest_pb2.UploadInputRequest(chunk=data[start : start + MB])

    return (await client.ingest.UploadInput(messages(), timeout=120)).object


def referenced(name: str, datatype: str, shape: list[int], ref: tensor_pb2.ObjectRef) -> tensor_pb2.InputTensor:
    return tensor_pb2.InputTensor(name=name, datatype=datatype, shape=shape, object=ref)


async def test_a_50_mb_input_passes_by_reference_and_comes_back_bit_for_bit(mesh: Stack) -> None:
    values = np.frombuffer(np.random.default_rng(50).bytes(50 * MB), dtype=np.uint8)
    async with AsyncClient(mesh.ingest_address, mesh.notifier_address, timeout_s=120) as client:
        task_id = await client.submit("identity", tensors={"UINT8_1": values})
        state = await client.result(task_id, timeout_s=300)
        assert state.status == result_pb2.TASK_STATUS_SUCCEEDED, state.result.error
        (output,) = state.result.output.tensors
        assert output.HasField("object") and not output.raw_contents  # the result record holds the reference
        assert output.object.size == values.nbytes
        assert output.object.sha256 == hashlib.sha256(values.tobytes()).hexdigest()
        arrays = await client.outputs(state)
    assert arrays["OUT_UINT8_1"].tobytes() == values.tobytes()


async def test_a_20_mb_output_image_is_stored_and_downloaded_byte_identical(mesh: Stack, client: MeshClient) -> None:
    image = np.random.default_rng(20).integers(0, 256, size=(1100, 1300), dtype=np.uint8)
    task_id = await submit_tensors(client, "resize", input_tensor("IMAGE", image), parameters={"scale": "4"})
    result = await client.result(task_id, timeout_s=300)
    assert result.status == result_pb2.TASK_STATUS_SUCCEEDED, result.error
    resized = tensor(result, "IMAGE")
    assert resized.HasField("object") and resized.object.size == 4400 * 5200  # 22.9 MB

    expected = np.asarray(Image.fromarray(image).resize((5200, 4400), Image.Resampling.NEAREST))
    async with AsyncClient(mesh.ingest_address, mesh.notifier_address, timeout_s=120) as library:
        data = await library.download(task_id, "IMAGE")
    assert hashlib.sha256(data).hexdigest() == resized.object.sha256
    assert data == expected.tobytes()
    png = tensor(result, "PNG")  # its PNG, compressed, may be inline or by reference: either way it decodes
    assert png.HasField("object") or png.raw_contents


async def test_a_tampered_object_fails_its_task_with_digest_mismatch(mesh: Stack, client: MeshClient) -> None:
    data = np.random.default_rng(3).bytes(2 * MB)
    ref = await upload(client, data)
    assert ref.sha256 == hashlib.sha256(data).hexdigest()
    store = mesh.object_store_client()
    store.put(ref.key, b"\0" + data[1:])  # same size, other contents, behind the reference's back

    task_id = await submit_tensors(client, "identity", referenced("UINT8_1", "UINT8", [len(data)], ref))
    result = await client.result(task_id)
    assert result.status == result_pb2.TASK_STATUS_FAILED
    assert result.error.code == result_pb2.ERROR_CODE_DIGEST_MISMATCH and not result.error.retryable


async def test_a_reference_to_a_missing_or_foreign_object_is_invalid_argument(mesh: Stack, client: MeshClient) -> None:
    data = b"x" * 1000
    ref = await upload(client, data)
    foreign = tensor_pb2.ObjectRef()
    foreign.CopyFrom(ref)
    foreign.key = upload_key("someone-else", "0" * 8)
    missing = tensor_pb2.ObjectRef()
    missing.CopyFrom(ref)
    missing.key = ref.key + "-gone"
    for bad, says in [(foreign, "names no object of this tenant"), (missing, "no such object")]:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await submit_tensors(client, "identity", referenced("UINT8_1", "UINT8", [1000], bad))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert any(says in why for why in violations(info.value).values()), violations(info.value)


async def test_an_upload_whose_chunks_do_not_add_up_is_refused(mesh: Stack, client: MeshClient) -> None:
    async def short():  # type: ignore[no-untyped-def]
        yield ingest_pb2.UploadInputRequest(header=ingest_pb2.UploadHeader(size=10))
        yield ingest_pb2.UploadInputRequest(chunk=b"12345")

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.ingest.UploadInput(short(), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_without_the_store_large_inputs_are_unavailable_and_small_ones_still_run(
    mesh: Stack, client: MeshClient
) -> None:
    small = input_tensor("IMAGE", np.zeros((8, 8), np.uint8))
    large = input_tensor("UINT8_1", np.ones(2 * MB, np.uint8))
    mesh.stop_object_store()
    try:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await submit_tensors(client, "identity", large)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "object store" in (info.value.details() or "")
        result = await client.result(await submit_tensors(client, "digits", small))
        assert result.status == result_pb2.TASK_STATUS_SUCCEEDED, result.error
    finally:
        mesh.start_object_store()
    task_id = await submit_tensors(client, "identity", large)  # back: accepted again
    assert (await client.result(task_id, timeout_s=120)).status == result_pb2.TASK_STATUS_SUCCEEDED


async def test_a_worker_retries_a_fetch_until_the_store_is_back(mesh: Stack, client: MeshClient) -> None:
    data = np.random.default_rng(9).bytes(MB)
    ref = await upload(client, data)
    # Straight onto the tasks topic (as ingest writes it), so the record is there while the store is down.
    task = task_pb2.AITaskEvent(
        schema_version=events.SCHEMA_VERSION,
        task_id=str(uuid.uuid4()),
        model_name="identity",
        input=task_pb2.TaskInput(tensors=task_pb2.Tensors(tensors=[referenced("UINT8_1", "UINT8", [len(data)], ref)])),
        tenant="default",
    )
    task.submitted_at.GetCurrentTime()
    mesh.stop_object_store()
    try:
        produce_raw(mesh.kafka_bootstrap, mesh.topics.tasks_topic, [(task.task_id, task.SerializeToString())])
        await asyncio.sleep(3)  # the worker has the task and finds the store down: it retries, it does not fail
        state = (await client.notifier.GetTask(notifier_pb2.GetTaskRequest(task_id=task.task_id), timeout=10)).state
        assert state.status == result_pb2.TASK_STATUS_RUNNING, state
    finally:
        mesh.start_object_store()
    result = await client.result(task.task_id, timeout_s=120)
    assert result.status == result_pb2.TASK_STATUS_SUCCEEDED, result.error
    assert tensor(result, "OUT_UINT8_1").object.sha256 == ref.sha256  # 1 MiB: back by reference, the same bytes


async def test_an_upload_cut_off_midway_leaves_no_object_and_no_pending_upload(mesh: Stack, client: MeshClient) -> None:
    store = mesh.object_store_client()
    before = set(store.pending_uploads())
    sent = asyncio.Event()

    async def cut_off():  # type: ignore[no-untyped-def]
        yield ingest_pb2.UploadInputRequest(header=ingest_pb2.UploadHeader(size=20 * MB))
        for _ in range(10):  # half of it: ingest has begun the multipart upload
            yield ingest_pb2.UploadInputRequest(chunk=b"\1" * MB)
        sent.set()
        await asyncio.sleep(3600)  # the client goes silent, then its call is cancelled

    call = client.ingest.UploadInput(cut_off(), timeout=120)
    await asyncio.wait_for(sent.wait(), 60)
    await asyncio.sleep(1)
    call.cancel()
    for _ in range(60):  # ingest aborts it as the call ends
        if not set(store.pending_uploads()) - before:
            break
        await asyncio.sleep(0.5)
    # A multipart upload that was never completed holds no object, and none is left pending.
    assert not set(store.pending_uploads()) - before, "the cut-off upload was left pending in the store"


async def test_more_concurrent_uploads_than_threads_all_complete(mesh: Stack, client: MeshClient) -> None:
    # Each upload once held a thread of ingest's default executor (at most 32) for its whole length, feeding the
    # next chunk through another: 8 at once hung a 2-core ingest. 40 exceed the executor on any machine.
    blobs = [np.random.default_rng(100 + i).bytes(MB + i) for i in range(40)]
    refs = await asyncio.wait_for(asyncio.gather(*(upload(client, b) for b in blobs)), 120)
    assert [r.sha256 for r in refs] == [hashlib.sha256(b).hexdigest() for b in blobs]
