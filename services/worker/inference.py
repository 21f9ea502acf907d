"""The worker's one adapter over Triton: every model takes a TEXT input and returns named tensors, and
every transport error becomes an InferenceFailed that says whether a retry could help."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import InferInput
from tritonclient.utils import InferenceServerException

from aimesh import tracing
from aimesh.errors import AimeshError
from aimesh.v1 import result_pb2

log = logging.getLogger(__name__)

INPUT_NAME = "TEXT"

_RETRYABLE_CODES = {
    grpc.StatusCode.UNAVAILABLE.name: result_pb2.ERROR_CODE_UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED.name: result_pb2.ERROR_CODE_UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED.name: result_pb2.ERROR_CODE_DEADLINE_EXCEEDED,
}
_PERMANENT_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT.name: result_pb2.ERROR_CODE_INVALID_INPUT,
    grpc.StatusCode.NOT_FOUND.name: result_pb2.ERROR_CODE_MODEL_NOT_FOUND,
    grpc.StatusCode.UNIMPLEMENTED.name: result_pb2.ERROR_CODE_MODEL_NOT_FOUND,
}


class InferenceFailed(AimeshError):
    """A Triton call that did not produce outputs."""

    def __init__(self, code: result_pb2.ErrorCode.ValueType, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.code = code
        self.retryable = retryable

    def to_proto(self) -> result_pb2.TaskError:
        return result_pb2.TaskError(code=self.code, message=str(self), retryable=self.retryable)


@dataclass(frozen=True)
class Inference:
    output: result_pb2.TaskOutput
    model_version: str


def _classify(e: InferenceServerException) -> InferenceFailed:
    status = (e.status() or "").removeprefix("StatusCode.")
    message = e.message() or str(e)
    if status in _RETRYABLE_CODES:
        return InferenceFailed(_RETRYABLE_CODES[status], message, retryable=True)
    # Triton answers an unknown or unloaded model with a plain error status; its message is the only signal.
    if "unknown model" in message or "is not found" in message:
        return InferenceFailed(result_pb2.ERROR_CODE_MODEL_NOT_FOUND, message, retryable=False)
    if status in _PERMANENT_CODES:
        return InferenceFailed(_PERMANENT_CODES[status], message, retryable=False)
    return InferenceFailed(result_pb2.ERROR_CODE_MODEL_ERROR, message, retryable=False)


def to_output_tensor(name: str, datatype: str, array: npt.NDArray[Any]) -> result_pb2.OutputTensor:
    """One task's slice of a Triton output (batch dimension already removed) as an OutputTensor."""
    tensor = result_pb2.OutputTensor(name=name, datatype=datatype, shape=list(array.shape))
    flat = array.reshape(-1)
    if datatype == "BYTES":
        tensor.string_data.extend(
            v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in flat.tolist()
        )
    elif datatype.startswith("FP") or datatype == "BF16":
        tensor.float_data.extend(flat.astype(np.float32).tolist())
    else:
        tensor.int_data.extend(flat.astype(np.int64).tolist())
    return tensor


class TritonInference:
    """Async client of one Triton server. Use as ``async with TritonInference(url) as triton``."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._client: triton_aio.InferenceServerClient | None = None

    async def __aenter__(self) -> TritonInference:
        self._client = triton_aio.InferenceServerClient(self.url)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()

    async def is_ready(self, timeout_s: float = 2.0) -> bool:
        try:
            return bool(await self._require().is_server_ready(client_timeout=timeout_s))
        except InferenceServerException:
            return False

    async def infer_batch(
        self,
        model_name: str,
        texts: list[str],
        *,
        model_version: str = "",
        parameters: dict[str, str] | None = None,
        timeout_s: float,
        queue_timeout_s: float | None = None,
        metadata: dict[str, str] | None = None,
    ) -> list[Inference]:
        """Run ``texts`` through a model as one request (one row each, in order); raise InferenceFailed on any
        error. ``queue_timeout_s`` asks Triton to drop the request if it waits that long in the model's queue
        (models that allow the override), which is how a near deadline reaches the server."""
        data = np.array([[t.encode("utf-8")] for t in texts], dtype=np.object_)
        tensor = InferInput(INPUT_NAME, list(data.shape), "BYTES")
        tensor.set_data_from_numpy(data)
        queue_timeout_us = None if queue_timeout_s is None else max(1, int(queue_timeout_s * 1e6))
        try:
            result = await self._require().infer(
                model_name,
                [tensor],
                model_version=model_version,
                parameters=dict(parameters or {}),
                timeout=queue_timeout_us,
                client_timeout=timeout_s,
                headers=metadata if metadata is not None else tracing.grpc_metadata(),
            )
        except InferenceServerException as e:
            raise _classify(e) from e
        response = result.get_response()
        outputs: list[result_pb2.TaskOutput] = [result_pb2.TaskOutput() for _ in texts]
        for meta in response.outputs:
            array = result.as_numpy(meta.name)
            if array is None or len(array) != len(texts):
                raise InferenceFailed(
                    result_pb2.ERROR_CODE_MODEL_ERROR,
                    f"output {meta.name} has {0 if array is None else len(array)} rows for {len(texts)} inputs",
                    retryable=False,
                )
            for row, output in zip(array, outputs, strict=True):
                output.tensors.append(to_output_tensor(meta.name, meta.datatype, row))
        return [Inference(output=output, model_version=response.model_version) for output in outputs]

    def _require(self) -> triton_aio.InferenceServerClient:
        if self._client is None:
            raise RuntimeError("TritonInference is not open")
        return self._client
