"""The claim check's decisions in ingest and the worker, against an in-memory store at the ObjectStore seam (the
real store is tested in tests/integration/test_object_store.py and test_claim_check.py)."""

from __future__ import annotations

import hashlib

import pytest

from aimesh.ingest.claim_check import ClaimCheck as IngestClaimCheck
from aimesh.objects import (
    DigestMismatch,
    ObjectNotFound,
    ObjectStoreUnavailable,
    StoredObject,
    output_key,
    upload_key,
)
from aimesh.v1 import result_pb2, task_pb2, tensor_pb2
from aimesh.worker.claim_check import ClaimCheck as WorkerClaimCheck
from aimesh.worker.inference import InferenceFailed, ModelInfo


class MemoryStore:
    """The ObjectStore methods the claim check calls, over a dict; ``down`` makes every call unavailable."""

    bucket = "aimesh"

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise ObjectStoreUnavailable("connection refused")

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> StoredObject:
        self._check()
        self.objects[key] = bytes(data)
        return StoredObject(self.bucket, key, len(data), hashlib.sha256(data).hexdigest(), content_type)

    def head(self, key: str) -> StoredObject:
        self._check()
        if key not in self.objects:
            raise ObjectNotFound(key)
        data = self.objects[key]
        return StoredObject(self.bucket, key, len(data), hashlib.sha256(data).hexdigest())

    def get(self, ref: StoredObject) -> bytes:
        self._check()
        if ref.key not in self.objects:
            raise ObjectNotFound(ref.key)
        data = self.objects[ref.key]
        if hashlib.sha256(data).hexdigest() != ref.sha256:
            raise DigestMismatch(f"{ref.key}: SHA-256 differs")
        return data


def referenced(store: MemoryStore, key: str, data: bytes) -> tensor_pb2.InputTensor:
    ref = store.put(key, data).to_proto()
    return tensor_pb2.InputTensor(name="X", datatype="UINT8", shape=[len(data)], object=ref)


def task_with(*inputs: tensor_pb2.InputTensor) -> task_pb2.AITaskEvent:
    return task_pb2.AITaskEvent(
        task_id="7c1f3f0e-0000-4000-8000-000000000001",
        tenant="acme",
        input=task_pb2.TaskInput(tensors=task_pb2.Tensors(tensors=inputs)),
    )


BATCHING = ModelInfo(decoupled=False, priority_levels=0, max_batch_size=8)


async def test_the_worker_fetches_a_referenced_input_and_checks_it() -> None:
    store = MemoryStore()
    claim = WorkerClaimCheck(store, inline_limit_bytes=4)  # type: ignore[arg-type]
    row = await claim.row_of(task_with(referenced(store, "inputs/acme/u1", b"\1\2\3\4\5")), BATCHING)
    assert row.batched and row.tensors[0].raw_contents == b"\1\2\3\4\5"

    tampered = referenced(store, "inputs/acme/u2", b"abc")
    store.objects["inputs/acme/u2"] = b"abd"
    with pytest.raises(InferenceFailed) as info:
        await claim.row_of(task_with(tampered), BATCHING)
    assert info.value.code == result_pb2.ERROR_CODE_DIGEST_MISMATCH and not info.value.retryable

    store.down = True
    with pytest.raises(InferenceFailed) as info:
        await claim.row_of(task_with(tampered), BATCHING)
    assert info.value.code == result_pb2.ERROR_CODE_UNAVAILABLE and info.value.retryable  # tried again later


async def test_the_worker_refuses_what_it_cannot_serve() -> None:
    store = MemoryStore()
    without_store = WorkerClaimCheck(None, inline_limit_bytes=4)
    with pytest.raises(InferenceFailed) as info:
        await without_store.row_of(task_with(referenced(store, "inputs/acme/u1", b"xy")), BATCHING)
    assert info.value.code == result_pb2.ERROR_CODE_INVALID_INPUT and not info.value.retryable

    short = tensor_pb2.InputTensor(name="X", datatype="FP32", shape=[2], raw_contents=b"\0" * 7)
    with pytest.raises(InferenceFailed) as info:
        await without_store.row_of(task_with(short), BATCHING)
    assert info.value.code == result_pb2.ERROR_CODE_INVALID_INPUT and "takes 8" in str(info.value)


async def test_the_worker_stores_large_outputs_once_under_a_key_of_their_task() -> None:
    store = MemoryStore()
    claim = WorkerClaimCheck(store, inline_limit_bytes=4)  # type: ignore[arg-type]
    task = task_with()
    output = result_pb2.TaskOutput(
        tensors=[
            result_pb2.OutputTensor(name="BIG", datatype="UINT8", shape=[5], raw_contents=b"12345"),
            result_pb2.OutputTensor(name="SMALL", datatype="UINT8", shape=[4], raw_contents=b"1234"),
        ]
    )
    await claim.offload(task, output)
    big, small = output.tensors
    assert not big.raw_contents and big.object.key == output_key("acme", task.task_id, "BIG")
    assert big.object.sha256 == hashlib.sha256(b"12345").hexdigest() and big.object.size == 5
    assert small.raw_contents == b"1234" and not small.HasField("object")

    again = result_pb2.TaskOutput(tensors=[result_pb2.OutputTensor(name="BIG", raw_contents=b"54321")])
    await claim.offload(task, again)  # the task run again (a crash before its commit): the first output stays
    assert (
        list(store.objects) == [output_key("acme", task.task_id, "BIG")] and store.objects[big.object.key] == b"12345"
    )
    assert again.tensors[0].object == big.object and not again.tensors[0].raw_contents


async def test_ingest_moves_large_inline_contents_to_the_store_and_checks_references() -> None:
    store = MemoryStore()
    claim = IngestClaimCheck(store, inline_limit_bytes=4, max_object_bytes=100)  # type: ignore[arg-type]
    inline = tensor_pb2.InputTensor(name="X", datatype="UINT8", shape=[6], raw_contents=b"abcdef")
    small = tensor_pb2.InputTensor(name="Y", datatype="UINT8", shape=[2], raw_contents=b"ab")
    assert await claim.place([inline, small], "acme", "t") == []
    assert inline.WhichOneof("contents") == "object" and inline.object.key.startswith("inputs/acme/")
    assert store.objects[inline.object.key] == b"abcdef"
    assert small.WhichOneof("contents") == "raw_contents"

    own = referenced(store, upload_key("acme", "u1"), b"xyz")
    foreign = referenced(store, upload_key("other", "u2"), b"xyz")
    missing = referenced(store, upload_key("acme", "u3"), b"xyz")
    del store.objects[missing.object.key]
    wrong_size = referenced(store, upload_key("acme", "u4"), b"xyz")
    wrong_size.object.size = 4
    found = dict(await claim.place([own, foreign, missing, wrong_size], "acme", "t"))
    assert found == {
        "t[1].object": "names no object of this tenant: upload it with UploadInput",
        "t[2].object.key": "no such object (never uploaded, or expired)",
        "t[3].object.size": "the object is 3 bytes, not 4",
    }

    store.down = True
    with pytest.raises(ObjectStoreUnavailable):
        await claim.place(
            [tensor_pb2.InputTensor(name="X", datatype="UINT8", shape=[6], raw_contents=b"abcdef")], "acme", "t"
        )
    assert await claim.place([small], "acme", "t") == []  # small contents never touch the store


async def test_ingest_without_a_store_refuses_references() -> None:
    claim = IngestClaimCheck(None, inline_limit_bytes=4, max_object_bytes=100)
    ref = tensor_pb2.InputTensor(
        name="X", datatype="UINT8", shape=[3], object=tensor_pb2.ObjectRef(key="inputs/acme/u")
    )
    assert await claim.place([ref], "acme", "t") == [
        ("t[0].object", "this mesh runs without an object store: send the contents inline")
    ]
