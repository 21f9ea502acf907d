"""A task's tensors in and out of the object store (claim check): inputs given by reference are fetched and their
SHA-256 verified before the task reaches Triton, and raw outputs over the inline limit are stored, the result
carrying their reference instead of their contents.

A fetch or store that fails because the store cannot be reached is a retryable UNAVAILABLE: the runner tries again
within the task's deadline, as for a Triton outage. A missing object or one whose digest differs fails the task
(INVALID_INPUT, DIGEST_MISMATCH). An output's key is derived from its task and name, and the first output stored
under it stays: a task run again after a crash takes the object its aborted attempt left instead of orphaning it,
and a late attempt does not replace the object a committed result names (short of two attempts storing at the same
moment).
"""

from __future__ import annotations

import asyncio

from aimesh import tensors
from aimesh.objects import (
    DigestMismatch,
    ObjectNotFound,
    ObjectStore,
    ObjectStoreUnavailable,
    StoredObject,
    output_key,
)
from aimesh.v1 import result_pb2, task_pb2, tensor_pb2

from .inference import InferenceFailed, ModelInfo
from .tensor_io import TensorRow


class ClaimCheck:
    """``store``: None when the mesh runs without one (a reference then fails the task). ``inline_limit_bytes``:
    larger raw outputs go to the store."""

    def __init__(self, store: ObjectStore | None, *, inline_limit_bytes: int) -> None:
        self._store = store
        self._inline_limit_bytes = inline_limit_bytes

    async def row_of(self, task: task_pb2.AITaskEvent, info: ModelInfo) -> TensorRow:
        """The task's tensors with their contents in hand, checked against their datatype and shape."""
        resolved = []
        for tensor in task.input.tensors.tensors:
            if tensor.WhichOneof("contents") == "object":
                tensor = await self._fetched(tensor)
            problem = tensors.contents_problem(tensor.datatype, tensor.shape, tensor.raw_contents)
            if problem:
                raise InferenceFailed(
                    result_pb2.ERROR_CODE_INVALID_INPUT, f"input {tensor.name}: {problem}", retryable=False
                )
            resolved.append(tensor)
        return TensorRow(tuple(resolved), batched=info.max_batch_size > 0)

    async def _fetched(self, tensor: tensor_pb2.InputTensor) -> tensor_pb2.InputTensor:
        if self._store is None:
            raise InferenceFailed(
                result_pb2.ERROR_CODE_INVALID_INPUT,
                f"input {tensor.name} is held by reference and this worker has no object store",
                retryable=False,
            )
        ref = StoredObject.from_proto(tensor.object)
        try:
            data = await asyncio.to_thread(self._store.get, ref)
        except ObjectStoreUnavailable as e:
            raise InferenceFailed(
                result_pb2.ERROR_CODE_UNAVAILABLE, f"input {tensor.name}: object store: {e}", retryable=True
            ) from e
        except ObjectNotFound as e:
            raise InferenceFailed(
                result_pb2.ERROR_CODE_INVALID_INPUT, f"input {tensor.name}: no object {ref.key}: {e}", retryable=False
            ) from e
        except DigestMismatch as e:
            raise InferenceFailed(
                result_pb2.ERROR_CODE_DIGEST_MISMATCH, f"input {tensor.name}: {e}", retryable=False
            ) from e
        return tensor_pb2.InputTensor(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape, raw_contents=data)

    async def offload(self, task: task_pb2.AITaskEvent, output: result_pb2.TaskOutput) -> None:
        """Move each raw output over the inline limit to the store (no store: left for the result's size check)."""
        if self._store is None:
            return
        for tensor in output.tensors:
            if len(tensor.raw_contents) <= self._inline_limit_bytes:
                continue
            key = output_key(task.tenant, task.task_id, tensor.name)
            try:
                stored = await asyncio.to_thread(self._stored_once, key, tensor.raw_contents)
            except ObjectStoreUnavailable as e:
                raise InferenceFailed(
                    result_pb2.ERROR_CODE_UNAVAILABLE, f"output {tensor.name}: object store: {e}", retryable=True
                ) from e
            tensor.ClearField("raw_contents")
            tensor.object.CopyFrom(stored.to_proto())

    def _stored_once(self, key: str, data: bytes) -> StoredObject:
        """The output at ``key``: the one an earlier attempt of the task stored, if any, else ``data`` stored now.
        The first output stored is the task's for good: an attempt that crashed before its transaction committed
        left a complete output of the same task, and a fenced worker finishing late must not replace the output a
        committed result names (that result would then read DATA_LOSS). Two attempts storing at the same moment can
        still both write; the digest check then turns a replaced output into DATA_LOSS, never into other bytes."""
        assert self._store is not None
        try:
            found = self._store.head(key)
        except ObjectNotFound:
            return self._store.put(key, data)
        if found.sha256:
            return found
        return self._store.put(key, data)  # written by something else, its digest unknown: ours replaces it
