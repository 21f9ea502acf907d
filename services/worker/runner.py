"""Runs one task on the event loop, from its record to its ``Outcome``: decode, check its deadline and cancellation,
announce RUNNING, call Triton (micro-batched for unary models, one streaming request for decoupled ones) with
retries that wait out a Triton outage, and build the outcome (``outcomes``).

Streaming models run one task per streaming request; each response becomes a partial RUNNING update (sequence 3,
4, ...) sent like the RUNNING one through the non-transactional progress producer, and the terminal result holds
the whole text and the sequence one past the last partial update.

Cancellation: a task whose cancellation the worker knows is not run when it starts or is about to join a Triton
request: it ends CANCELLED. A running streaming task is cancelled in Triton (``stop_stream``) and ends CANCELLED with
the text so far. A unary request already sent to Triton is left to finish.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import AbstractContextManager

from opentelemetry.trace import Span

from aimesh import events, runtime, tracing
from aimesh.errors import BrokerUnavailable, UndecodableRecord
from aimesh.kafka import Record
from aimesh.kafka_producer import AsyncProducer
from aimesh.metrics import WorkerMetrics
from aimesh.retry import RetryPolicy
from aimesh.v1 import result_pb2, task_pb2

from .batching import Batcher, BatchKey, CancelledByClient
from .cancellation import Cancellations
from .claim_check import ClaimCheck
from .health import TritonHealth
from .inference import Inference, InferenceFailed, ModelInfo, Triton
from .ledger import Outcome
from .options import WorkerOptions
from .outcomes import Outcomes
from .record_limits import RecordLimits
from .results import ResultBuilder, text_output
from .scheduler import class_of
from .streaming import STOPPED, Run, Streams
from .tensor_io import Row

log = logging.getLogger(__name__)

# Requests per model the worker keeps outstanding at Triton; more tasks than that wait to share a request. Many:
# rows waiting in the worker cannot join the batches Triton's dynamic batcher forms (with 4, mesh / direct Triton
# at concurrency 64 was 0.64 in `make bench`).
MAX_CONCURRENT_REQUESTS = 16
# Triton request priorities (for models with dynamic_batching priority_levels >= 2): 1 is served first.
INTERACTIVE_TRITON_PRIORITY, BATCH_TRITON_PRIORITY = 1, 2
# A deadline further away than this is taken as this far away: ingest checks deadlines, but a record written straight
# to the topic is read as it is, and a deadline of 10^13 s would overflow the microseconds Triton is given.
MAX_DEADLINE_S = 7 * 24 * 3600.0
NOT_RUN = "the task was cancelled by the client before it ran"

UNARY_MODEL = ModelInfo(decoupled=False, priority_levels=0)


def deadline_of(task: task_pb2.AITaskEvent, now: float) -> float | None:
    """The task's deadline (epoch seconds), no further than ``MAX_DEADLINE_S`` from ``now``: every timeout the worker
    derives from it (retry budget, Triton queue timeout, stream timeout, waits) stays in range whatever the record
    says."""
    if not task.HasField("deadline"):
        return None
    return min(events.timestamp_s(task.deadline), now + MAX_DEADLINE_S)


class TaskRunner:
    """Runs tasks on ``triton``; ``handle(record)`` gives a record's outcome. Event loop only."""

    def __init__(
        self,
        *,
        triton: Triton,
        progress: AsyncProducer,
        health: TritonHealth,
        cancellations: Cancellations,
        outcomes: Outcomes,
        results: ResultBuilder,
        metrics: WorkerMetrics,
        retry: RetryPolicy,
        results_topic: str,
        batch_tasks_topic: str,
        group: str,
        max_batch_size: int,
        max_request_bytes: int,
        inference_timeout_s: float,
        claim_check: ClaimCheck | None = None,
    ) -> None:
        self._triton, self._progress, self._health = triton, progress, health
        self._claim_check = claim_check if claim_check is not None else ClaimCheck(None, inline_limit_bytes=0)
        self.cancellations, self._outcomes, self._results = cancellations, outcomes, results
        self._metrics, self._retry = metrics, retry
        self._results_topic, self._batch_tasks_topic, self._group = results_topic, batch_tasks_topic, group
        self._inference_timeout_s = inference_timeout_s
        self._batcher = Batcher(
            triton,
            max_batch_size=max_batch_size,
            max_request_bytes=max_request_bytes,
            max_concurrent=MAX_CONCURRENT_REQUESTS,
            timeout_s=inference_timeout_s,
            on_request=lambda model, items: metrics.inference_batch_items.labels(model).observe(items),
        )
        self._streams = Streams(
            triton, progress, results, results_topic=results_topic, inference_timeout_s=inference_timeout_s
        )

    @classmethod
    def of(
        cls,
        options: WorkerOptions,
        *,
        triton: Triton,
        progress: AsyncProducer,
        health: TritonHealth,
        cancellations: Cancellations,
        metrics: WorkerMetrics,
        retry: RetryPolicy,
        group: str,
    ) -> TaskRunner:
        """The runner of a worker with ``options``."""
        limits = RecordLimits(
            results_topic=options.results_topic,
            dead_letter_topic=options.dead_letter_topic,
            max_record_bytes=options.max_record_bytes,
        )
        return cls(
            triton=triton,
            progress=progress,
            health=health,
            cancellations=cancellations,
            outcomes=Outcomes(limits, metrics, results_topic=options.results_topic, worker_id=options.worker_id),
            results=ResultBuilder(options.worker_id),
            metrics=metrics,
            retry=retry,
            results_topic=options.results_topic,
            batch_tasks_topic=options.batch_tasks_topic,
            group=group,
            max_batch_size=options.max_batch_size,
            max_request_bytes=options.max_request_bytes,
            inference_timeout_s=options.inference_timeout_s,
            claim_check=ClaimCheck(options.object_store, inline_limit_bytes=options.inline_limit_bytes),
        )

    async def close(self) -> None:
        await self._batcher.close()

    def stop_stream(self, task_id: str, tenant: str) -> None:
        """Cancel task ``task_id``'s stream if it is streaming here for ``tenant`` (its cancellation arrived)."""
        self._streams.stop(task_id, tenant)

    async def handle(self, record: Record) -> Outcome:
        """Run the task of ``record`` and give what it publishes; never raises for a task's sake."""
        try:
            task = events.decode_task(record.value)
        except UndecodableRecord as e:
            return self._undecodable(record, e)
        runtime.task_id_var.set(task.task_id)
        batch = class_of(record.topic, self._batch_tasks_topic) == "batch"
        run = Run(batch=batch or task.priority == task_pb2.PRIORITY_BATCH)
        with self._process_span(record, task.task_id):
            try:
                result, attempts = await self._run(task, run)
            except Exception as e:
                # A bug or an error type nobody expected: the client still gets an answer, and the partition is
                # not blocked behind a task that never finishes.
                log.exception("task %s failed unexpectedly", task.task_id)
                tracing.fail(f"internal error: {e!r}")
                result = self._results.failed(task, result_pb2.ERROR_CODE_INTERNAL, f"internal error: {e!r}")
                attempts = 0
            # One past the last partial update of the attempt that produced the result (none: FIRST_PARTIAL_SEQUENCE).
            result.sequence = events.FIRST_PARTIAL_SEQUENCE + run.partials
            await self._streams.flush(run)
            return self._outcomes.outcome(record, task.task_id, self._outcomes.fit(result), attempts=attempts)

    def _process_span(self, record: Record, key: str) -> AbstractContextManager[Span]:
        """The CONSUMER span of processing ``record``, continuing the trace its producer put in its headers."""
        return tracing.process_span(
            record.topic,
            key=key,
            partition=record.partition,
            offset=record.offset,
            group=self._group,
            headers=record.headers,
        )

    def _undecodable(self, record: Record, e: UndecodableRecord) -> Outcome:
        """A record this worker cannot read: dead-letter it, and answer its task if its id is readable."""
        self._metrics.undecodable_records.labels(e.reason).inc()
        key = e.task_id or (record.key or b"").decode("utf-8", "replace")
        with self._process_span(record, key):
            tracing.fail(f"undecodable record dead-lettered: {e}")
            log.error("dead-lettering undecodable record %s: %s", record.where(), e)
            result = self._outcomes.fit(self._results.undecodable(e.task_id, str(e))) if e.task_id else None
            return self._outcomes.outcome(record, e.task_id, result, attempts=0, undecodable=e.reason, error=str(e))

    def _is_cancelled(self, task: task_pb2.AITaskEvent) -> bool:
        return self.cancellations.is_cancelled(task.task_id, task.tenant)

    async def _run(self, task: task_pb2.AITaskEvent, run: Run) -> tuple[result_pb2.AIResultEvent, int]:
        """The task's terminal result, and how many times inference was tried."""
        started = time.time()
        deadline = deadline_of(task, started)
        if deadline is not None and deadline <= started:
            return self._results.expired(task, started, "the task's deadline passed before a worker reached it"), 0
        if self._is_cancelled(task):
            return self._results.cancelled(task, started, NOT_RUN), 0
        if task.input.WhichOneof("kind") not in ("text", "tensors"):
            message = "the task has no input this worker can serve"
            result = self._results.failed(task, result_pb2.ERROR_CODE_BAD_TASK, message)
            tracing.fail(message)
            return self._results.finish(result, task, started, started), 0

        self._announce_running(task)
        if task.HasField("submitted_at"):
            queue_wait_s = max(0.0, started - events.timestamp_s(task.submitted_at))
            self._metrics.queue_wait_seconds.labels(task.model_name).observe(queue_wait_s)
        inference_started = time.monotonic()
        attempts = 0

        async def attempt() -> Inference:
            nonlocal attempts
            attempts += 1
            if self._is_cancelled(task):  # learned while it waited for a retry
                raise CancelledByClient("cancelled before it was sent to Triton")
            info = await self._model_info(task)
            if info.decoupled:
                if task.input.WhichOneof("kind") != "text":
                    raise InferenceFailed(
                        result_pb2.ERROR_CODE_INVALID_INPUT, "a streaming model takes a text input", retryable=False
                    )
                return await self._streams.attempt(task, deadline, run, lambda: self._is_cancelled(task))
            inference = await self._infer(task, deadline, info, run)
            await self._claim_check.offload(task, inference.output)
            return inference

        try:
            inference = await self._retry.call(
                attempt,
                budget_s=None if deadline is None else max(0.0, deadline - started),
                on_retry=lambda e: self._on_retry(task.model_name, e),
                sleep=lambda wait_s: self._backoff(wait_s, deadline),
                paused_s=self._health.unhealthy_seconds,
            )
        except (CancelledByClient, InferenceFailed) as e:
            self._metrics.inference_seconds.labels(task.model_name).observe(time.monotonic() - inference_started)
            return self._not_inferred(task, run, e, started, deadline), attempts
        self._metrics.inference_seconds.labels(task.model_name).observe(time.monotonic() - inference_started)
        return self._inferred(task, run, inference, started), attempts

    def _not_inferred(
        self,
        task: task_pb2.AITaskEvent,
        run: Run,
        error: CancelledByClient | InferenceFailed,
        started: float,
        deadline: float | None,
    ) -> result_pb2.AIResultEvent:
        """The result of a task whose inference ended in ``error``: cancelled, expired or failed. A stream stopped
        between attempts or by the deadline keeps the text it had sent."""
        if isinstance(error, CancelledByClient):
            result = self._results.cancelled(task, started, NOT_RUN)
        elif error.retryable and deadline is not None and time.time() >= deadline:
            result = self._results.expired(task, started, f"the task's deadline passed during inference: {error}")
        else:
            result = self._results.result(task, result_pb2.TASK_STATUS_FAILED)
            result.error.CopyFrom(error.to_proto())
            tracing.fail(
                str(error),
                {"aimesh.error.code": result_pb2.ErrorCode.Name(error.code), "aimesh.error.retryable": error.retryable},
            )
            return self._results.finish(result, task, started, time.time())
        if run.text is not None:
            result.output.CopyFrom(text_output("".join(run.text)))
        return result

    def _inferred(
        self, task: task_pb2.AITaskEvent, run: Run, inference: Inference, started: float
    ) -> result_pb2.AIResultEvent:
        result = self._results.result(task, result_pb2.TASK_STATUS_SUCCEEDED)
        result.output.CopyFrom(inference.output)
        result.model_version = inference.model_version
        if inference is STOPPED:
            # A stream cancelled by the client: CANCELLED, with the text it had streamed.
            result.status = result_pb2.TASK_STATUS_CANCELLED
            result.output.CopyFrom(text_output("".join(run.text or [])))
            result.error.CopyFrom(result_pb2.TaskError(message="the task was cancelled by the client while it ran"))
            tracing.fail("cancelled by the client while streaming")
        return self._results.finish(result, task, started, time.time())

    async def _model_info(self, task: task_pb2.AITaskEvent) -> ModelInfo:
        """How to call the task's model. A model whose configuration Triton refuses (an unknown model) is called
        like a unary one, so the task fails the way any inference call on it fails, inside an ``infer`` span."""
        try:
            return await self._triton.model_info(task.model_name, task.model_version)
        except InferenceFailed as e:
            if e.retryable:
                raise
            return UNARY_MODEL

    async def _infer(self, task: task_pb2.AITaskEvent, deadline: float | None, info: ModelInfo, run: Run) -> Inference:
        priority = 0
        if info.priority_levels >= 2:
            priority = BATCH_TRITON_PRIORITY if run.batch else INTERACTIVE_TRITON_PRIORITY
        row: Row = task.input.text
        inputs: tuple[object, ...] = ()
        if task.input.WhichOneof("kind") == "tensors":
            row = await self._claim_check.row_of(task, info)
            inputs = row.key() if row.batched else (task.task_id,)  # a model that does not batch: alone
        with tracing.infer_span(
            task.model_name, server_address=self._triton.url, batch_items=1, task_id=task.task_id
        ) as span:
            batched = await self._batcher.infer(
                BatchKey.of(task.model_name, task.model_version, dict(task.parameters), priority, inputs),
                row,
                deadline=deadline,
                metadata=tracing.grpc_metadata(),
                cancelled=lambda: self._is_cancelled(task),
            )
            span.set_attribute("aimesh.inference.batch_items", batched.batch_items)
            return batched.inference

    async def _backoff(self, wait_s: float, deadline: float | None) -> None:
        """Sleep the backoff, then, if Triton is down, wait for it to come back (up to the task's deadline)."""
        await asyncio.sleep(wait_s)
        if not self._health.healthy:
            tracing.event("waiting for Triton")
            await self._health.wait_healthy(None if deadline is None else max(0.0, deadline - time.time()))

    def _on_retry(self, model: str, error: BaseException) -> None:
        code = error.code if isinstance(error, InferenceFailed) else result_pb2.ERROR_CODE_UNSPECIFIED
        self._metrics.observe_retry(model, code)
        if code == result_pb2.ERROR_CODE_UNAVAILABLE:
            self._health.check_soon()  # Triton may be down: find out before the next attempt

    def _announce_running(self, task: task_pb2.AITaskEvent) -> None:
        """Best effort, outside transactions: a lost RUNNING update costs a subscriber a progress step, never
        the result; a repeated one (a task run again after a crash) changes nothing for the notifier."""
        running = self._results.running(task)
        headers = events.result_headers()
        try:
            with tracing.send_span(self._results_topic, task.task_id, headers):
                self._progress.produce_detached(
                    self._results_topic, key=task.task_id, value=running.SerializeToString(), headers=headers
                )
        except BrokerUnavailable as e:
            log.debug("RUNNING update for %s not queued: %s", task.task_id, e)
