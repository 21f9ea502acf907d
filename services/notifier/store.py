"""What the notifier knows of each task, and who is watching it.

Only the event loop touches the store. A task's first terminal result wins: a repeated terminal result
(an at-least-once worker that ran a task twice) changes nothing, and no update moves a task backwards.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from google.protobuf.timestamp_pb2 import Timestamp
from opentelemetry.trace import SpanContext

from aimesh import events
from aimesh.v1 import notifier_pb2, result_pb2, task_pb2

log = logging.getLogger(__name__)

_RANK: dict[int, int] = {
    result_pb2.TASK_STATUS_UNSPECIFIED: 0,
    result_pb2.TASK_STATUS_QUEUED: 1,
    result_pb2.TASK_STATUS_RUNNING: 2,
}


def _rank(status: int) -> int:
    return 3 if events.is_terminal(status) else _RANK.get(status, 0)


@dataclass(frozen=True)
class Update:
    """One change of a task, as a watcher receives it: the new state and the trace it belongs to."""

    state: notifier_pb2.TaskState
    trace: SpanContext | None = None


@dataclass
class _Record:
    state: notifier_pb2.TaskState
    touched_s: float
    watchers: set[asyncio.Queue[Update]] = field(default_factory=set)
    # The span that read the task's latest result: deliveries to subscribers continue its trace.
    trace: SpanContext | None = None

    @property
    def known(self) -> bool:
        return self.state.status != result_pb2.TASK_STATUS_UNSPECIFIED


class TaskStore:
    """Task states for ``retention_s`` after their last change, and the queues of their watchers."""

    def __init__(self, retention_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._retention_s = retention_s
        self._clock = clock
        self._records: dict[str, _Record] = {}
        self._known = 0  # records whose state is known, kept so len() is cheap

    def get(self, task_id: str) -> notifier_pb2.TaskState | None:
        record = self._records.get(task_id)
        if record is None or not record.known:
            return None
        return _copy(record.state)

    def apply_task(self, task: task_pb2.AITaskEvent) -> None:
        record = self._record(task.task_id)
        state = record.state
        state.submitted_at.CopyFrom(task.submitted_at)
        state.model_name = task.model_name
        if state.status == result_pb2.TASK_STATUS_UNSPECIFIED:
            self._change(record, result_pb2.TASK_STATUS_QUEUED, task.submitted_at, None)

    def apply_result(self, result: result_pb2.AIResultEvent, trace: SpanContext | None = None) -> None:
        record = self._record(result.task_id)
        if _rank(result.status) <= _rank(record.state.status):
            return
        if not record.state.model_name:
            record.state.model_name = result.model_name
        record.trace = trace
        self._change(record, result.status, result.produced_at, result)

    def watch(self, task_id: str) -> asyncio.Queue[Update]:
        """A queue that receives the task's current state (if known) and every later change."""
        record = self._record(task_id)
        queue: asyncio.Queue[Update] = asyncio.Queue()
        if record.known:
            queue.put_nowait(Update(_copy(record.state), record.trace))
        record.watchers.add(queue)
        return queue

    def unwatch(self, task_id: str, queue: asyncio.Queue[Update]) -> None:
        record = self._records.get(task_id)
        if record is None:
            return
        record.watchers.discard(queue)
        if not record.watchers and not record.known:
            del self._records[task_id]

    def expire(self) -> int:
        """Forget tasks unchanged for the retention window that nobody watches; return how many."""
        cutoff = self._clock() - self._retention_s
        stale = [k for k, r in self._records.items() if r.touched_s < cutoff and not r.watchers]
        for key in stale:
            self._known -= self._records.pop(key).known
        return len(stale)

    def watcher_count(self) -> int:
        return sum(len(r.watchers) for r in self._records.values())

    def __len__(self) -> int:
        """Tasks whose state is known. Constant time, and safe to call from another thread (a metrics scrape)."""
        return self._known

    def _record(self, task_id: str) -> _Record:
        record = self._records.get(task_id)
        if record is None:
            record = _Record(notifier_pb2.TaskState(task_id=task_id), self._clock())
            self._records[task_id] = record
        return record

    def _change(self, record: _Record, status: int, when: Timestamp, result: result_pb2.AIResultEvent | None) -> None:
        state = record.state
        if not record.known:
            self._known += 1
        state.status = status  # type: ignore[assignment]
        state.updated_at.CopyFrom(when if when.seconds else events.now_timestamp())
        if result is not None:
            state.result.CopyFrom(result)
        record.touched_s = self._clock()
        for queue in record.watchers:
            queue.put_nowait(Update(_copy(state), record.trace))


def _copy(state: notifier_pb2.TaskState) -> notifier_pb2.TaskState:
    out = notifier_pb2.TaskState()
    out.CopyFrom(state)
    return out
