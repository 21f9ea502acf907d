"""The worker: a consumer-group member that runs tasks through Triton and publishes their results.

At-least-once: a task's offset is committed only after its terminal result's delivery report, so a
crash re-runs unfinished tasks (a task may then be answered twice; the notifier keeps the first terminal
result). Many tasks run at once; the consumer keeps being polled while inference runs, and partitions
are paused while ``max_in_flight`` tasks are running, so a slow model never trips ``max.poll.interval.ms``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from confluent_kafka import Consumer, KafkaException, TopicPartition

from aimesh import events, runtime, tracing
from aimesh.errors import BrokerUnavailable, UndecodableRecord
from aimesh.kafka import AsyncProducer, Record, fetch
from aimesh.metrics import WorkerMetrics, status_label
from aimesh.retry import RetryPolicy
from aimesh.v1 import result_pb2, task_pb2

from .inference import InferenceFailed, TritonInference
from .offsets import OffsetTracker, TopicPartitionKey

log = logging.getLogger(__name__)

T = TypeVar("T")

COMMIT_INTERVAL_S = 0.2
POLL_TIMEOUT_S = 0.1
MAX_FETCH_BATCH = 500
LAG_REFRESH_INTERVAL_S = 5.0
# Bounds each broker query of a lag refresh, which holds up the consumer thread while it runs.
LAG_QUERY_TIMEOUT_S = 1.0


class Worker:
    """Consumes ``tasks_topic``, infers on Triton, produces to ``results_topic``.

    ``run(stop)`` returns after a graceful drain: fetching stops, in-flight tasks get ``grace_s`` to
    finish, completed offsets are committed and the consumer leaves its group.
    """

    def __init__(
        self,
        *,
        consumer_config: dict[str, Any],
        producer: AsyncProducer,
        triton: TritonInference,
        tasks_topic: str,
        results_topic: str,
        worker_id: str,
        max_in_flight: int,
        inference_timeout_s: float,
        triton_retry: RetryPolicy,
        grace_s: float,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self._consumer_config = consumer_config
        self._producer = producer
        self._triton = triton
        self._tasks_topic = tasks_topic
        self._results_topic = results_topic
        self._worker_id = worker_id
        self._max_in_flight = max_in_flight
        self._inference_timeout_s = inference_timeout_s
        self._triton_retry = triton_retry
        self._publish_retry = RetryPolicy(initial_s=0.2, max_s=5.0, budget_s=None)
        self._grace_s = grace_s
        self._group = consumer_config["group.id"]
        self._offsets = OffsetTracker()
        self._tasks: set[asyncio.Task[None]] = set()
        # Every consumer call runs on this one thread: librdkafka's blocking calls stay off the event loop,
        # and the rebalance callbacks (which run inside consume) never race a commit.
        self._kafka_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kafka-consumer")
        self._consumer: Consumer | None = None
        self._paused = False
        self._metrics = metrics if metrics is not None else WorkerMetrics()
        self._lag_series: set[TopicPartitionKey] = set()  # consumer thread only
        self.processed = 0

    async def _kafka(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._kafka_thread, fn, *args)

    async def run(self, stop: asyncio.Event) -> None:
        self._consumer = Consumer(self._consumer_config, logger=log)
        await self._kafka(
            lambda: self._consumer.subscribe(  # type: ignore[union-attr]
                [self._tasks_topic], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
            )
        )
        log.info("worker %s consuming %s as group %s", self._worker_id, self._tasks_topic, self._group)
        last_commit = last_lag = 0.0
        try:
            while not stop.is_set():
                await self._fetch_once()
                if time.monotonic() - last_commit >= COMMIT_INTERVAL_S:
                    await self._kafka(self._commit)
                    last_commit = time.monotonic()
                if time.monotonic() - last_lag >= LAG_REFRESH_INTERVAL_S:
                    await self._kafka(self._refresh_lag)
                    last_lag = time.monotonic()
        finally:
            await self._drain()

    async def _fetch_once(self) -> None:
        assert self._consumer is not None
        capacity = self._max_in_flight - len(self._tasks)
        if capacity <= 0:
            if not self._paused:
                await self._kafka(self._set_paused, True)
            # Keep calling consume while paused: it serves rebalances and max.poll.interval.ms.
            messages = await self._kafka(self._consumer.consume, 1, 0)
            if self._tasks:
                await asyncio.wait(self._tasks, timeout=POLL_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
        else:
            if self._paused:
                await self._kafka(self._set_paused, False)
            messages = await self._kafka(fetch, self._consumer, min(capacity, MAX_FETCH_BATCH), POLL_TIMEOUT_S)
        for message in messages:
            if message.error():
                log.warning("consumer error: %s", message.error())
            else:
                self._start(Record.of(message))

    def _start(self, record: Record) -> None:
        key: TopicPartitionKey = (record.topic, record.partition)
        offset = record.offset
        if not self._offsets.started(key, offset):
            return  # fetched just before its partition was revoked: the new owner runs it
        task = asyncio.create_task(self._process(record), name=f"task@{record.where()}")
        self._tasks.add(task)
        self._metrics.tasks_in_flight.inc()

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            self._metrics.tasks_in_flight.dec()
            if t.cancelled():
                return  # not finished: stays uncommitted and runs again
            if t.exception() is not None:
                log.error("task at %s:%d crashed; it stays uncommitted", key, offset, exc_info=t.exception())
                return
            self._offsets.finished(key, offset)

        task.add_done_callback(done)

    async def _process(self, record: Record) -> None:
        try:
            task = events.decode_task(record.value)
        except UndecodableRecord as e:
            self._metrics.undecodable_records.labels(e.reason).inc()
            key = (record.key or b"").decode("utf-8", "replace")
            with tracing.process_span(
                record.topic,
                key=key,
                partition=record.partition,
                offset=record.offset,
                group=self._group,
                headers=record.headers,
            ):
                tracing.fail(f"undecodable record skipped: {e}")
                log.error("skipping undecodable record %s: %s", record.where(), e)
            return
        runtime.task_id_var.set(task.task_id)
        with tracing.process_span(
            record.topic,
            key=task.task_id,
            partition=record.partition,
            offset=record.offset,
            group=self._group,
            headers=record.headers,
        ):
            result = await self._run(task)
            await self._publish(result)
            self._metrics.results.labels(task.model_name, status_label(result.status)).inc()
            self.processed += 1

    async def _run(self, task: task_pb2.AITaskEvent) -> result_pb2.AIResultEvent:
        started = time.time()
        result = result_pb2.AIResultEvent(
            schema_version=events.SCHEMA_VERSION,
            task_id=task.task_id,
            model_name=task.model_name,
            worker_id=self._worker_id,
        )
        deadline = events.timestamp_s(task.deadline) if task.HasField("deadline") else None
        if deadline is not None and deadline <= started:
            result.status = result_pb2.TASK_STATUS_EXPIRED
            result.error.CopyFrom(
                result_pb2.TaskError(
                    code=result_pb2.ERROR_CODE_DEADLINE_EXCEEDED,
                    message="the task's deadline passed before a worker reached it",
                )
            )
            tracing.fail("expired: the deadline passed before a worker reached the task")
            return self._finish(result, task, started, started)
        if task.input.WhichOneof("kind") != "text":
            result.status = result_pb2.TASK_STATUS_FAILED
            result.error.CopyFrom(
                result_pb2.TaskError(
                    code=result_pb2.ERROR_CODE_BAD_TASK, message="the task has no input this worker can serve"
                )
            )
            tracing.fail(result.error.message)
            return self._finish(result, task, started, started)

        self._announce_running(task)
        if task.HasField("submitted_at"):
            queue_wait_s = max(0.0, started - events.timestamp_s(task.submitted_at))
            self._metrics.queue_wait_seconds.labels(task.model_name).observe(queue_wait_s)
        inference_started = time.monotonic()
        try:
            async for attempt in self._triton_retry.retrying(
                budget_s=None if deadline is None else max(0.0, deadline - started),
                on_retry=lambda e: self._count_retry(task.model_name, e),
            ):
                with (
                    attempt,
                    tracing.infer_span(
                        task.model_name, server_address=self._triton.url, batch_items=1, task_id=task.task_id
                    ),
                ):
                    self._metrics.inference_batch_items.labels(task.model_name).observe(1)
                    inference = await self._triton.infer_text(
                        task.model_name,
                        task.input.text,
                        model_version=task.model_version,
                        parameters=dict(task.parameters),
                        timeout_s=self._inference_timeout_s,
                    )
        except InferenceFailed as e:
            result.status = result_pb2.TASK_STATUS_FAILED
            result.error.CopyFrom(e.to_proto())
            tracing.fail(
                str(e), {"aimesh.error.code": result_pb2.ErrorCode.Name(e.code), "aimesh.error.retryable": e.retryable}
            )
        except Exception as e:
            # A bug or an error type the adapter does not know: the client still gets an answer, and the
            # task's offset is not left uncommitted forever.
            log.exception("task %s failed unexpectedly", task.task_id)
            tracing.fail(f"internal error: {e!r}")
            result.status = result_pb2.TASK_STATUS_FAILED
            result.error.CopyFrom(
                result_pb2.TaskError(code=result_pb2.ERROR_CODE_INTERNAL, message=f"internal error: {e!r}")
            )
        else:
            result.status = result_pb2.TASK_STATUS_SUCCEEDED
            result.output.CopyFrom(inference.output)
            result.model_version = inference.model_version
        self._metrics.inference_seconds.labels(task.model_name).observe(time.monotonic() - inference_started)
        return self._finish(result, task, started, time.time())

    def _count_retry(self, model: str, error: BaseException) -> None:
        code = error.code if isinstance(error, InferenceFailed) else result_pb2.ERROR_CODE_UNSPECIFIED
        self._metrics.observe_retry(model, code)

    def _finish(
        self, result: result_pb2.AIResultEvent, task: task_pb2.AITaskEvent, started: float, ended: float
    ) -> result_pb2.AIResultEvent:
        submitted = events.timestamp_s(task.submitted_at) or started
        result.produced_at.CopyFrom(events.now_timestamp())
        result.timings.queue_wait.FromNanoseconds(int(max(0.0, started - submitted) * 1e9))
        result.timings.inference.FromNanoseconds(int((ended - started) * 1e9))
        result.timings.total.FromNanoseconds(int(max(0.0, time.time() - submitted) * 1e9))
        return result

    def _announce_running(self, task: task_pb2.AITaskEvent) -> None:
        """Best effort: a lost RUNNING update costs a subscriber a progress step, never the result."""
        running = result_pb2.AIResultEvent(
            schema_version=events.SCHEMA_VERSION,
            task_id=task.task_id,
            status=result_pb2.TASK_STATUS_RUNNING,
            model_name=task.model_name,
            worker_id=self._worker_id,
            produced_at=events.now_timestamp(),
        )
        headers = events.result_headers()
        try:
            with tracing.send_span(self._results_topic, task.task_id, headers):
                future = self._producer.produce_nowait(
                    self._results_topic, key=task.task_id, value=running.SerializeToString(), headers=headers
                )
        except BrokerUnavailable as e:
            log.debug("RUNNING update for %s not queued: %s", task.task_id, e)
            return
        future.add_done_callback(lambda f: f.cancelled() or f.exception())

    async def _publish(self, result: result_pb2.AIResultEvent) -> None:
        """Publish the terminal result, retrying until the broker acknowledges it."""
        value = result.SerializeToString()
        async for attempt in self._publish_retry.retrying():
            with attempt:
                headers = events.result_headers()
                with tracing.send_span(self._results_topic, result.task_id, headers):
                    await self._producer.produce(self._results_topic, key=result.task_id, value=value, headers=headers)

    # --- consumer-thread side -------------------------------------------------------------------------

    def _set_paused(self, paused: bool) -> None:
        assert self._consumer is not None
        partitions = [TopicPartition(t, p) for t, p in self._offsets.owned()]
        if partitions:
            (self._consumer.pause if paused else self._consumer.resume)(partitions)
        self._paused = paused

    def _commit(self, offsets: dict[TopicPartitionKey, int] | None = None) -> None:
        assert self._consumer is not None
        offsets = self._offsets.to_commit() if offsets is None else offsets
        if not offsets:
            return
        try:
            self._consumer.commit(
                offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()], asynchronous=False
            )
        except KafkaException as e:
            # Not fatal: the offsets stay uncommitted and are tried again on the next commit.
            log.warning("offset commit failed: %s", e)
            return
        self._offsets.committed(offsets)

    def _refresh_lag(self) -> None:
        """Set the lag gauge of every owned partition: its high watermark minus the group's committed offset
        (the low watermark when the group has committed none: the consumer starts from the earliest)."""
        assert self._consumer is not None
        committed = self._offsets.committed_offsets()
        lags: dict[TopicPartitionKey, int] = {}
        try:
            # Partitions this worker has committed nothing for yet: ask the group coordinator.
            unknown = [TopicPartition(t, p) for (t, p), offset in committed.items() if offset is None]
            for tp in self._consumer.committed(unknown, timeout=LAG_QUERY_TIMEOUT_S) if unknown else []:
                if tp.offset >= 0:
                    committed[(tp.topic, tp.partition)] = tp.offset
            for (topic, partition), offset in committed.items():
                # Not the cached watermark: a paused partition is not fetched, so its cached one goes stale.
                watermarks = self._consumer.get_watermark_offsets(
                    TopicPartition(topic, partition), timeout=LAG_QUERY_TIMEOUT_S, cached=False
                )
                if watermarks is not None:
                    low, high = watermarks
                    lags[(topic, partition)] = max(0, high - (low if offset is None else offset))
        except KafkaException as e:
            # Telemetry only: the gauges keep their last values until the broker answers again.
            log.debug("consumer lag not refreshed: %s", e)
            return
        for (topic, partition), lag in lags.items():
            self._metrics.consumer_lag_records.labels(topic, str(partition)).set(lag)
        self._forget_lag(self._lag_series - committed.keys())
        self._lag_series |= lags.keys()

    def _forget_lag(self, keys: set[TopicPartitionKey]) -> None:
        """Drop the lag series of partitions this worker no longer owns (their new owner reports them)."""
        for topic, partition in keys & self._lag_series:
            self._metrics.consumer_lag_records.remove(topic, str(partition))
        self._lag_series -= keys

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._offsets.assign([(p.topic, p.partition) for p in partitions])
        if self._paused and partitions:
            consumer.pause(partitions)
        log.info("assigned %s", [p.partition for p in partitions])

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Commit what is done before the partitions move; unfinished tasks run again on the new owner.
        self._commit(self._offsets.revoke([(p.topic, p.partition) for p in partitions]))
        self._forget_lag({(p.topic, p.partition) for p in partitions})
        log.info("revoked %s", [p.partition for p in partitions])

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Lost partitions may already belong to another member: commit nothing for them.
        self._offsets.revoke([(p.topic, p.partition) for p in partitions])
        self._forget_lag({(p.topic, p.partition) for p in partitions})
        log.warning("lost %s", [p.partition for p in partitions])

    async def _drain(self) -> None:
        log.info("draining %d in-flight tasks for up to %.1fs", len(self._tasks), self._grace_s)
        if self._consumer is not None:
            await self._kafka(self._set_paused, True)
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=self._grace_s)
            for task in pending:
                task.cancel()
            if pending:
                log.warning("%d tasks did not finish in the grace period; they will run again", len(pending))
                await asyncio.wait(pending)
        if self._consumer is not None:
            await self._kafka(self._commit)
            # close() leaves the group; the revoke callback it triggers commits anything left.
            await self._kafka(self._consumer.close)
            self._consumer = None
        self._kafka_thread.shutdown(wait=True)
