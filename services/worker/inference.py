"""The worker's one adapter over Triton: a task's input is a text (the model's TEXT input) or named tensors in raw
form, outputs come back as named tensors (typed for a text, raw for tensors), and every transport error becomes an
InferenceFailed that says whether a retry could help."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
import numpy as np
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import InferInput
from tritonclient.utils import InferenceServerException

from aimesh import tracing
from aimesh.errors import AimeshError
from aimesh.v1 import result_pb2

from .tensor_io import INPUT_NAME, Row, RowsMismatch, inputs_of, outputs_of

log = logging.getLogger(__name__)

# What a streaming (decoupled) model's responses carry: one TEXT tensor of the new text, and on the last one the
# response parameter Triton names its final-response flag with.
STREAM_OUTPUT_NAME = "TEXT"
FINAL_RESPONSE_PARAMETER = "triton_final_response"
MAX_QUEUE_TIMEOUT_S = 24 * 3600.0

_RETRYABLE_CODES = {
    grpc.StatusCode.UNAVAILABLE.name: result_pb2.ERROR_CODE_UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED.name: result_pb2.ERROR_CODE_UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED.name: result_pb2.ERROR_CODE_DEADLINE_EXCEEDED,
}
# What gRPC answers when the server cannot be reached (refused, reset, no route) or is going away.
_UNREACHABLE = grpc.StatusCode.UNAVAILABLE.name
_PERMANENT_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT.name: result_pb2.ERROR_CODE_INVALID_INPUT,
    grpc.StatusCode.NOT_FOUND.name: result_pb2.ERROR_CODE_MODEL_NOT_FOUND,
    grpc.StatusCode.UNIMPLEMENTED.name: result_pb2.ERROR_CODE_MODEL_NOT_FOUND,
}


class InferenceFailed(AimeshError):
    """A Triton call that did not produce outputs. ``unreachable``: the server could not be reached or dropped the
    call (gRPC UNAVAILABLE), so the same request may succeed on another server."""

    def __init__(
        self, code: result_pb2.ErrorCode.ValueType, message: str, *, retryable: bool, unreachable: bool = False
    ) -> None:
        super().__init__(message)
        self.code = code
        self.retryable = retryable
        self.unreachable = unreachable

    def to_proto(self) -> result_pb2.TaskError:
        return result_pb2.TaskError(code=self.code, message=str(self), retryable=self.retryable)


@dataclass(frozen=True)
class Inference:
    output: result_pb2.TaskOutput
    model_version: str


@dataclass(frozen=True)
class ModelInfo:
    """What the worker needs of a model's configuration, asked of Triton once per model and version."""

    decoupled: bool  # model_transaction_policy { decoupled: true }: served over the streaming API, one task a request
    priority_levels: int  # dynamic_batching priority_levels (0: none): request priorities are only sent when >= 2
    max_batch_size: int = 1  # 0: the model does not batch, a request's tensors are one task's whole tensors


@dataclass(frozen=True)
class Token:
    """One response of a streaming model: the text it adds, and whether Triton flagged it as the last."""

    text: str
    final: bool
    model_version: str


def _classify(e: InferenceServerException) -> InferenceFailed:
    status = (e.status() or "").removeprefix("StatusCode.")
    message = e.message() or str(e)
    if status in _RETRYABLE_CODES:
        return InferenceFailed(_RETRYABLE_CODES[status], message, retryable=True, unreachable=status == _UNREACHABLE)
    # Triton answers an unknown or unloaded model with a plain error status; its message is the only signal.
    if "unknown model" in message or "is not found" in message:
        return InferenceFailed(result_pb2.ERROR_CODE_MODEL_NOT_FOUND, message, retryable=False)
    if status in _PERMANENT_CODES:
        return InferenceFailed(_PERMANENT_CODES[status], message, retryable=False)
    return InferenceFailed(result_pb2.ERROR_CODE_MODEL_ERROR, message, retryable=False)


def _classify_rpc(e: grpc.aio.AioRpcError) -> InferenceFailed:
    """A stream cut by a gRPC status (the connection lost, the deadline reached)."""
    name = e.code().name
    message = e.details() or name
    if name in _RETRYABLE_CODES:
        return InferenceFailed(_RETRYABLE_CODES[name], message, retryable=True, unreachable=name == _UNREACHABLE)
    if name in _PERMANENT_CODES:
        return InferenceFailed(_PERMANENT_CODES[name], message, retryable=False)
    return InferenceFailed(result_pb2.ERROR_CODE_MODEL_ERROR, message, retryable=False)


# How long a stream's call may take to end after its final response before it is cancelled instead.
STREAM_END_WAIT_S = 2.0


async def _ended(responses: Any) -> None:
    """Wait for Triton to end a stream's call after its final response (the request side half-closed), reading and
    dropping anything more. Cancelling the call instead works too, but Triton's gRPC server then keeps about a
    kilobyte of each such stream's state for good (docs/soak.md, "the generate streams"); one that does not end
    within STREAM_END_WAIT_S is cancelled by the caller all the same."""

    async def drain() -> None:
        async for _ in responses:
            pass

    try:
        await asyncio.wait_for(drain(), STREAM_END_WAIT_S)
    except (TimeoutError, grpc.aio.AioRpcError) as e:
        log.debug("a stream's call did not end cleanly after its final response: %s", e)


def _classify_stream_error(message: str, *, tokens: int) -> InferenceFailed:
    """An error response inside a stream. Triton passes only the message, not the model's error code: an error
    before the first token is the model refusing the request (its parameters, say), one naming an unknown model is
    MODEL_NOT_FOUND, a model unloading (Triton stopping) is worth retrying, anything else is a model error."""
    if "unknown model" in message or "is not found" in message:
        return InferenceFailed(result_pb2.ERROR_CODE_MODEL_NOT_FOUND, message, retryable=False)
    if "unloading" in message or "unavailable" in message.lower():
        return InferenceFailed(result_pb2.ERROR_CODE_UNAVAILABLE, message, retryable=True)
    if tokens == 0:
        return InferenceFailed(result_pb2.ERROR_CODE_INVALID_INPUT, message, retryable=False)
    return InferenceFailed(result_pb2.ERROR_CODE_MODEL_ERROR, message, retryable=False)


class Triton(Protocol):
    """What the worker asks of Triton: one server (TritonInference) or several (``triton_pool.TritonPool``)."""

    @property
    def url(self) -> str: ...

    async def is_ready(self, timeout_s: float = 2.0) -> bool: ...

    async def infer_batch(
        self,
        model_name: str,
        rows: Sequence[Row],
        *,
        model_version: str = "",
        parameters: dict[str, str] | None = None,
        timeout_s: float,
        queue_timeout_s: float | None = None,
        metadata: dict[str, str] | None = None,
        priority: int = 0,
    ) -> list[Inference]: ...

    async def model_info(self, model_name: str, model_version: str = "", *, timeout_s: float = 10.0) -> ModelInfo: ...

    def stream(
        self,
        model_name: str,
        text: str,
        *,
        model_version: str = "",
        parameters: dict[str, str] | None = None,
        timeout_s: float,
        stop: asyncio.Event,
        metadata: dict[str, str] | None = None,
    ) -> AsyncGenerator[Token, None]: ...

    async def close(self) -> None: ...


class TritonInference:
    """Async client of one Triton gRPC target (one server, or a ``dns:///`` name gRPC balances). Use as
    ``async with TritonInference(url) as triton``; it connects at the first call at the latest.

    ``channel_args`` replaces tritonclient's channel options (its defaults: no message size limit, keepalive)."""

    def __init__(self, url: str, *, channel_args: Sequence[tuple[str, Any]] | None = None) -> None:
        self.url = url
        self.channel_args = list(channel_args) if channel_args is not None else None
        self._client: triton_aio.InferenceServerClient | None = None
        self._closed = False
        self._models: dict[tuple[str, str], ModelInfo] = {}

    async def __aenter__(self) -> TritonInference:
        self._require()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        self._closed = True
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
        rows: Sequence[Row],
        *,
        model_version: str = "",
        parameters: dict[str, str] | None = None,
        timeout_s: float,
        queue_timeout_s: float | None = None,
        metadata: dict[str, str] | None = None,
        priority: int = 0,
    ) -> list[Inference]:
        """Run ``texts`` through a model as one request (one row each, in order); raise InferenceFailed on any
        error. ``queue_timeout_s`` asks Triton to drop the request if it waits that long in the model's queue
        (models that allow the override), which is how a near deadline reaches the server. ``priority`` is Triton's
        request priority (1 is the highest; 0: the model's default level), for models with priority levels."""
        inputs = inputs_of(rows)
        # Never longer than the call may last, nor a day: Triton's int64 microseconds stay in range whatever is passed.
        queue_timeout_us = (
            None
            if queue_timeout_s is None
            else max(1, int(min(queue_timeout_s, timeout_s, MAX_QUEUE_TIMEOUT_S) * 1_000_000))
        )
        try:
            result = await self._require().infer(
                model_name,
                inputs,
                model_version=model_version,
                parameters=dict(parameters or {}),
                timeout=queue_timeout_us,
                priority=priority,
                client_timeout=timeout_s,
                headers=metadata if metadata is not None else tracing.grpc_metadata(),
            )
        except InferenceServerException as e:
            raise _classify(e) from e
        response = result.get_response()
        try:
            outputs = outputs_of(result, rows)
        except RowsMismatch as e:
            raise InferenceFailed(result_pb2.ERROR_CODE_MODEL_ERROR, str(e), retryable=False) from e
        return [Inference(output=output, model_version=response.model_version) for output in outputs]

    async def model_info(self, model_name: str, model_version: str = "", *, timeout_s: float = 10.0) -> ModelInfo:
        """The model's configuration as far as the worker cares, asked of Triton once and cached. Raises
        InferenceFailed (MODEL_NOT_FOUND for a model Triton does not serve, UNAVAILABLE when it cannot be asked)."""
        key = (model_name, model_version)
        info = self._models.get(key)
        if info is None:
            try:
                answer = await self._require().get_model_config(
                    model_name, model_version, as_json=True, client_timeout=timeout_s
                )
            except InferenceServerException as e:
                raise _classify(e) from e
            config = answer.get("config", {}) if isinstance(answer, dict) else {}
            batching = config.get("dynamic_batching") or {}
            info = ModelInfo(
                decoupled=bool((config.get("model_transaction_policy") or {}).get("decoupled", False)),
                priority_levels=int(batching.get("priority_levels", 0) or 0),
                max_batch_size=int(config.get("max_batch_size", 0) or 0),
            )
            self._models[key] = info
        return info

    async def stream(
        self,
        model_name: str,
        text: str,
        *,
        model_version: str = "",
        parameters: dict[str, str] | None = None,
        timeout_s: float,
        stop: asyncio.Event,
        metadata: dict[str, str] | None = None,
    ) -> AsyncGenerator[Token, None]:
        """Run one prompt through a decoupled model over Triton's gRPC stream, yielding each response's new text.

        Ends after the response flagged final, or, once ``stop`` is set, at once with the request cancelled in
        Triton (the gRPC stream is cancelled; the model sees ``is_cancelled()``). ``timeout_s`` bounds the whole
        stream (gRPC deadline: DEADLINE_EXCEEDED, retryable). Raises InferenceFailed."""
        finished = asyncio.Event()
        requests = _stream_requests(model_name, text, model_version, parameters, finished)
        try:
            responses = self._require().stream_infer(
                requests,
                stream_timeout=timeout_s,
                headers=metadata if metadata is not None else tracing.grpc_metadata(),
            )
        except InferenceServerException as e:
            raise _classify(e) from e
        tokens = 0
        stopped = asyncio.ensure_future(stop.wait())
        try:
            while True:
                following = asyncio.ensure_future(responses.__anext__())
                await asyncio.wait({following, stopped}, return_when=asyncio.FIRST_COMPLETED)
                if not following.done():
                    following.cancel()
                    responses.cancel()
                    return
                token = _token_of(following, tokens)
                tokens += 1
                yield token
                if token.final:
                    finished.set()
                    await _ended(responses)
                    return
        finally:
            stopped.cancel()
            finished.set()
            responses.cancel()

    def _require(self) -> triton_aio.InferenceServerClient:
        if self._client is None:
            if self._closed:
                raise RuntimeError(f"TritonInference {self.url} is closed")
            # Created on the event loop: a grpc.aio channel belongs to the loop it was made on.
            self._client = triton_aio.InferenceServerClient(self.url, channel_args=self.channel_args)
        return self._client


def _stream_requests(
    model_name: str, text: str, model_version: str, parameters: dict[str, str] | None, finished: asyncio.Event
) -> AsyncIterator[dict[str, Any]]:
    """The request side of a stream: one request with ``text``, then open until ``finished`` is set."""
    data = np.array([[text.encode("utf-8")]], dtype=np.object_)
    tensor = InferInput(INPUT_NAME, list(data.shape), "BYTES")
    tensor.set_data_from_numpy(data)

    async def requests() -> AsyncIterator[dict[str, Any]]:
        yield {
            "model_name": model_name,
            "inputs": [tensor],
            "model_version": model_version,
            "parameters": dict(parameters or {}),
        }
        # The request side stays open until the final response, then half-closes so that Triton ends the call.
        await finished.wait()

    return requests()


def _token_of(following: asyncio.Future[Any], tokens: int) -> Token:
    """The token of a stream's next response (``tokens``: how many came before it), or the failure it carries."""
    try:
        result, error = following.result()
    except StopAsyncIteration:
        raise InferenceFailed(
            result_pb2.ERROR_CODE_UNAVAILABLE, "the stream ended without a final response", retryable=True
        ) from None
    except grpc.aio.AioRpcError as e:
        raise _classify_rpc(e) from e
    if error is not None:
        raise _classify_stream_error(error.message() or str(error), tokens=tokens)
    assert result is not None
    response = result.get_response()
    array = result.as_numpy(STREAM_OUTPUT_NAME)
    values = [] if array is None else array.reshape(-1).tolist()
    piece = "".join(v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in values)
    final_parameter = response.parameters.get(FINAL_RESPONSE_PARAMETER)
    return Token(piece, final_parameter is not None and final_parameter.bool_param, response.model_version)
