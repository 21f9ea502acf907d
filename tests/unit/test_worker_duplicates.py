"""Repeated task records: which record of a derived task id runs (the pure core), what a new owner of a partition
reads to learn the ids it will not fetch again, and what the worker publishes for a duplicate (against the fake
publisher at its seam). The real broker and two ingest replicas: tests/integration/test_idempotency_replicas.py."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from test_worker_poison_outcomes import TASKS, FakePublisher, IdleConsumer, make_worker, results, task_record

from aimesh import events, finished_offsets, kafka
from aimesh.ingest.idempotency import derived_task_id
from aimesh.kafka import Record
from aimesh.v1 import task_pb2
from aimesh.worker.duplicates import FirstOffsets, derived_id, rebuild_ranges

ID = derived_task_id("acme", "order-17")
OTHER = derived_task_id("acme", "order-18")


def test_only_canonical_version_5_task_ids_are_derived_ones() -> None:
    assert derived_id(ID.encode()) == ID
    assert derived_id(str(uuid.uuid4()).encode()) is None  # random ids never repeat: not tracked
    assert derived_id(ID.upper().encode()) is None
    assert derived_id(None) is None and derived_id(b"") is None
    assert derived_id(ID.replace("-", "x").encode()) is None
    assert derived_id(b"\xff" * 36) is None


def test_the_first_offset_of_a_task_id_runs_and_later_ones_are_duplicates() -> None:
    seen = FirstOffsets(window_s=60)
    assert not seen.note(ID, 10, 1000.0)
    assert not seen.note(OTHER, 11, 1000.0)
    assert seen.note(ID, 12, 1001.0)
    assert seen.note(ID, 30, 1002.0)
    assert not seen.note(ID, 10, 1003.0)  # the first one fetched again (after a rewind) still runs


def test_an_earlier_offset_learned_late_is_the_one_that_runs() -> None:
    # A new owner reads a finished offset above the committed one before it fetches the task still owed below it:
    # the lower offset is the first, whatever order they are learned in.
    seen = FirstOffsets(window_s=60)
    assert not seen.note(ID, 9, 1001.0)
    assert not seen.note(ID, 5, 1000.0)
    assert seen.note(ID, 9, 1001.0)
    assert seen.note(ID, 7, 1000.5)


def test_ids_older_than_the_window_of_the_partitions_records_are_forgotten() -> None:
    seen = FirstOffsets(window_s=60)
    seen.note(ID, 1, 1000.0)
    seen.note(OTHER, 2, 1030.0)
    assert seen.note(ID, 3, 1059.0)  # within the window of the first
    assert not seen.note(ID, 4, 1061.0)  # past it: forgotten, runs again
    assert len(seen) == 2  # OTHER (1030) and ID again (at 4)
    seen.note(str(uuid.uuid4()), 5, 1200.0)
    assert len(seen) == 1


def test_a_new_owner_reads_from_the_window_up_to_the_last_offset_it_will_not_fetch_again() -> None:
    p0, p1, p2, p3 = ("t", 0), ("t", 1), ("t", 2), ("t", 3)
    committed = {
        p0: (100, ""),  # nothing finished above the committed offset
        p1: (100, finished_offsets.encode(100, [103, 104, 110])),  # up to the highest finished one, inclusive
        p2: (100, ""),  # no record in the window: nothing to read
        p3: (50, ""),  # the window starts past the committed offset: nothing it will not fetch
    }
    starts = {p0: 40, p1: 40, p2: -1, p3: 60}
    assert rebuild_ranges(committed, starts) == {p0: (40, 100), p1: (40, 111)}


def derived_record(task_id: str, offset: int) -> Record:
    task = task_pb2.AITaskEvent(
        schema_version=events.SCHEMA_VERSION,
        task_id=task_id,
        model_name="sleep",
        input=task_pb2.TaskInput(text="once"),
        tenant="acme",
    )
    return Record(TASKS, 0, offset, task_id.encode(), task.SerializeToString(), [])


async def test_a_duplicate_record_runs_nothing_publishes_nothing_and_its_offset_commits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    publisher = FakePublisher()
    worker = make_worker(publisher)
    monkeypatch.setattr(kafka, "consumer", IdleConsumer)
    worker.consumer.subscribe(asyncio.get_running_loop())
    worker.ledger.assign([(TASKS, 0)])
    other = task_record("other", partition=0, offset=1)
    for record in (derived_record(ID, 0), other, derived_record(ID, 2)):
        worker.consumer.take(record, 1_000_000)
    await asyncio.sleep(0)  # the records handed to the event loop reach the scheduler
    await worker.scheduler.drain(grace_s=5.0)  # and every task they started ends
    assert worker.committer.publish_ready()
    assert sorted(results(publisher)) == sorted([ID, other.key.decode()])  # type: ignore[union-attr]
    assert len(publisher.committed) == 2  # two results, nothing for the duplicate
    assert publisher.committed_offsets == [(0, 3)]  # its offset is committed all the same
    assert worker.metrics.duplicate_tasks.labels(TASKS)._value.get() == 1
