"""The at_least_once publisher against a producer and a consumer faked at the librdkafka seam: offsets are handed to
the consumer thread only once every record is acknowledged, and a failed delivery is reported like an aborted
transaction (a refused record named, a fatal error fatal)."""

from __future__ import annotations

import time
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from aimesh.worker.acknowledged import AcknowledgedPublisher, acknowledged_config
from aimesh.worker.ledger import OutRecord
from aimesh.worker.transactions import TransactionAborted, TransactionFatal

RESULT = OutRecord("results", b"t1", b"result", [])
OTHER = OutRecord("results", b"t2", b"other", [])
OFFSETS = [TopicPartition("tasks", 0, 3, "meta"), TopicPartition("tasks", 1, 7)]


class FakeProducer:
    """Deliveries are reported by flush(), as librdkafka's are; ``fail`` gives a record (by value) a delivery error."""

    def __init__(self, fail: dict[bytes, KafkaError] | None = None) -> None:
        self.fail = fail or {}
        self.delivered: list[bytes] = []
        self._queued: list[tuple[bytes, Any]] = []

    def produce(self, topic: str, *, key: bytes | None, value: bytes, headers: Any, on_delivery: Any) -> None:
        self._queued.append((value, on_delivery))

    def flush(self, timeout: float) -> int:
        for value, report in self._queued:
            error = self.fail.get(value)
            if error is None:
                self.delivered.append(value)
            report(error, None)
        self._queued.clear()
        return 0

    def poll(self, timeout: float) -> int:
        return 0


class FakeConsumer:
    def __init__(self) -> None:
        self.commits: list[tuple[list[tuple[str, int, int, str | None]], bool]] = []

    def commit(self, *, offsets: list[TopicPartition], asynchronous: bool) -> None:
        self.commits.append(([(tp.topic, tp.partition, tp.offset, tp.metadata) for tp in offsets], asynchronous))


def publisher(
    producer: FakeProducer, commit_interval_s: float = 0.0, clock: Any = time.monotonic
) -> AcknowledgedPublisher:
    p = AcknowledgedPublisher(
        {},
        commit_interval_s=commit_interval_s,
        clock=clock,
        producer_factory=lambda config, logger: producer,  # type: ignore[arg-type]
    )
    p.start()
    return p


def test_offsets_are_committed_by_the_consumer_only_after_every_record_is_acknowledged() -> None:
    producer, consumer = FakeProducer(), FakeConsumer()
    p = publisher(producer)
    p.commit(consumer)  # type: ignore[arg-type]
    assert consumer.commits == []
    p.publish([RESULT, OTHER], OFFSETS, None)
    assert producer.delivered == [b"result", b"other"]
    p.commit(consumer)  # type: ignore[arg-type]
    p.commit(consumer)  # type: ignore[arg-type]
    assert consumer.commits == [([("tasks", 0, 3, "meta"), ("tasks", 1, 7, None)], True)]


def test_offsets_are_committed_at_most_once_an_interval_but_at_once_on_a_revoke() -> None:
    now = [0.0]
    consumer = FakeConsumer()
    p = publisher(FakeProducer(), commit_interval_s=1.0, clock=lambda: now[0])
    p.publish([RESULT], [TopicPartition("tasks", 0, 3)], None)
    now[0] = 0.9
    p.commit(consumer)  # type: ignore[arg-type]
    assert consumer.commits == []
    now[0] = 1.0
    p.commit(consumer)  # type: ignore[arg-type]
    p.publish([OTHER], [TopicPartition("tasks", 0, 4)], None)
    p.commit(consumer, {("tasks", 0)}, wait=True)  # type: ignore[arg-type]
    assert consumer.commits == [([("tasks", 0, 3, None)], True), ([("tasks", 0, 4, None)], False)]


def test_a_revoke_commits_its_partitions_synchronously_and_a_loss_drops_them() -> None:
    consumer = FakeConsumer()
    p = publisher(FakeProducer())
    p.publish([RESULT], OFFSETS, None)
    p.publish([OTHER], [TopicPartition("tasks", 0, 4)], None)  # the later offset of a partition replaces the earlier
    p.commit(consumer, {("tasks", 0)}, wait=True)  # type: ignore[arg-type]
    assert consumer.commits == [([("tasks", 0, 4, None)], False)]
    p.forget({("tasks", 1)})
    p.commit(consumer)  # type: ignore[arg-type]
    assert len(consumer.commits) == 1


def test_a_refused_record_is_named_and_no_offset_moves() -> None:
    consumer = FakeConsumer()
    p = publisher(FakeProducer({b"other": KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, "too large")}))
    with pytest.raises(TransactionAborted) as raised:
        p.publish([RESULT, OTHER], OFFSETS, None)
    assert [(r.index, r.scope) for r in raised.value.refused] == [(1, "size")]
    p.commit(consumer)  # type: ignore[arg-type]
    assert consumer.commits == []


def test_a_delivery_that_timed_out_names_no_record() -> None:
    p = publisher(FakeProducer({b"result": KafkaError(KafkaError._MSG_TIMED_OUT, "timed out")}))
    with pytest.raises(TransactionAborted) as raised:
        p.publish([RESULT], OFFSETS, None)
    assert raised.value.refused == ()


def test_a_fatal_idempotence_error_is_fatal() -> None:
    p = publisher(FakeProducer({b"result": KafkaError(KafkaError._FATAL, "fatal", fatal=True)}))
    with pytest.raises(TransactionFatal):
        p.publish([RESULT], OFFSETS, None)


def test_config_fits_records_to_the_limit_and_does_not_linger() -> None:
    config = acknowledged_config({"linger.ms": 5, "enable.idempotence": True}, max_record_bytes=1000)
    assert config == {"linger.ms": 0, "enable.idempotence": True, "message.max.bytes": 1000}


def test_a_producer_in_a_fatal_state_is_recreated_though_it_refuses_to_flush() -> None:
    class FatalProducer(FakeProducer):
        def flush(self, timeout: float) -> int:
            raise KafkaException(KafkaError(KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER, "sequence gap", fatal=True))

    made: list[FakeProducer] = [FatalProducer(), FakeProducer()]
    p = AcknowledgedPublisher(
        {},
        commit_interval_s=0.0,
        producer_factory=lambda config, logger: made.pop(0),  # type: ignore[arg-type,return-value]
    )
    p.start()
    p.recreate()
    assert not made  # the second producer was built
    p.publish([RESULT], OFFSETS, None)
