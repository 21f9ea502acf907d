"""Micro-batching: tasks for the same model and parameters that are waiting at the same moment go to Triton as
one request.

There is no timer. A task joins its key's queue, and the queue is sent once the callbacks already scheduled on
the event loop have run (``loop.call_soon``), so tasks that start together (a fetch of many records, or the
slots a finished request frees) share a request, while a lone task waits for nothing. While ``max_concurrent``
requests for the key are outstanding, tasks wait in the queue, which the next free request takes whole, up to
``max_batch_size`` rows. The worker keeps many requests outstanding rather than holding rows back: Triton's
dynamic batcher merges the requests it has queued into full batches, and rows still waiting in a worker cannot
join them.

Tasks of different priority classes never share a request (the priority is part of the key, and Triton's
request priority is per request), and a task cancelled by its client while it waits is dropped when the next
request is formed: it fails with ``CancelledByClient`` instead of joining.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .inference import Inference, InferenceFailed, TritonInference

log = logging.getLogger(__name__)


class CancelledByClient(Exception):
    """The task was cancelled while it waited to join a request: it was never sent to Triton."""


@dataclass(frozen=True)
class BatchKey:
    """Tasks that may share a request: same model, version, request parameters and Triton request priority
    (0: the model's default)."""

    model: str
    version: str = ""
    parameters: tuple[tuple[str, str], ...] = ()
    priority: int = 0

    @classmethod
    def of(cls, model: str, version: str, parameters: dict[str, str], priority: int = 0) -> BatchKey:
        return cls(model, version, tuple(sorted(parameters.items())), priority)


@dataclass(frozen=True)
class Batched:
    inference: Inference
    batch_items: int


@dataclass
class _Item:
    text: str
    deadline: float | None  # epoch seconds
    metadata: dict[str, str]
    cancelled: Callable[[], bool]
    future: asyncio.Future[Batched] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Batcher:
    def __init__(
        self,
        triton: TritonInference,
        *,
        max_batch_size: int,
        max_concurrent: int,
        timeout_s: float,
        on_request: Callable[[str, int], None] = lambda model, items: None,
    ) -> None:
        self._triton = triton
        self._max_batch_size = max_batch_size
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
        text: str,
        *,
        deadline: float | None,
        metadata: dict[str, str],
        cancelled: Callable[[], bool] = lambda: False,
    ) -> Batched:
        """This text's inference, run in whichever request it joins. Raises InferenceFailed, or CancelledByClient
        when ``cancelled()`` is true as the task is about to join a request."""
        item = _Item(text, deadline, metadata, cancelled)
        self._queues.setdefault(key, deque()).append(item)
        if key not in self._scheduled:
            self._scheduled.add(key)
            asyncio.get_running_loop().call_soon(self._dispatch, key)
        try:
            return await asyncio.shield(item.future)
        except asyncio.CancelledError:
            item.future.cancel()  # if still queued, the next request skips it
            raise

    def _dispatch(self, key: BatchKey) -> None:
        self._scheduled.discard(key)
        queue = self._queues.get(key)
        while queue and self._outstanding.get(key, 0) < self._max_concurrent:
            items: list[_Item] = []
            while queue and len(items) < self._max_batch_size:
                item = queue.popleft()
                if item.future.done():
                    continue
                if item.cancelled():
                    item.future.set_exception(CancelledByClient("cancelled before it joined a request"))
                    continue
                items.append(item)
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

    async def _run(self, key: BatchKey, items: list[_Item]) -> None:
        deadlines = [i.deadline for i in items if i.deadline is not None]
        queue_timeout_s = max(0.001, min(deadlines) - time.time()) if deadlines else None
        self._on_request(key.model, len(items))
        try:
            inferences = await self._triton.infer_batch(
                key.model,
                [i.text for i in items],
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
