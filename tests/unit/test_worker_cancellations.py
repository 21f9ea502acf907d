"""The worker's memory of cancellations, and how the cancellations reader treats records (no Kafka)."""

from __future__ import annotations

from aimesh import events
from aimesh.v1 import task_pb2
from aimesh.worker.cancellation import CancellationReader, Cancellations


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_cancellation_counts_only_for_the_tenant_that_asked() -> None:
    cancellations = Cancellations(60)
    cancellations.add("t1", "acme")
    assert cancellations.is_cancelled("t1", "acme")
    assert not cancellations.is_cancelled("t1", "globex")
    assert not cancellations.is_cancelled("t2", "acme")
    cancellations.add("t1", "globex")  # a second tenant's record adds to the first, it does not replace it
    assert cancellations.is_cancelled("t1", "acme") and cancellations.is_cancelled("t1", "globex")


def test_cancellations_older_than_the_window_are_forgotten() -> None:
    clock = Clock()
    cancellations = Cancellations(60, clock=clock)
    cancellations.add("old", "acme")
    clock.now += 30
    cancellations.add("newer", "acme")
    clock.now += 31
    cancellations.add("newest", "acme")
    assert not cancellations.is_cancelled("old", "acme")
    assert cancellations.is_cancelled("newer", "acme") and cancellations.is_cancelled("newest", "acme")
    assert len(cancellations) == 2


def test_the_reader_records_cancel_events_and_skips_undecodable_records() -> None:
    cancellations = Cancellations(60)
    seen: list[tuple[str, str]] = []
    skipped: list[str] = []
    reader = CancellationReader(
        {},
        "aimesh.tasks.cancel",
        cancellations,
        window_s=60,
        on_cancel=lambda task_id, tenant: seen.append((task_id, tenant)),
        on_undecodable=skipped.append,
    )
    good = task_pb2.AICancelEvent(schema_version=events.SCHEMA_VERSION, task_id="t1", tenant="acme")
    reader.handle(b"t1", good.SerializeToString())
    reader.handle(b"t2", b"\xff\xfe not protobuf")
    reader.handle(b"t3", task_pb2.AICancelEvent(schema_version=99, task_id="t3").SerializeToString())
    reader.handle(b"t4", None)
    assert seen == [("t1", "acme")]
    assert skipped == ["not_protobuf", "unknown_schema_version", "empty_value"]
    assert cancellations.is_cancelled("t1", "acme") and len(cancellations) == 1
