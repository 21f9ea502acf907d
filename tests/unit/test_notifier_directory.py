"""Which partitioned notifier replica owns a task: the partitioner, the directory read from the consumer
group's description, and where the feed starts a partition it is assigned."""

import uuid
import zlib
from typing import Any

import pytest
from confluent_kafka import OFFSET_END, TopicPartition

from aimesh.notifier import feed as feed_module
from aimesh.notifier.directory import PartitionDirectory, owners_of
from aimesh.notifier.feed import Feed
from aimesh.notifier.ownership import partition_of


def a_feed(**kwargs: Any) -> Feed:
    """A feed of the topics ``tasks`` and ``results`` whose thread never runs: its decisions are called directly."""
    return Feed(
        {"group.id": "g"},
        tasks_topics=("tasks",),
        results_topic="results",
        history_s=60,
        deliver=lambda batch, offsets: None,
        loop=None,  # type: ignore[arg-type]
        **kwargs,
    )


def test_a_task_belongs_to_the_partition_librdkafkas_default_partitioner_picks() -> None:
    task_ids = [str(uuid.uuid4()) for _ in range(200)]
    # consistent_random: CRC-32 of the key (the project's record finder relies on the same).
    assert all(partition_of(t, 6) == zlib.crc32(t.encode()) % 6 for t in task_ids)
    assert {partition_of(t, 6) for t in task_ids} == set(range(6))


def test_the_directory_maps_each_results_partition_to_the_address_its_owner_committed() -> None:
    committed = {  # kafka.committed's answer: partition 3, never announced, is not in it
        ("results", 0): (10, "a:1"),
        ("results", 1): (0, "a:1"),
        ("results", 2): (5, "b:2"),
        ("results", 4): (7, ""),  # committed by something else
    }
    assert owners_of(committed) == {0: "a:1", 1: "a:1", 2: "b:2"}


def test_own_partitions_answer_locally_once_read_and_others_name_their_owner() -> None:
    directory = PartitionDirectory("me:1")
    directory.partitions = 3
    by_partition = {}
    while len(by_partition) < 3:
        task_id = str(uuid.uuid4())
        by_partition.setdefault(partition_of(task_id, 3), task_id)
    directory.assigned([0])
    directory.learn({1: "other:2"})
    assert directory.is_local(by_partition[0]) and not directory.is_ready(by_partition[0])
    directory.caught_up([0, 1])  # only its own partitions can be read by it
    assert directory.is_ready(by_partition[0]) and not directory.is_ready(by_partition[1])
    assert directory.owner_address(by_partition[0]) == "me:1"
    assert directory.owner_address(by_partition[1]) == "other:2"
    assert directory.owner_address(by_partition[2]) is None  # in transit
    directory.revoked([0])
    assert not directory.is_local(by_partition[0]) and not directory.is_ready(by_partition[0])


class OffsetsForTimes:
    """A consumer that knows, per partition, the first offset at or after the window's start (-1: none)."""

    def __init__(self, first: dict[tuple[str, int], int]) -> None:
        self._first = first

    def offsets_for_times(self, wanted: list[TopicPartition], timeout: float) -> list[TopicPartition]:
        return [TopicPartition(p.topic, p.partition, self._first[(p.topic, p.partition)]) for p in wanted]


def test_a_partition_resumes_after_the_saved_state_unless_that_is_older_than_the_window() -> None:
    feed = a_feed(saved_offsets={("results", 0): 500, ("results", 1): 20})
    consumer = OffsetsForTimes({("results", 0): 100, ("results", 1): 300, ("results", 2): 40, ("tasks", 0): -1})
    wanted = [TopicPartition(t, p) for t, p in [("results", 0), ("results", 1), ("results", 2), ("tasks", 0)]]
    starts = {(p.topic, p.partition): p.offset for p in feed._starts(consumer, wanted)}  # type: ignore[arg-type]
    assert starts == {
        ("results", 0): 500,  # saved, and within the window
        ("results", 1): 300,  # saved before the window: what is older has expired
        ("results", 2): 40,  # nothing saved: the window
        ("tasks", 0): OFFSET_END,  # nothing in the window
    }


class Positions:
    """A consumer whose partitions stand at the positions a test sets."""

    def __init__(self) -> None:
        self.at: dict[tuple[str, int], int] = {}

    def position(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        return [TopicPartition(p.topic, p.partition, self.at[(p.topic, p.partition)]) for p in partitions]


def test_a_partition_counts_as_read_at_its_end_or_once_it_stalls_short_of_it(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(feed_module.time, "monotonic", lambda: now[0])
    feed = a_feed()
    consumer = Positions()
    # Both end at 1,000: one is read steadily (a long backlog), the other stops at 400 (an open transaction).
    feed._targets = {("results", 0): (1000, -1, now[0]), ("results", 1): (1000, -1, now[0])}
    pending = {}
    for second in range(1, 40):
        now[0] = 100.0 + second
        consumer.at = {("results", 0): min(1000, 30 * second), ("results", 1): min(400, 100 * second)}
        feed._drop_reached(consumer)  # type: ignore[arg-type]
        pending[second] = {partition for _, partition in feed._targets}
    assert pending[19] == {0, 1}  # the stalled one moved last at second 4: not yet STALLED_S ago
    assert pending[20] == {0}  # a backlog still being read is never taken for a stall
    assert pending[33] == {0} and pending[34] == set()  # read to its end


class Partitions:
    """A consumer for ``_assign``: every partition has ``ends[partition]`` records, all within the window."""

    def __init__(self, ends: dict[int, int]) -> None:
        self.ends = ends
        self.assigned: list[TopicPartition] = []

    def offsets_for_times(self, wanted: list[TopicPartition], timeout: float) -> list[TopicPartition]:
        return [TopicPartition(p.topic, p.partition, 0 if self.ends[p.partition] else -1) for p in wanted]

    def get_watermark_offsets(self, p: TopicPartition, timeout: float, cached: bool) -> tuple[int, int]:
        return 0, self.ends[p.partition]

    def incremental_assign(self, partitions: list[TopicPartition]) -> None:
        self.assigned += partitions


def test_a_partition_assigned_with_nothing_to_read_answers_at_once_and_one_with_records_once_read() -> None:
    directory = PartitionDirectory("me:1")
    directory.partitions = 2
    feed = a_feed(directory=directory)
    consumer = Partitions({0: 0, 1: 50})  # partition 0 empty (in both topics), partition 1 with 50 records
    assigned = [TopicPartition(t, p) for t in ("tasks", "results") for p in (0, 1)]
    feed._assign(consumer, assigned)  # type: ignore[arg-type]
    by_partition = {}
    while len(by_partition) < 2:
        task_id = str(uuid.uuid4())
        by_partition.setdefault(partition_of(task_id, 2), task_id)
    assert directory.is_ready(by_partition[0])
    assert directory.is_local(by_partition[1]) and not directory.is_ready(by_partition[1])
