"""The soak's ledger of outcomes: the results topic read as a read_committed consumer from its first offset, terminal
results counted per task id, and the end-of-run check that every accepted task ended exactly once."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from aimesh import events
from aimesh.kafka import fetch
from aimesh.v1 import result_pb2


def _reader(bootstrap: str, topic: str, group: str | None = None) -> tuple[Consumer, list[int]]:
    """A consumer of ``topic`` from its first offset, partitions assigned (no group membership, no commits)."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group or f"soak-reader-{uuid.uuid4()}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",  # records of open or aborted transactions stay invisible
            "enable.partition.eof": True,
        }
    )
    partitions = sorted(consumer.list_topics(topic, timeout=30).topics[topic].partitions)
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
    return consumer, partitions


class ResultLedger:
    """Follows the results topic on a thread: how many terminal results each task has, their status, and when
    the first one was read (the expiry lookups need tasks that ended long ago)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self._consumer, _ = _reader(bootstrap, topic)
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.status: dict[str, int] = {}
        self.ended_at: dict[str, float] = {}  # time.monotonic() of the first terminal result read
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="result-ledger", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for message in fetch(self._consumer, 1000, 0.2):
                if message.error() is None:
                    self._record(events.decode_result(message.value()))

    def _record(self, result: result_pb2.AIResultEvent) -> None:
        if not events.is_terminal(result.status):
            return
        with self._lock:
            self.counts[result.task_id] += 1
            self.status.setdefault(result.task_id, result.status)
            self.ended_at.setdefault(result.task_id, time.monotonic())

    def missing(self, task_ids: Collection[str]) -> list[str]:
        with self._lock:
            return [t for t in task_ids if t not in self.counts]

    def ended_before(self, moment: float, among: Iterable[str]) -> list[str]:
        with self._lock:
            return [t for t in among if self.ended_at.get(t, moment) < moment]

    def wait_for(self, task_ids: Collection[str], timeout_s: float) -> list[str]:
        """Wait until every task in ``task_ids`` has a terminal result; return those still without one."""
        deadline = time.monotonic() + timeout_s
        while (missing := self.missing(task_ids)) and time.monotonic() < deadline:
            time.sleep(0.5)
        return missing

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._consumer.close()


def terminal_counts(bootstrap: str, topic: str, timeout_s: float = 120.0) -> tuple[Counter[str], Counter[str]]:
    """Read the whole results topic afresh: terminal results per task id, and terminal results per status name."""
    consumer, partitions = _reader(bootstrap, topic)
    per_task: Counter[str] = Counter()
    per_status: Counter[str] = Counter()
    at_end: set[int] = set()
    deadline = time.monotonic() + timeout_s
    try:
        while at_end != set(partitions):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{topic} not read to its end within {timeout_s:.0f} s")
            for message in consumer.consume(1000, 0.5):
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        at_end.add(message.partition())
                    continue
                at_end.discard(message.partition())
                result = events.decode_result(message.value())
                if events.is_terminal(result.status):
                    per_task[result.task_id] += 1
                    per_status[result_pb2.TaskStatus.Name(result.status)] += 1
    finally:
        consumer.close()
    return per_task, per_status


def wait_caught_up(bootstrap: str, group: str, topics: Iterable[str], timeout_s: float = 120.0) -> None:
    """Wait until consumer group ``group`` has committed the end of every partition of ``topics``: every task record
    is processed for good, so no late result (nor a late duplicate) can follow."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    try:
        partitions = [
            TopicPartition(topic, p)
            for topic in topics
            for p in consumer.list_topics(topic, timeout=30).topics[topic].partitions
        ]
        deadline = time.monotonic() + timeout_s
        while behind := _behind(consumer, partitions):
            if time.monotonic() > deadline:
                raise TimeoutError(f"group {group} still behind after {timeout_s:.0f} s (committed, end): {behind}")
            time.sleep(0.5)
    finally:
        consumer.close()


def _behind(consumer: Consumer, partitions: list[TopicPartition]) -> dict[str, tuple[int, int]]:
    behind = {}
    for tp in consumer.committed(partitions, timeout=10):
        low, high = consumer.get_watermark_offsets(tp, timeout=10, cached=False)
        committed = tp.offset if tp.offset >= 0 else low  # never committed: done only if the partition is empty
        if committed < high:
            behind[f"{tp.topic}[{tp.partition}]"] = (committed, high)
    return behind


@dataclass(frozen=True)
class ExactlyOnce:
    accepted: int
    exactly_once: int
    missing: list[str]
    duplicated: dict[str, int]
    unknown: dict[str, int]  # terminal results of task ids the harness was never given (refused, or lost)

    @property
    def passed(self) -> bool:
        return not (self.missing or self.duplicated or self.unknown)


def check_exactly_once(accepted: Collection[str], counts: Counter[str]) -> ExactlyOnce:
    wanted = set(accepted)
    return ExactlyOnce(
        accepted=len(wanted),
        exactly_once=sum(1 for t in wanted if counts.get(t) == 1),
        missing=sorted(t for t in wanted if t not in counts),
        duplicated={t: counts[t] for t in sorted(wanted) if counts.get(t, 0) > 1},
        unknown={t: n for t, n in sorted(counts.items()) if t not in wanted},
    )
