"""Admission control: the wait estimate, the decision and its RetryInfo, the monitor, and the gRPC answer, with a
fake lag source and a fake clock at the seams."""

from __future__ import annotations

import asyncio
import math
import time

import grpc
import pytest
from confluent_kafka import TopicPartition
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from test_ingest_service import req, start_ingest

from aimesh import finished_offsets
from aimesh.ingest.admission import (
    UNKNOWN_RATE_RETRY_S,
    Admission,
    AdmissionMonitor,
    BacklogSample,
    DrainEstimator,
    Estimate,
    KafkaLagSource,
    LagUnavailable,
)
from aimesh.metrics import IngestMetrics
from aimesh.v1 import ingest_pb2, ingest_pb2_grpc, task_pb2


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def feed(estimator: DrainEstimator, samples: list[tuple[float, int, int]]) -> Estimate:
    """Feed (time, backlog, position) samples; return the last estimate."""
    estimate = None
    for at, backlog, position in samples:
        estimate = estimator.observe(at, BacklogSample(backlog, position))
    assert estimate is not None
    return estimate


def test_a_steady_drain_gives_backlog_over_rate() -> None:
    # Workers commit 20 tasks/s while 400 wait: 20 s.
    estimate = feed(DrainEstimator("t"), [(float(t), 400, 20 * t) for t in range(6)])
    assert estimate.rate_per_s == pytest.approx(20.0)
    assert estimate.wait_s == pytest.approx(20.0)
    assert estimate.backlog == 400


def test_the_rate_is_smoothed_over_the_window_not_the_last_step() -> None:
    # Transactions commit 100 tasks every 5 s: the rate over a 10 s window is 20/s, whatever the last second did.
    positions = [0, 0, 0, 0, 0, 100, 100, 100, 100, 100, 200, 200, 200]
    estimate = feed(DrainEstimator("t", window_s=10), [(float(t), 300, p) for t, p in enumerate(positions)])
    assert estimate.rate_per_s == pytest.approx(20.0, rel=0.25)


def test_an_idle_stretch_measures_no_rate() -> None:
    # The group keeps up with a trickle: the backlog is 0 at every sample, so the rate says nothing of capacity.
    estimator = DrainEstimator("t")
    estimate = feed(estimator, [(float(t), 0, 2 * t) for t in range(10)])
    assert estimate.rate_per_s is None and estimate.wait_s == 0
    # A burst arrives: no rate known yet, a small backlog is not too long...
    estimate = estimator.observe(10.0, BacklogSample(50, 20))
    assert estimate.wait_s == 0
    # ...and as soon as the workers drain it, their rate is measured from the busy stretch only.
    estimate = estimator.observe(11.0, BacklogSample(40, 30))
    assert estimate.rate_per_s == pytest.approx(10.0)
    assert estimate.wait_s == pytest.approx(4.0)


def test_without_any_rate_a_large_backlog_is_infinitely_long() -> None:
    estimate = feed(DrainEstimator("t", stalled_backlog=100), [(0.0, 101, 0)])
    assert estimate.rate_per_s is None and math.isinf(estimate.wait_s)
    assert feed(DrainEstimator("t", stalled_backlog=100), [(0.0, 100, 0)]).wait_s == 0


def test_a_stalled_backlog_waits_at_least_as_long_as_it_has_stalled() -> None:
    estimator = DrainEstimator("t")
    feed(estimator, [(0.0, 100, 0), (1.0, 90, 10), (2.0, 80, 20)])  # 10/s: 8 s
    # Every worker stops: the windowed rate decays while nothing moves, then holds its last value; the wait is
    # never below the 30 s the backlog has gone without progress.
    estimate = feed(estimator, [(2.0 + t, 80, 20) for t in range(1, 31)])
    assert estimate.rate_per_s is not None and estimate.rate_per_s < 10.0
    assert estimate.wait_s >= 30.0
    # Before any rate: the stall alone.
    estimate = feed(DrainEstimator("t"), [(0.0, 5, 0), (60.0, 5, 0)])
    assert estimate.wait_s == pytest.approx(60.0)


def test_offsets_going_back_forget_the_old_samples() -> None:
    estimator = DrainEstimator("t")
    feed(estimator, [(0.0, 100, 1000), (1.0, 100, 1010)])
    estimate = estimator.observe(2.0, BacklogSample(100, 0))  # the group was reset to the start
    assert estimate.wait_s == pytest.approx(10.0)  # the rate seen before still applies; no negative rate
    assert estimate.rate_per_s == pytest.approx(10.0)


def estimate(topic: str = "tasks", backlog: int = 1000, wait_s: float = 50.0, at: float = 1000.0) -> Estimate:
    return Estimate(topic, backlog, backlog / wait_s if wait_s and not math.isinf(wait_s) else None, wait_s, at)


def test_admission_rejects_past_the_max_wait_with_the_time_to_get_back_under_it() -> None:
    clock = Clock()
    admission = Admission(30.0, stale_after_s=3.0, clock=clock)
    assert admission.check("tasks") is None  # nothing measured yet: admit (startup)
    admission.update(estimate(wait_s=30.0))
    assert admission.check("tasks") is None
    admission.update(estimate(wait_s=42.3))
    rejection = admission.check("tasks")
    assert rejection is not None
    assert rejection.retry_after_s == 13.0  # 12.3 s until the backlog is back within 30 s, in whole seconds
    assert (rejection.topic, rejection.backlog, rejection.wait_s) == ("tasks", 1000, 42.3)
    assert admission.check("batch") is None  # another class, not measured


def test_admission_retry_is_at_least_a_second() -> None:
    admission = Admission(30.0, stale_after_s=3.0, clock=Clock())
    admission.update(estimate(wait_s=30.01))
    rejection = admission.check("tasks")
    assert rejection is not None and rejection.retry_after_s == 1.0


def test_admission_rejects_a_task_whose_deadline_comes_before_its_turn() -> None:
    admission = Admission(300.0, stale_after_s=3.0, clock=Clock())
    admission.update(estimate(wait_s=50.0))
    assert admission.check("tasks", seconds_to_deadline=60.0) is None
    rejection = admission.check("tasks", seconds_to_deadline=20.0)
    assert rejection is not None
    assert rejection.retry_after_s == 30.0
    assert "deadline" in rejection.message


def test_an_unknown_rate_with_a_large_backlog_is_rejected_with_a_fixed_retry() -> None:
    admission = Admission(30.0, stale_after_s=3.0, clock=Clock())
    admission.update(estimate(wait_s=math.inf))
    rejection = admission.check("tasks")
    assert rejection is not None and rejection.retry_after_s == UNKNOWN_RATE_RETRY_S


def test_stale_estimates_fail_open_and_max_wait_0_turns_admission_off() -> None:
    clock = Clock()
    admission = Admission(30.0, stale_after_s=3.0, clock=clock)
    admission.update(estimate(wait_s=100.0, at=clock.now))
    clock.now += 2.9
    assert admission.check("tasks") is not None
    clock.now += 0.2
    assert admission.check("tasks") is None  # older than 3 s: not trusted
    off = Admission(0.0, stale_after_s=3.0, clock=clock)
    off.update(estimate(wait_s=100.0, at=clock.now))
    assert not off.enabled and off.check("tasks") is None


class FakeLagSource:
    """Answers the samples queued for it, or raises LagUnavailable while ``down``."""

    def __init__(self) -> None:
        self.samples: dict[str, BacklogSample] = {}
        self.down = False
        self.calls = 0

    def measure(self, topics):
        self.calls += 1
        if self.down:
            raise LagUnavailable("broker unreachable")
        return {t: s for t, s in self.samples.items() if t in topics}

    def close(self) -> None:
        self.closed = True


def test_the_monitor_feeds_admission_and_metrics_and_fails_open_when_the_broker_is_unreachable() -> None:
    clock = Clock()
    source = FakeLagSource()
    metrics = IngestMetrics()
    admission = Admission(10.0, stale_after_s=3.0, clock=clock)
    monitor = AdmissionMonitor(
        source, admission, ["tasks", "batch"], interval_s=1.0, stalled_backlog=100, metrics=metrics, clock=clock
    )
    for position in (0, 5):
        source.samples = {"tasks": BacklogSample(100, position), "batch": BacklogSample(0, 7)}
        monitor.measure_once()
        clock.now += 1
    rejection = admission.check("tasks")
    assert rejection is not None and rejection.wait_s == pytest.approx(20.0)  # 100 at 5/s
    assert admission.check("batch") is None
    assert metrics.estimated_wait_seconds.labels("tasks")._value.get() == pytest.approx(20.0)
    assert metrics.backlog_records.labels("tasks")._value.get() == 100
    source.down = True
    for _ in range(4):
        monitor.measure_once()
        clock.now += 1
    assert metrics.admission_monitor_errors._value.get() == 4
    assert admission.check("tasks") is None  # stale: admitted


async def test_the_monitor_measures_on_its_own_thread_and_stops_twice() -> None:
    source = FakeLagSource()
    admission = Admission(10.0, stale_after_s=3.0)
    monitor = AdmissionMonitor(source, admission, ["tasks"], interval_s=0.05, stalled_backlog=100)
    async with monitor:
        for _ in range(250):  # up to 5 s; the loop stays free while the thread measures
            if source.calls >= 3:
                break
            await asyncio.sleep(0.02)
    calls = source.calls
    assert calls >= 3
    await monitor.stop()
    await asyncio.sleep(0.1)
    assert source.calls == calls


async def test_a_long_backlog_answers_resource_exhausted_with_retry_info_and_publishes_nothing() -> None:
    clock = Clock()
    admission = Admission(30.0, stale_after_s=3.0, clock=clock)
    admission.update(Estimate("tasks", 1200, 20.0, 60.0, clock.now))
    metrics = IngestMetrics()
    server, producer = await start_ingest(admission=admission, metrics=metrics)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = ingest_pb2_grpc.IngestServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.SubmitTasks(
                    ingest_pb2.SubmitTasksRequest(tasks=[req(priority=task_pb2.PRIORITY_BATCH), req()])
                )
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            status = rpc_status.from_call(info.value)
            assert status is not None
            retry, error = error_details_pb2.RetryInfo(), error_details_pb2.ErrorInfo()
            assert status.details[0].Unpack(retry) and status.details[1].Unpack(error)
            assert retry.retry_delay.ToTimedelta().total_seconds() == 30.0
            assert error.reason == "BACKLOG_TOO_LONG"
            assert dict(error.metadata) == {"topic": "tasks", "backlog": "1200", "estimated_wait_s": "60.0"}
            assert producer.records == []  # all or nothing: the batch task was not published either
            assert metrics.tasks_rejected.labels("backlog_too_long")._value.get() == 2

            # Batch tasks travel on another topic, whose backlog is fine.
            await stub.SubmitTask(req(priority=task_pb2.PRIORITY_BATCH, idempotency_key="k"))
            assert [topic for topic, *_ in producer.records] == ["batch-tasks"]

            # The backlog drained: accepted again.
            admission.update(Estimate("tasks", 100, 20.0, 5.0, clock.now))
            await stub.SubmitTask(req())
            assert len(producer.records) == 2
    finally:
        await server.stop(0)


async def test_a_repeated_idempotency_key_is_answered_whatever_the_backlog() -> None:
    clock = Clock()
    admission = Admission(30.0, stale_after_s=3.0, clock=clock)
    server, producer = await start_ingest(admission=admission)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = ingest_pb2_grpc.IngestServiceStub(channel)
            first = await stub.SubmitTask(req(idempotency_key="same"))
            admission.update(Estimate("tasks", 1200, 1.0, 1200.0, clock.now))
            again = await stub.SubmitTask(req(idempotency_key="same"))  # publishes nothing new: not turned away
            assert again.duplicate and again.task_id == first.task_id
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.SubmitTask(req(idempotency_key="other"))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        await server.stop(0)


async def test_a_deadline_before_the_tasks_turn_is_backlog_too_long() -> None:
    clock = Clock()
    admission = Admission(300.0, stale_after_s=3.0, clock=clock)
    admission.update(Estimate("tasks", 1200, 20.0, 60.0, clock.now))
    server, producer = await start_ingest(admission=admission)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = ingest_pb2_grpc.IngestServiceStub(channel)
            soon = req()
            soon.deadline.FromSeconds(int(time.time()) + 10)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.SubmitTask(soon)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "deadline" in (info.value.details() or "")
            later = req()
            later.deadline.FromSeconds(int(time.time()) + 600)
            await stub.SubmitTask(later)
            assert len(producer.records) == 1
    finally:
        await server.stop(0)


class FakeGroupConsumer:
    """The librdkafka consumer calls KafkaLagSource makes, answering from fixed offsets."""

    def __init__(self, committed: list[TopicPartition], watermarks: tuple[int, int]) -> None:
        self._committed = committed
        self._watermarks = watermarks

    def list_topics(self, timeout: float) -> object:
        partitions = {tp.partition: object() for tp in self._committed}
        topic = type("Topic", (), {"error": None, "partitions": partitions})()
        return type("Metadata", (), {"topics": {"aimesh.tasks": topic}})()

    def committed(self, partitions: list[TopicPartition], timeout: float) -> list[TopicPartition]:
        return self._committed

    def get_watermark_offsets(self, tp: TopicPartition, timeout: float, cached: bool) -> tuple[int, int]:
        return self._watermarks


def test_tasks_published_above_the_committed_offset_are_not_backlog() -> None:
    # Partition 0: committed 100 with 30 published above it (a slow task at 100 still runs); partition 1: 150.
    committed = [
        TopicPartition("aimesh.tasks", 0, 100, finished_offsets.encode(100, range(101, 131))),
        TopicPartition("aimesh.tasks", 1, 150),
    ]
    source = object.__new__(KafkaLagSource)
    source._consumer = FakeGroupConsumer(committed, (0, 200))  # type: ignore[assignment]
    sample = source.measure(["aimesh.tasks"])["aimesh.tasks"]
    assert sample.backlog == (200 - 100 - 30) + (200 - 150)
    assert sample.position == (100 + 30) + 150
