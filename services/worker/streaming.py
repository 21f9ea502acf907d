"""Streaming (decoupled) models: one task per streaming request, each response sent at once as a partial RUNNING
update (sequence 3, 4, ...) through the non-transactional progress producer, best effort; the terminal result
holds the whole text. A stream whose task is cancelled meanwhile is cancelled in Triton (``stop``) and returns
``STOPPED``, its text so far in the task's ``Run``."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from aimesh import events, tracing
from aimesh.errors import BrokerUnavailable
from aimesh.kafka_producer import AsyncProducer
from aimesh.v1 import result_pb2, task_pb2

from .inference import Inference, Triton
from .results import SEED_PARAMETER, ResultBuilder, derived_seed, text_output

log = logging.getLogger(__name__)

# Before a streaming task's terminal result is handed to the ledger, its partial updates get this long to be
# acknowledged, so that a watcher usually sees them before the terminal one (best effort: they are progress).
PARTIALS_FLUSH_S = 5.0
# What a streaming attempt returns when the client cancelled the task while it streamed.
STOPPED = Inference(output=result_pb2.TaskOutput(), model_version="")


@dataclass
class Run:
    """What one task's processing has done so far: the partial updates its current attempt sent, and their text."""

    batch: bool = False
    partials: int = 0
    text: list[str] | None = None
    last_partial: asyncio.Future[Any] | None = None


class Streams:
    """Runs streaming attempts on ``triton``, sending partial updates to ``results_topic`` through ``progress``.
    Event loop only."""

    def __init__(
        self,
        triton: Triton,
        progress: AsyncProducer,
        results: ResultBuilder,
        *,
        results_topic: str,
        inference_timeout_s: float,
    ) -> None:
        self._triton, self._progress, self._results = triton, progress, results
        self._results_topic = results_topic
        self._inference_timeout_s = inference_timeout_s
        # Running streaming tasks: task id -> (tenant, the event that stops its stream).
        self._running: dict[str, tuple[str, asyncio.Event]] = {}

    def stop(self, task_id: str, tenant: str) -> None:
        """Cancel task ``task_id``'s stream if it is streaming here for ``tenant`` (its cancellation arrived)."""
        stream = self._running.get(task_id)
        if stream is not None and stream[0] == tenant:
            log.info("cancelling the stream of task %s", task_id)
            stream[1].set()

    async def attempt(
        self, task: task_pb2.AITaskEvent, deadline: float | None, run: Run, cancelled: Callable[[], bool]
    ) -> Inference:
        """One attempt at a streaming model: each response is sent as a partial update (sequence 3, 4, ... from the
        start of every attempt: a retried stream repeats the same tokens, seeded, under the same numbers). Returns
        the whole text, or ``STOPPED`` when the client cancelled the task meanwhile (the text so far in ``run``)."""
        run.partials, run.text = 0, []
        parameters = dict(task.parameters)
        parameters.setdefault(SEED_PARAMETER, str(derived_seed(task.task_id)))
        timeout_s = self._inference_timeout_s
        if deadline is not None:
            timeout_s = min(timeout_s, max(0.001, deadline - time.time()))
        stop = asyncio.Event()
        self._running[task.task_id] = (task.tenant, stop)
        if cancelled():
            stop.set()
        version, final = "", False
        try:
            with tracing.infer_span(
                task.model_name, server_address=self._triton.url, batch_items=1, task_id=task.task_id
            ) as span:
                tokens = self._triton.stream(
                    task.model_name,
                    task.input.text,
                    model_version=task.model_version,
                    parameters=parameters,
                    timeout_s=timeout_s,
                    stop=stop,
                    metadata=tracing.grpc_metadata(),
                )
                async with aclosing(tokens):  # an attempt that ends early (cancelled task) cancels the stream
                    async for token in tokens:
                        version, final = token.model_version, token.final
                        if token.text:
                            run.text.append(token.text)
                            self._send_partial(task, events.FIRST_PARTIAL_SEQUENCE + run.partials, token.text, run)
                            run.partials += 1
                span.set_attribute("aimesh.inference.stream_responses", run.partials)
        finally:
            self._running.pop(task.task_id, None)
        if not final:
            return STOPPED
        return Inference(output=text_output("".join(run.text)), model_version=version)

    @staticmethod
    async def flush(run: Run) -> None:
        """Give the task's partial updates a moment to be acknowledged before its terminal result is published."""
        if run.last_partial is not None and not run.last_partial.done():
            await asyncio.wait({run.last_partial}, timeout=PARTIALS_FLUSH_S)

    def _send_partial(self, task: task_pb2.AITaskEvent, sequence: int, text: str, run: Run) -> None:
        """A partial output, through the progress producer like RUNNING updates: in order per task (one key, one
        idempotent producer), best effort (the terminal result holds the whole text)."""
        partial = self._results.partial(task, sequence, text)
        try:
            future = self._progress.produce_nowait(
                self._results_topic,
                key=task.task_id,
                value=partial.SerializeToString(),
                headers=events.result_headers(),
            )
        except BrokerUnavailable as e:
            log.debug("partial update %d of %s not queued: %s", sequence, task.task_id, e)
            return
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        run.last_partial = future
