"""What the notifier knows of each task, and who is watching it.

Only the event loop touches the store. A task's first terminal result wins: a repeated terminal result
(which the transactional worker does not publish, but any other writer of the topic could) changes nothing,
and no update moves a task backwards (a RUNNING event repeated after a worker crash arrives late, say).

Every task belongs to a tenant, learned from its task record (an empty tenant there: a record from before
tenants, the default tenant's) or from a result that carries one (an empty tenant on a result says
nothing). Only that tenant's watchers and lookups see the task. While the tenant is not known yet, nobody
sees the task: watchers wait and get its state once it is; a watcher of another tenant then gets DENIED.
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


class Denied:
    """Put in a watcher's queue instead of an update: the task belongs to another tenant."""


DENIED = Denied()

WatchItem = Update | Denied


@dataclass(eq=False)
class _Watcher:
    tenant: str
    queue: asyncio.Queue[WatchItem]


@dataclass
class _Record:
    state: notifier_pb2.TaskState
    touched_s: float
    watchers: dict[asyncio.Queue[WatchItem], _Watcher] = field(default_factory=dict)
    # The span that read the task's latest result: deliveries to subscribers continue its trace.
    trace: SpanContext | None = None
    tenant: str | None = None  # None: not learned yet

    @property
    def known(self) -> bool:
        return self.state.status != result_pb2.TASK_STATUS_UNSPECIFIED


class TaskStore:
    """Task states for ``retention_s`` after their last change, and the queues of their watchers."""

    def __init__(
        self, retention_s: float, *, default_tenant: str = "default", clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._retention_s = retention_s
        self._default_tenant = default_tenant
        self._clock = clock
        self._records: dict[str, _Record] = {}
        self._known = 0  # records whose state is known, kept so len() is cheap

    def get(self, task_id: str, tenant: str | None = None) -> notifier_pb2.TaskState | None:
        """The task's state if it is known and ``tenant``'s (``None``: the default tenant)."""
        record = self._records.get(task_id)
        if record is None or not record.known or record.tenant != (tenant or self._default_tenant):
            return None
        return _copy(record.state)

    def apply_task(self, task: task_pb2.AITaskEvent) -> None:
        record = self._record(task.task_id)
        state = record.state
        state.submitted_at.CopyFrom(task.submitted_at)
        state.model_name = task.model_name
        learned = self._learn_tenant(record, task.tenant or self._default_tenant)
        if state.status == result_pb2.TASK_STATUS_UNSPECIFIED:
            self._change(record, result_pb2.TASK_STATUS_QUEUED, task.submitted_at, None)
        elif learned:
            self._notify(record)

    def apply_result(self, result: result_pb2.AIResultEvent, trace: SpanContext | None = None) -> None:
        record = self._record(result.task_id)
        learned = bool(result.tenant) and self._learn_tenant(record, result.tenant)
        if _rank(result.status) <= _rank(record.state.status):
            if learned:
                self._notify(record)
            return
        if not record.state.model_name:
            record.state.model_name = result.model_name
        record.trace = trace
        self._change(record, result.status, result.produced_at, result)

    def watch(self, task_id: str, tenant: str | None = None) -> asyncio.Queue[WatchItem]:
        """A queue that receives the task's current state (if known) and every later change, once the task is
        known to be ``tenant``'s (``None``: the default tenant); DENIED, and nothing more, once it is known to
        be another tenant's."""
        record = self._record(task_id)
        watcher = _Watcher(tenant or self._default_tenant, asyncio.Queue())
        record.watchers[watcher.queue] = watcher
        self._send(record, watcher)
        return watcher.queue

    def unwatch(self, task_id: str, queue: asyncio.Queue[WatchItem]) -> None:
        record = self._records.get(task_id)
        if record is None:
            return
        record.watchers.pop(queue, None)
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
        self._notify(record)

    @staticmethod
    def _learn_tenant(record: _Record, tenant: str) -> bool:
        """Record the task's tenant unless known already (the first source wins); whether it was learned now."""
        if record.tenant is not None:
            return False
        record.tenant = tenant
        return True

    def _notify(self, record: _Record) -> None:
        for watcher in list(record.watchers.values()):
            self._send(record, watcher)

    @staticmethod
    def _send(record: _Record, watcher: _Watcher) -> None:
        """The record's current state to ``watcher``, if it may see it; DENIED (once) if it may not."""
        if record.tenant is None:
            return  # held back until the tenant is known
        if record.tenant != watcher.tenant:
            # A denied watcher hears nothing more: it ends its stream on DENIED and unwatches.
            del record.watchers[watcher.queue]
            watcher.queue.put_nowait(DENIED)
        elif record.known:
            watcher.queue.put_nowait(Update(_copy(record.state), record.trace))


def _copy(state: notifier_pb2.TaskState) -> notifier_pb2.TaskState:
    out = notifier_pb2.TaskState()
    out.CopyFrom(state)
    return out
