"""Micro-batching: tasks for the same model and parameters that are waiting at the same moment go to Triton as
one request.

There is no timer. A task joins its key's queue, and the queue is sent once the callbacks already scheduled on
the event loop have run (``loop.call_soon``), so tasks that start together (a fetch of many records, or the
slots a finished request frees) share a request, while a lone task waits for nothing. While ``max_concurrent``
requests for the key are outstanding, tasks wait in the queue, which the next free request takes whole, up to
``max_batch_size`` rows and ``max_request_bytes`` of input (a larger row goes alone), which bounds what one request
holds in the worker, in Triton and in the model's shared memory. The worker keeps many requests outstanding rather
than holding rows back: Triton's dynamic batcher merges the requests it has queued into full batches, and rows still
waiting in a worker cannot join them.

Tensor tasks share a request only with tasks whose tensors have the same names, datatypes and shapes (rows are
stacked along the batch dimension), and a task for a model that does not batch always goes alone.

Tasks of different priority classes never share a request (the priority is part of the key, and Triton's
request priority is per request), and a task cancelled by its client while it waits is dropped when the next
request is formed: it fails with ``CancelledByClient`` instead of joining.

Deadlines are each row's own: one row's values never set the terms for the rows it shares a request with.
- A row whose deadline passes while it waits (in the queue here, or in a request outstanding at Triton) fails
  alone with a retryable DEADLINE_EXCEEDED (the worker ends it EXPIRED); the request goes on for the others.
- A row whose deadline has passed when a request is formed is left out of it.
- The request's Triton queue timeout is the *longest* remaining deadline of its rows (none if a row has none),
  capped at the call's timeout: Triton drops a request only once no row can use its answer any more, so a
  near-deadline row never gets the rows with longer deadlines rejected.
- A request that fails for a reason that is not a transient one (a bad row, a value that cannot become a request)
  is sent again row by row, so the row at fault fails alone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from aimesh.errors import AimeshError
from aimesh.settings import WorkerSettings
from aimesh.v1 import result_pb2

from .inference import Inference, InferenceFailed, Triton
from .tensor_io import Row, row_bytes

log = logging.getLogger(__name__)

# Triton's queue timeout is in microseconds: a request never asks for less than this.
MIN_QUEUE_TIMEOUT_S = 0.001
# A row never waits for its deadline longer than this (a deadline further away comes from a record nobody checked;
# the call's own timeout ends the wait long before).
MAX_WAIT_S = 7 * 24 * 3600.0


def _deadline_passed(when: str) -> InferenceFailed:
    return InferenceFailed(
        result_pb2.ERROR_CODE_DEADLINE_EXCEEDED, f"the task's deadline passed {when}", retryable=True
    )


class CancelledByClient(AimeshError):
    """The task was cancelled while it waited to join a request: it was never sent to Triton."""


@dataclass(frozen=True)
class BatchKey:
    """Tasks that may share a request: same model, version, request parameters and Triton request priority
    (0: the model's default)."""

    model: str
    version: str = ""
    parameters: tuple[tuple[str, str], ...] = ()
    priority: int = 0
    inputs: tuple[object, ...] = ()  # a tensor row's signature (TensorRow.key): text and tensors never mix

    @classmethod
    def of(
        cls, model: str, version: str, parameters: dict[str, str], priority: int = 0, inputs: tuple[object, ...] = ()
    ) -> BatchKey:
        return cls(model, version, tuple(sorted(parameters.items())), priority, inputs)


@dataclass(frozen=True)
class Batched:
    inference: Inference
    batch_items: int


@dataclass
class _Item:
    row: Row
    size_bytes: int  # of the text in UTF-8 or the tensors' contents, as they go to Triton
    deadline: float | None  # epoch seconds
    metadata: dict[str, str]
    cancelled: Callable[[], bool]
    future: asyncio.Future[Batched] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Batcher:
    def __init__(
        self,
        triton: Triton,
        *,
        max_batch_size: int,
        max_concurrent: int,
        max_request_bytes: int = WorkerSettings.model_fields["max_request_bytes"].default,
        timeout_s: float,
        on_request: Callable[[str, int], None] = lambda model, items: None,
    ) -> None:
        self._triton = triton
        self._max_batch_size = max_batch_size
        self._max_request_bytes = max_request_bytes
        self._max_concurrent = max_concurrent
        self._timeout_s = timeout_s
        self._on_request = on_request
        self._queues: dict[BatchKey, deque[_Item]] = {}
        self._scheduled: set[BatchKey] = set()  # keys with a _dispatch waiting on the loop (call_soon)
        self._outstanding: dict[BatchKey, int] = {}
        self._requests: set[asyncio.Task[None]] = set()

    async def infer(
        self,
        key: BatchKey,
        row: Row,
        *,
        deadline: float | None,
        metadata: dict[str, str],
        cancelled: Callable[[], bool] = lambda: False,
    ) -> Batched:
        """This row's inference (a text, or a task's tensors), run in whichever request it joins. Raises
        InferenceFailed (DEADLINE_EXCEEDED, retryable, once ``deadline`` passes), or CancelledByClient when
        ``cancelled()`` is true as the task is about to join a request."""
        item = _Item(row, row_bytes(row), deadline, metadata, cancelled)
        self._queues.setdefault(key, deque()).append(item)
        if key not in self._scheduled:
            self._scheduled.add(key)
            asyncio.get_running_loop().call_soon(self._dispatch, key)
        timeout = asyncio.timeout_at(self._loop_deadline(deadline))
        try:
            async with timeout:
                return await asyncio.shield(item.future)
        except TimeoutError:
            if not timeout.expired():
                raise  # the request's own error
            item.future.cancel()  # if still queued, the next request skips it; if sent, the others still get theirs
            raise _deadline_passed("while it waited for Triton") from None
        except asyncio.CancelledError:
            item.future.cancel()  # if still queued, the next request skips it
            raise

    @staticmethod
    def _loop_deadline(deadline: float | None) -> float | None:
        """``deadline`` (epoch seconds) on the event loop's clock, no further than ``MAX_WAIT_S`` away."""
        if deadline is None:
            return None
        loop = asyncio.get_running_loop()
        return loop.time() + min(MAX_WAIT_S, max(0.0, deadline - time.time()))

    def _dispatch(self, key: BatchKey) -> None:
        self._scheduled.discard(key)
        queue = self._queues.get(key)
        while queue and self._outstanding.get(key, 0) < self._max_concurrent:
            items: list[_Item] = []
            size_bytes = 0
            while queue and len(items) < self._max_batch_size:
                item = queue[0]
                if item.future.done():
                    queue.popleft()
                    continue
                if item.cancelled():
                    queue.popleft()
                    item.future.set_exception(CancelledByClient("cancelled before it joined a request"))
                    continue
                if items and size_bytes + item.size_bytes > self._max_request_bytes:
                    break  # it starts the next request
                items.append(queue.popleft())
                size_bytes += item.size_bytes
            if not items:
                break
            self._outstanding[key] = self._outstanding.get(key, 0) + 1
            request = asyncio.create_task(self._send(key, items), name=f"infer {key.model} x{len(items)}")
            self._requests.add(request)
            request.add_done_callback(self._requests.discard)
        if queue is not None and not queue:
            del self._queues[key]

    async def _send(self, key: BatchKey, items: list[_Item]) -> None:
        try:
            await self._run(key, items)
        finally:
            self._outstanding[key] -= 1
            if not self._outstanding[key]:
                del self._outstanding[key]
            self._dispatch(key)

    def _queue_timeout_s(self, items: list[_Item]) -> float | None:
        """The request's Triton queue timeout: the longest remaining deadline of its rows (None if a row has none),
        within [MIN_QUEUE_TIMEOUT_S, the call's timeout]."""
        if any(i.deadline is None for i in items):
            return None
        longest_s = max(i.deadline or 0.0 for i in items) - time.time()
        return min(self._timeout_s, max(MIN_QUEUE_TIMEOUT_S, longest_s))

    @staticmethod
    def _live(items: list[_Item]) -> list[_Item]:
        """The rows still waiting for an answer; those whose deadline passed fail now, without a request."""
        now, live = time.time(), []
        for item in items:
            if item.future.done():
                continue
            if item.deadline is not None and item.deadline <= now:
                item.future.set_exception(_deadline_passed("before it was sent to Triton"))
                continue
            live.append(item)
        return live

    async def _run(self, key: BatchKey, items: list[_Item]) -> None:
        items = self._live(items)
        if not items:
            return
        queue_timeout_s = self._queue_timeout_s(items)
        self._on_request(key.model, len(items))
        try:
            inferences = await self._triton.infer_batch(
                key.model,
                [i.row for i in items],
                model_version=key.version,
                parameters=dict(key.parameters),
                timeout_s=self._timeout_s,
                queue_timeout_s=queue_timeout_s,
                metadata=items[0].metadata,
                priority=key.priority,
            )
        except InferenceFailed as e:
            if len(items) > 1 and not e.retryable:
                # One bad input must not fail the tasks it happened to share a request with: send each alone.
                log.info("a %d-item %s request failed (%s); sending its items one by one", len(items), key.model, e)
                await asyncio.gather(*(self._run(key, [item]) for item in items))
                return
            for item in items:
                if not item.future.done():
                    item.future.set_exception(e)
        except Exception as e:  # a bug or an unexpected client error: every waiting task still gets an answer
            if len(items) > 1:
                log.warning("a %d-item %s request failed (%r); sending its items one by one", len(items), key.model, e)
                await asyncio.gather(*(self._run(key, [item]) for item in items))
                return
            for item in items:
                if not item.future.done():
                    item.future.set_exception(e)
        else:
            for item, inference in zip(items, inferences, strict=True):
                if not item.future.done():
                    item.future.set_result(Batched(inference, len(items)))

    async def close(self) -> None:
        for request in list(self._requests):
            request.cancel()
        if self._requests:
            await asyncio.wait(set(self._requests))
