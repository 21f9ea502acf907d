"""How ``TritonInference.stream`` ends a stream's gRPC call, against a fake call at tritonclient's seam: a stream
read to its final response half-closes its request side and lets the server end the call (a cancelled call costs
Triton memory it keeps: docs/soak.md); a call is cancelled only when the task stops it or the server does not end it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
from tritonclient.grpc import service_pb2

from aimesh.worker import inference
from aimesh.worker.inference import FINAL_RESPONSE_PARAMETER, TritonInference


class FakeResult:
    def __init__(self, text: str, *, final: bool) -> None:
        self._text = text
        self._response = service_pb2.ModelInferResponse(model_version="1")
        if final:
            self._response.parameters[FINAL_RESPONSE_PARAMETER].bool_param = True

    def get_response(self) -> service_pb2.ModelInferResponse:
        return self._response

    def as_numpy(self, name: str) -> np.ndarray[Any, Any]:
        return np.array([[self._text.encode()]], dtype=np.object_)


class FakeCall:
    """A ModelStreamInfer call as Triton serves it: it reads the request side, sends ``pieces`` (the last flagged
    final unless ``final`` is unset, then nothing while ``hold`` is set), and ends the call once the request side is
    half-closed; ``cancel`` after that does nothing, as on a real call."""

    def __init__(self, requests: AsyncIterator[dict[str, Any]], pieces: list[str], *, hold: bool, final: bool) -> None:
        self.cancelled = False
        self.ended = False
        self.half_closed = asyncio.Event()
        self._requests = requests
        self._pending = [FakeResult(p, final=final and i == len(pieces) - 1) for i, p in enumerate(pieces)]
        self._hold = hold
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for _ in self._requests:
            pass
        self.half_closed.set()

    def __aiter__(self) -> FakeCall:
        return self

    async def __anext__(self) -> tuple[FakeResult, None]:
        if self._pending:
            await asyncio.sleep(0)
            return self._pending.pop(0), None
        if self._hold:
            await asyncio.Event().wait()
        await self.half_closed.wait()
        self.ended = True
        raise StopAsyncIteration

    def cancel(self) -> bool:  # as gRPC's: a call that has ended is not cancelled
        if self.ended:
            return False
        self.cancelled = True
        self._reader.cancel()
        return True


class FakeClient:
    def __init__(self, pieces: list[str], *, hold: bool = False, final: bool = True) -> None:
        self.pieces = pieces
        self.hold = hold
        self.final = final
        self.calls: list[FakeCall] = []

    def stream_infer(self, requests: AsyncIterator[dict[str, Any]], **_: Any) -> FakeCall:
        self.calls.append(FakeCall(requests, self.pieces, hold=self.hold, final=self.final))
        return self.calls[-1]


def triton_with(client: FakeClient) -> TritonInference:
    triton = TritonInference("127.0.0.1:1")
    triton._client = client  # type: ignore[assignment]
    return triton


async def tokens_of(triton: TritonInference, stop: asyncio.Event | None = None) -> list[str]:
    return [t.text async for t in triton.stream("generate", "a prompt", timeout_s=5, stop=stop or asyncio.Event())]


async def test_a_whole_stream_ends_its_call_by_half_closing_not_by_cancelling() -> None:
    client = FakeClient([" the", " worker", " asks"])

    assert await tokens_of(triton_with(client)) == [" the", " worker", " asks"]

    (call,) = client.calls
    assert call.half_closed.is_set()
    assert not call.cancelled


async def test_a_call_the_server_does_not_end_after_the_final_response_is_cancelled_after_a_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(inference, "STREAM_END_WAIT_S", 0.05)
    client = FakeClient([" one"], hold=True)

    assert await asyncio.wait_for(tokens_of(triton_with(client)), 5) == [" one"]

    assert client.calls[0].cancelled


async def test_a_stopped_stream_cancels_its_call() -> None:
    client = FakeClient([" one"], hold=True, final=False)
    triton, stop, seen = triton_with(client), asyncio.Event(), []
    async for token in triton.stream("generate", "a prompt", timeout_s=5, stop=stop):
        seen.append(token.text)
        stop.set()

    assert seen == [" one"]
    assert client.calls[0].cancelled
