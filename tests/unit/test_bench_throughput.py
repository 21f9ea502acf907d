"""The throughput benchmark's result reader: workers that already run may finish a task before its submit returns."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from aimesh.v1 import result_pb2
from benchmarks import common


class _Message:
    def __init__(self, task_id: str, status: result_pb2.TaskStatus.ValueType) -> None:
        self._value = result_pb2.AIResultEvent(task_id=task_id, status=status).SerializeToString()

    def error(self) -> None:
        return None

    def value(self) -> bytes:
        return self._value

    def timestamp(self) -> tuple[int, int]:
        return (1, 1_000)


class _Topic:
    """Stands in for the results topic: ``publish`` hands records to the reader's next fetch, and returns once the
    reader has taken them and fetched again (so it has handled them)."""

    def __init__(self) -> None:
        self._batches: queue.Queue[tuple[int, list[_Message]]] = queue.Queue()
        self._changed = threading.Condition()
        self._fetches = 0
        self._taken: dict[int, int] = {}  # batch -> the fetch that took it

    def fetch(self, consumer: object, max_messages: int, timeout_s: float) -> list[_Message]:
        with self._changed:
            self._fetches += 1
            this = self._fetches
            self._changed.notify_all()
        try:
            batch, messages = self._batches.get(timeout=timeout_s)
        except queue.Empty:
            return []
        with self._changed:
            self._taken[batch] = this
        return messages

    def publish(self, *messages: _Message) -> None:
        batch = len(self._taken) + self._batches.qsize()
        self._batches.put((batch, list(messages)))
        with self._changed:
            assert self._changed.wait_for(lambda: self._fetches > self._taken.get(batch, self._fetches), timeout=5)


class _Consumer:
    def __init__(self, config: dict[str, Any]) -> None:
        pass

    def assign(self, partitions: object) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.fixture
def topic(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Topic]:
    fake = _Topic()
    monkeypatch.setattr(common, "Consumer", _Consumer)
    monkeypatch.setattr(common, "end_offsets", lambda bootstrap, topic: [])
    monkeypatch.setattr(common, "fetch", fake.fetch)
    yield fake


def test_a_result_read_before_its_task_is_expected_still_counts(topic: _Topic) -> None:
    succeeded = result_pb2.TASK_STATUS_SUCCEEDED
    with common.ResultReader("bootstrap", "results") as reader:
        topic.publish(_Message("early", succeeded), _Message("someone-else", result_pb2.TASK_STATUS_FAILED))
        reader.expect(["early", "late"])
        topic.publish(_Message("late", succeeded))
        arrivals = reader.wait(timeout_s=5)
    assert len(arrivals) == 2  # the other task's result (failed, not awaited) neither counts nor fails the wait
