"""Micro-batching in the worker, against a fake Triton at the TritonInference seam."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from triton_fakes import echoed
from tritonclient.utils import InferenceServerException

from aimesh.v1 import result_pb2
from aimesh.worker.batching import Batcher, BatchKey
from aimesh.worker.inference import Inference, InferenceFailed, TritonInference


class FakeTriton:
    """Answers each text with itself; ``bad`` texts fail the whole request as invalid input, ``unsendable`` ones
    make it raise before it is sent (as an out-of-range value does in tritonclient)."""

    url = "fake:8001"

    def __init__(
        self, *, bad: frozenset[str] = frozenset(), unsendable: frozenset[str] = frozenset(), delay_s: float = 0.02
    ) -> None:
        self.requests: list[list[str]] = []
        self.queue_timeouts: list[float | None] = []
        self._bad = bad
        self._unsendable = unsendable
        self._delay_s = delay_s

    async def infer_batch(
        self, model: str, texts: list[str], *, queue_timeout_s: float | None = None, **_: object
    ) -> list[Inference]:
        if self._unsendable & set(texts):
            raise ValueError("a value that cannot be turned into a request")
        self.requests.append(list(texts))
        self.queue_timeouts.append(queue_timeout_s)
        await asyncio.sleep(self._delay_s)
        if self._bad & set(texts):
            raise InferenceFailed(result_pb2.ERROR_CODE_INVALID_INPUT, "bad text", retryable=False)
        return echoed(texts)


def batcher(triton: FakeTriton, *, max_batch_size: int = 8, max_concurrent: int = 1) -> Batcher:
    return Batcher(triton, max_batch_size=max_batch_size, max_concurrent=max_concurrent, timeout_s=5)  # type: ignore[arg-type]


KEY = BatchKey.of("sleep", "", {})


async def test_tasks_that_start_together_share_a_request() -> None:
    triton = FakeTriton()
    b = batcher(triton, max_concurrent=4)
    results = await asyncio.gather(*(b.infer(KEY, f"t{i}", deadline=None, metadata={}) for i in range(5)))
    assert triton.requests == [[f"t{i}" for i in range(5)]]
    assert [r.inference.output.tensors[0].string_data[0] for r in results] == [f"t{i}" for i in range(5)]
    assert [r.batch_items for r in results] == [5] * 5


async def test_a_lone_task_is_sent_at_once_and_later_ones_wait_for_a_free_request() -> None:
    triton = FakeTriton(delay_s=0.05)
    b = batcher(triton, max_concurrent=1)
    first = asyncio.ensure_future(b.infer(KEY, "first", deadline=None, metadata={}))
    await asyncio.sleep(0.01)
    assert triton.requests == [["first"]]  # sent without waiting for company
    later = [asyncio.ensure_future(b.infer(KEY, f"t{i}", deadline=None, metadata={})) for i in range(3)]
    await asyncio.sleep(0.01)
    assert triton.requests == [["first"]]  # the one request allowed is outstanding
    await asyncio.gather(first, *later)
    assert triton.requests == [["first"], ["t0", "t1", "t2"]]


async def test_requests_hold_at_most_max_batch_size_and_keys_do_not_mix() -> None:
    triton = FakeTriton()
    b = batcher(triton, max_batch_size=2)
    other = BatchKey.of("sleep", "", {"delay_ms": "5"})
    await asyncio.gather(
        *(b.infer(KEY, f"a{i}", deadline=None, metadata={}) for i in range(5)),
        b.infer(other, "b0", deadline=None, metadata={}),
    )
    assert max(len(r) for r in triton.requests) == 2
    assert ["b0"] in triton.requests and all(r == ["b0"] or "b0" not in r for r in triton.requests)
    assert sorted(t for r in triton.requests for t in r) == sorted([f"a{i}" for i in range(5)] + ["b0"])


async def test_requests_hold_at_most_max_request_bytes_and_a_larger_text_goes_alone() -> None:
    triton = FakeTriton()
    b = Batcher(triton, max_batch_size=64, max_concurrent=4, max_request_bytes=1000, timeout_s=5)  # type: ignore[arg-type]
    texts = ["a" * 400, "é" * 200, "b" * 400, "c" * 5000, "d" * 10, "e" * 10]  # "é" is 2 bytes in UTF-8
    results = await asyncio.gather(*(b.infer(KEY, t, deadline=None, metadata={}) for t in texts))
    assert triton.requests == [texts[:2], [texts[2]], [texts[3]], texts[4:]]
    assert [r.inference.output.tensors[0].string_data[0] for r in results] == texts


async def neighbours_of_a_bad_row(triton: FakeTriton) -> list[object]:
    """Send "first" alone, then "x", "bad" and "y" together while it runs; what each of the three got."""
    b = batcher(triton)
    first = asyncio.ensure_future(b.infer(KEY, "first", deadline=None, metadata={}))
    await asyncio.sleep(0)
    rest = [asyncio.ensure_future(b.infer(KEY, t, deadline=None, metadata={})) for t in ("x", "bad", "y")]
    await first
    done = await asyncio.gather(*rest, return_exceptions=True)
    assert not isinstance(done[0], BaseException) and not isinstance(done[2], BaseException)
    return done


async def test_one_bad_input_does_not_fail_its_batch_neighbours() -> None:
    triton = FakeTriton(bad=frozenset({"bad"}))
    done = await neighbours_of_a_bad_row(triton)
    assert isinstance(done[1], InferenceFailed) and done[1].code == result_pb2.ERROR_CODE_INVALID_INPUT
    assert ["x", "bad", "y"] in triton.requests and ["x"] in triton.requests and ["y"] in triton.requests


async def test_a_row_whose_values_cannot_become_a_request_fails_alone() -> None:
    done = await neighbours_of_a_bad_row(FakeTriton(unsendable=frozenset({"bad"})))
    assert isinstance(done[1], ValueError)


async def test_a_cancelled_waiting_task_is_left_out_of_the_request() -> None:
    triton = FakeTriton()
    b = batcher(triton)
    first = asyncio.ensure_future(b.infer(KEY, "first", deadline=None, metadata={}))
    await asyncio.sleep(0)
    gone = asyncio.ensure_future(b.infer(KEY, "gone", deadline=None, metadata={}))
    kept = asyncio.ensure_future(b.infer(KEY, "kept", deadline=None, metadata={}))
    await asyncio.sleep(0)
    gone.cancel()
    await first
    await kept
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert triton.requests == [["first"], ["kept"]]


async def test_the_longest_deadline_becomes_the_requests_queue_timeout_within_the_call_timeout() -> None:
    triton = FakeTriton()
    b = batcher(triton)
    await b.infer(KEY, "no deadline", deadline=None, metadata={})
    first = asyncio.ensure_future(b.infer(KEY, "first", deadline=None, metadata={}))
    await asyncio.sleep(0)
    together = [
        asyncio.ensure_future(b.infer(KEY, "near", deadline=time.time() + 1.0, metadata={})),
        asyncio.ensure_future(b.infer(KEY, "far", deadline=time.time() + 3.0, metadata={})),
        asyncio.ensure_future(b.infer(KEY, "none", deadline=None, metadata={})),
    ]
    await asyncio.gather(first, *together)
    await asyncio.gather(
        b.infer(KEY, "near", deadline=time.time() + 1.0, metadata={}),
        b.infer(KEY, "far", deadline=time.time() + 3.0, metadata={}),
    )
    await b.infer(KEY, "absurd", deadline=1e13, metadata={})
    assert triton.requests[2:] == [["near", "far", "none"], ["near", "far"], ["absurd"]]
    assert triton.queue_timeouts[0] is None
    assert triton.queue_timeouts[2] is None  # a row without a deadline: Triton drops nothing
    assert 2.5 < (triton.queue_timeouts[3] or 0) <= 3.0  # the far row's, not the near one's
    assert triton.queue_timeouts[4] == 5.0  # never beyond the call's own timeout, whatever the record says


async def test_a_row_whose_deadline_passes_in_a_request_expires_alone_and_the_others_get_their_answer() -> None:
    triton = FakeTriton(delay_s=0.3)
    b = batcher(triton)
    near = asyncio.ensure_future(b.infer(KEY, "near", deadline=time.time() + 0.05, metadata={}))
    far = asyncio.ensure_future(b.infer(KEY, "far", deadline=time.time() + 10, metadata={}))
    done = await asyncio.gather(near, far, return_exceptions=True)
    assert isinstance(done[0], InferenceFailed)
    assert done[0].code == result_pb2.ERROR_CODE_DEADLINE_EXCEEDED and done[0].retryable
    assert not isinstance(done[1], BaseException) and done[1].inference.output.tensors[0].string_data == ["far"]
    assert triton.requests == [["near", "far"]]


async def test_a_row_whose_deadline_passed_while_it_waited_is_left_out_of_the_request() -> None:
    triton = FakeTriton(delay_s=0.1)
    b = batcher(triton)
    first = asyncio.ensure_future(b.infer(KEY, "first", deadline=None, metadata={}))
    await asyncio.sleep(0)
    late = asyncio.ensure_future(b.infer(KEY, "late", deadline=time.time() + 0.02, metadata={}))
    kept = asyncio.ensure_future(b.infer(KEY, "kept", deadline=None, metadata={}))
    done = await asyncio.gather(first, late, kept, return_exceptions=True)
    assert isinstance(done[1], InferenceFailed) and done[1].code == result_pb2.ERROR_CODE_DEADLINE_EXCEEDED
    assert triton.requests == [["first"], ["kept"]]


async def test_the_triton_queue_timeout_never_overflows_whatever_is_asked() -> None:
    sent: dict[str, Any] = {}

    class Client:
        async def infer(self, model: str, inputs: list[Any], **kw: Any) -> Any:
            sent.update(kw)
            raise InferenceServerException("stop here", status="StatusCode.UNAVAILABLE")

    triton = TritonInference("fake:8001")
    triton._client = Client()  # type: ignore[assignment]
    with pytest.raises(InferenceFailed):
        await triton.infer_batch("sleep", ["x"], timeout_s=60.0, queue_timeout_s=1e13)
    assert sent["timeout"] == 60_000_000 and sent["client_timeout"] == 60.0
