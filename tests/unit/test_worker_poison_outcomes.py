"""Poison outcomes never stall a worker: what it publishes when records would not fit or Kafka refuses them, against
a fake transactional publisher at the Worker's seam (the publisher's own abort paths: test_worker_transactions.py),
and a worker whose threads die. No Kafka, no Triton."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka import TopicPartition
from triton_fakes import echoed

from aimesh import events, kafka, runtime
from aimesh.kafka import Record
from aimesh.lifecycle import run_until
from aimesh.metrics import WorkerMetrics
from aimesh.retry import RetryPolicy
from aimesh.v1 import result_pb2, task_pb2
from aimesh.worker import lag
from aimesh.worker.inference import Inference, InferenceFailed, ModelInfo
from aimesh.worker.ledger import OutRecord, Refusal
from aimesh.worker.options import WorkerOptions
from aimesh.worker.record_limits import record_bytes
from aimesh.worker.runner import MAX_DEADLINE_S, deadline_of
from aimesh.worker.transactions import TransactionAborted
from aimesh.worker.worker import Worker

TASKS, RESULTS, DLQ = "aimesh.tasks", "aimesh.results", "aimesh.tasks.dlq"


class EchoTriton:
    """Every model echoes its text; ``ghost`` is not served."""

    url = "fake:8001"

    async def is_ready(self) -> bool:
        return True

    async def model_info(self, model: str, version: str = "") -> ModelInfo:
        return ModelInfo(decoupled=False, priority_levels=0)

    async def infer_batch(self, model: str, texts: list[str], **_: object) -> list[Inference]:
        if model == "ghost":
            raise InferenceFailed(result_pb2.ERROR_CODE_MODEL_NOT_FOUND, "unknown model 'ghost'", retryable=False)
        return echoed(texts)


class FakeProgress:
    def produce_detached(self, *args: Any, **kwargs: Any) -> None:
        pass


Refuse = Callable[[int, OutRecord], Refusal | None]


class FakePublisher:
    """Commits a transaction unless ``refuse(index, record)`` names a record of it (then it aborts naming them) or
    it carries an offset of a partition in ``stuck`` (then it aborts naming nothing, as a coordinator error would)."""

    transactional_id = "test"

    def __init__(self, refuse: Refuse = lambda i, r: None, *, stuck: frozenset[int] = frozenset()) -> None:
        self.refuse = refuse
        self.stuck = stuck
        self.transactions = 0
        self.committed: list[OutRecord] = []
        self.committed_offsets: list[tuple[int, int]] = []

    def publish(self, records: list[OutRecord], offsets: list[TopicPartition], group_metadata: Any) -> None:
        self.transactions += 1
        refused = tuple(r for i, record in enumerate(records) if (r := self.refuse(i, record)) is not None)
        if refused:
            raise TransactionAborted("refused", refused)
        if any(tp.partition in self.stuck for tp in offsets):
            raise TransactionAborted("coordinator trouble")
        self.committed.extend(records)
        self.committed_offsets.extend((tp.partition, tp.offset) for tp in offsets)

    def commit(self, consumer: Any, keys: Any = None, *, wait: bool = False) -> None:
        pass  # the offsets went with the transaction

    def forget(self, keys: Any) -> None:
        pass


def options(**overrides: Any) -> WorkerOptions:
    """A worker's options as the tests run it: small limits, fast retries, no batch or cancellations topic."""
    fields: dict[str, Any] = {
        "worker_id": "w",
        "tasks_topic": TASKS,
        "results_topic": RESULTS,
        "dead_letter_topic": DLQ,
        "max_in_flight": 8,
        "max_batch_size": 8,
        "max_request_bytes": 4_194_304,
        "max_record_bytes": 1_000_000,
        "inference_timeout_s": 5.0,
        "health_interval_s": 1.0,
        "grace_s": 1.0,
        "idempotency_window_s": 3600.0,
        "cancel_window_s": 3600.0,
    }
    return WorkerOptions(**{**fields, **overrides})


def make_worker(
    publisher: FakePublisher, *, cancel_consumer_config: dict[str, Any] | None = None, **overrides: Any
) -> Worker:
    return Worker(
        options(**overrides),
        consumer_config={"group.id": "test"},
        publisher=publisher,  # type: ignore[arg-type]
        progress=FakeProgress(),  # type: ignore[arg-type]
        triton=EchoTriton(),  # type: ignore[arg-type]
        triton_retry=RetryPolicy(initial_s=0.001, max_s=0.01, budget_s=1.0),
        metrics=WorkerMetrics(),
        cancel_consumer_config=cancel_consumer_config,
    )


def task_record(text: str, *, partition: int, offset: int, model: str = "sleep", **fields: Any) -> Record:
    task = task_pb2.AITaskEvent(
        schema_version=events.SCHEMA_VERSION,
        task_id=f"00000000-0000-4000-8000-{partition:04d}{offset:08d}",
        model_name=model,
        input=task_pb2.TaskInput(text=text),
        tenant="acme",
        **fields,
    )
    return Record(TASKS, partition, offset, task.task_id.encode(), task.SerializeToString(), [])


async def finish(worker: Worker, records: list[Record]) -> None:
    """Run ``records`` through the worker into its ledger, as its consumer thread and event loop would."""
    worker.ledger.assign(sorted({(r.topic, r.partition) for r in records}))
    for record in records:
        partition = worker.ledger.fetched((record.topic, record.partition), record.offset)
        assert partition is not None
        assert worker.ledger.finished(partition, record.offset, await worker.runner.handle(record))


def publish_until_done(worker: Worker, tries: int = 10) -> int:
    """Call the publisher thread's step until everything is published; return how many steps it took."""
    for step in range(1, tries + 1):
        if worker.committer.publish_ready():
            return step
    raise AssertionError(f"still not published after {tries} steps")


def results(publisher: FakePublisher) -> dict[str, result_pb2.AIResultEvent]:
    return {(e := events.decode_result(r.value)).task_id: e for r in publisher.committed if r.topic == RESULTS}


def dead_letters(publisher: FakePublisher) -> dict[bytes | None, OutRecord]:
    return {dict(r.headers)[events.DLQ_TASK_ID_HEADER]: r for r in publisher.committed if r.topic == DLQ}


def refused(worker: Worker, record: str, action: str) -> float:
    return worker.metrics.refused_records.labels(record, action)._value.get()


async def test_an_oversize_result_is_failed_before_publishing_and_its_dead_letter_record_is_cut() -> None:
    publisher = FakePublisher()
    worker = make_worker(publisher, max_record_bytes=65_536)
    oversize = task_record("x" * 70_000, partition=0, offset=0)
    await finish(worker, [oversize, task_record("fine", partition=0, offset=1)])
    assert publish_until_done(worker) == 1 and publisher.transactions == 1
    [failed, ok] = results(publisher).values()
    assert failed.status == result_pb2.TASK_STATUS_FAILED
    assert (
        failed.error.code == result_pb2.ERROR_CODE_RESULT_TOO_LARGE
        and "65536-byte record limit" in failed.error.message
    )
    assert ok.status == result_pb2.TASK_STATUS_SUCCEEDED
    [dead] = dead_letters(publisher).values()
    assert dict(dead.headers)[events.DLQ_TRUNCATED_HEADER] == str(len(oversize.value or b"")).encode()
    assert dict(dead.headers)[events.DLQ_REASON_HEADER] == b"result_too_large"
    assert all(record_bytes(r) <= 65_536 for r in publisher.committed)
    assert publisher.committed_offsets == [(0, 2)]
    assert refused(worker, "result", "preflight") == 1 and refused(worker, "dead_letter", "preflight") == 1


async def test_a_result_the_broker_refuses_as_too_large_is_replaced_and_other_partitions_go_on() -> None:
    """A broker whose max.message.bytes is below the worker's limit: preflight cannot know it."""

    def broker_limit(i: int, record: OutRecord) -> Refusal | None:
        too_large = record_bytes(record) > 2000
        return Refusal(i, "size", "MSG_SIZE_TOO_LARGE", "Broker: Message size too large") if too_large else None

    publisher = FakePublisher(broker_limit)
    worker = make_worker(publisher)
    oversize = task_record("x" * 5000, partition=0, offset=0)
    ordinary = [task_record(f"t{p}{o}", partition=p, offset=o) for p, o in [(0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]]
    await finish(worker, [oversize, *ordinary])

    assert publish_until_done(worker) == 2  # refused, then the minimal outcome with everything else
    got = results(publisher)
    failed = got.pop(oversize.key.decode())  # type: ignore[union-attr]
    assert (failed.status, failed.error.code) == (result_pb2.TASK_STATUS_FAILED, result_pb2.ERROR_CODE_RESULT_TOO_LARGE)
    assert "MSG_SIZE_TOO_LARGE" in failed.error.message and not failed.HasField("output")
    assert len(got) == 5 and all(r.status == result_pb2.TASK_STATUS_SUCCEEDED for r in got.values())
    [dead] = dead_letters(publisher).values()
    assert dead.value == b"" and dict(dead.headers)[events.DLQ_REASON_HEADER] == b"result_too_large"
    assert sorted(publisher.committed_offsets) == [(0, 3), (1, 3)]
    assert refused(worker, "result", "replaced") == 1


async def test_a_dead_letter_topic_that_takes_nothing_costs_the_dead_letter_record_only() -> None:
    def no_dlq(i: int, record: OutRecord) -> Refusal | None:
        return Refusal(i, "topic", "UNKNOWN_TOPIC_OR_PART", "Broker: Unknown topic") if record.topic == DLQ else None

    publisher = FakePublisher(no_dlq)
    worker = make_worker(publisher)
    ghost = task_record("nobody serves this", partition=0, offset=0, model="ghost")
    await finish(worker, [ghost, task_record("fine", partition=0, offset=1)])
    assert publish_until_done(worker) == 2
    statuses = {t: (r.status, r.error.code) for t, r in results(publisher).items()}
    assert statuses[ghost.key.decode()] == (result_pb2.TASK_STATUS_FAILED, result_pb2.ERROR_CODE_MODEL_NOT_FOUND)  # type: ignore[union-attr]
    assert dead_letters(publisher) == {}
    assert refused(worker, "dead_letter", "dropped") == 1


async def test_a_results_topic_that_refuses_everything_blocks_with_backoff_until_it_takes_records_again() -> None:
    def no_results(i: int, record: OutRecord) -> Refusal | None:
        return Refusal(i, "topic", "TOPIC_AUTHORIZATION_FAILED", "Broker: Topic authorization failed")

    publisher = FakePublisher(no_results)
    worker = make_worker(publisher)
    await finish(worker, [task_record("fine", partition=0, offset=0)])
    waits = []
    for _ in range(4):
        assert not worker.committer.publish_ready()
        waits.append(worker.committer.backoff_s())
    assert waits == sorted(waits) and waits[0] > 0 and waits[-1] > waits[0]  # backing off, no hot loop
    assert worker.committer.blocked.is_set() and worker.metrics.publish_blocked._value.get() == 1
    assert results(publisher) == {}  # the outcome was not touched: it is not the input's fault

    publisher.refuse = lambda i, r: None
    assert worker.committer.publish_ready()
    assert results(publisher)["00000000-0000-4000-8000-000000000000"].status == result_pb2.TASK_STATUS_SUCCEEDED
    assert not worker.committer.blocked.is_set() and worker.metrics.publish_blocked._value.get() == 0


async def test_aborts_that_name_no_record_isolate_partitions_so_one_head_holds_back_no_other() -> None:
    publisher = FakePublisher(stuck=frozenset({1}))
    worker = make_worker(publisher)
    await finish(worker, [task_record(f"t{p}", partition=p, offset=0) for p in (0, 1, 2)])
    for _ in range(3):
        assert not worker.committer.publish_ready()
    assert sorted(publisher.committed_offsets) == [(0, 1), (2, 1)]  # in their own transactions
    assert worker.ledger.pending() == 1  # partition 1's task waits, unchanged: a coordinator error is no input's fault

    publisher.stuck = frozenset()
    assert worker.committer.publish_ready()
    assert sorted(publisher.committed_offsets) == [(0, 1), (1, 1), (2, 1)]
    assert not worker.committer.isolating  # a round that published everything: one transaction for all again


async def test_an_absurd_deadline_is_clamped_and_the_task_succeeds() -> None:
    publisher = FakePublisher()
    worker = make_worker(publisher)
    far = task_record("far", partition=0, offset=0)
    task = events.decode_task(far.value)
    task.deadline.seconds = 10**13
    assert deadline_of(task, 1000.0) == 1000.0 + MAX_DEADLINE_S
    record = Record(TASKS, 0, 0, far.key, task.SerializeToString(), [])
    await finish(worker, [record])
    publish_until_done(worker)
    assert [r.status for r in results(publisher).values()] == [result_pb2.TASK_STATUS_SUCCEEDED]


class IdleConsumer:
    """A Consumer that fetches nothing."""

    def __init__(self, config: dict[str, Any], logger: Any = None) -> None:
        self.closed = threading.Event()

    def subscribe(self, topics: list[str], **callbacks: Any) -> None:
        pass

    def consumer_group_metadata(self) -> None:
        return None

    def consume(self, num: int, timeout: float) -> list[Any]:
        time.sleep(min(timeout, 0.01))
        return []

    def poll(self, timeout: float) -> None:
        time.sleep(min(timeout, 0.01))

    def close(self) -> None:
        self.closed.set()


def idle_consumers(monkeypatch: pytest.MonkeyPatch) -> list[IdleConsumer]:
    """Every Kafka consumer the worker makes from now on fetches nothing (the list holds them); the lag thread
    never refreshes."""
    made: list[IdleConsumer] = []

    def idle_consumer(config: dict[str, Any], logger: Any = None) -> IdleConsumer:
        made.append(IdleConsumer(config))
        return made[-1]

    monkeypatch.setattr(kafka, "consumer", idle_consumer)
    monkeypatch.setattr(lag, "LAG_REFRESH_INTERVAL_S", 3600.0)
    return made


class StartablePublisher(FakePublisher):
    def start(self) -> None:
        pass

    def close(self) -> None:
        pass


async def test_a_worker_thread_that_dies_stops_the_worker_and_the_service_sees_component_died(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    consumers = idle_consumers(monkeypatch)
    worker = make_worker(StartablePublisher(), cancel_topic="aimesh.tasks.cancel", cancel_consumer_config={})
    assert worker.cancel_reader is not None

    def dies() -> None:
        raise ValueError("a bug in the cancellations reader")

    monkeypatch.setattr(worker.cancel_reader, "run", dies)
    with pytest.raises(runtime.ComponentDied) as died:
        await asyncio.wait_for(run_until(asyncio.Event(), worker), 20)
    assert died.value.component == "kafka-cancels"
    assert isinstance(died.value.__cause__, ValueError)
    assert consumers and all(c.closed.is_set() for c in consumers)  # the worker was stopped: it left its group
