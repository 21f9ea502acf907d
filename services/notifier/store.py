"""What the notifier knows of each task, and who is watching it.

Only the event loop touches the store. A task's first terminal result wins: a repeated terminal result
(which the transactional worker does not publish, but any other writer of the topic could) changes nothing,
and no update moves a task backwards (a RUNNING event repeated after a worker crash arrives late, say).

Every update a task goes through has a sequence number (``TaskState.sequence``, from
``AIResultEvent.sequence``): 1 QUEUED (from the task record), 2 RUNNING, 3 and on the partial outputs of a
streaming model, the terminal result one past the last partial output. A result with sequence 0 (written
before sequences) is placed by its status: QUEUED 1, RUNNING 2, a terminal one past the task's last update
(3 at least). The store takes an update only if its sequence is greater than the task's last one, so a
worker that reruns a task after a crash and publishes RUNNING and the same partial outputs again delivers
nothing twice; a sequence may be skipped (a partial output lost with a crashed worker's aborted transaction
is not republished if the rerun produces fewer), never repeated or reordered. The first terminal result is
always taken, numbered one past the last update delivered if the worker numbered it lower.

Each task keeps the updates it delivered (at most ``max_updates_per_task``; past that the oldest are
forgotten) for as long as the task itself, so a watcher that resumes with ``after_sequence=k`` gets every
kept update whose sequence is greater than ``k``, in order, then the live ones. A fresh watcher
(``after_sequence=0``) gets the current state, then every change; when the task is in the middle of a
stream of partial outputs its "current state" is all of them so far (every kept partial output, in order),
so that a late watcher can still put the whole text together.

Every watcher of a task is handed the same ``Update`` objects: a state, once handed out, is never changed
(a change makes a new one), so a thousand watchers of a streaming task hold one copy of each output.

Every task belongs to a tenant, learned from its task record (an empty tenant there: a record from before
tenants, the default tenant's) or from a result that carries one (an empty tenant on a result says
nothing). Only that tenant's watchers and lookups see the task. While the tenant is not known yet, nobody
sees the task: watchers wait and get its updates once it is; a watcher of another tenant then gets DENIED.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field

from google.protobuf.timestamp_pb2 import Timestamp
from opentelemetry.trace import SpanContext

from aimesh import events
from aimesh.v1 import notifier_pb2, result_pb2, task_pb2

log = logging.getLogger(__name__)

DEFAULT_MAX_UPDATES_PER_TASK = 10_000

_RANK: dict[int, int] = {
    result_pb2.TASK_STATUS_UNSPECIFIED: 0,
    result_pb2.TASK_STATUS_QUEUED: 1,
    result_pb2.TASK_STATUS_RUNNING: 2,
}

_LEGACY_SEQUENCE: dict[int, int] = {
    result_pb2.TASK_STATUS_QUEUED: events.QUEUED_SEQUENCE,
    result_pb2.TASK_STATUS_RUNNING: events.RUNNING_SEQUENCE,
}


def _rank(status: int) -> int:
    return 3 if events.is_terminal(status) else _RANK.get(status, 0)


@dataclass(frozen=True)
class Update:
    """One change of a task, as a watcher receives it: the new state and the trace it belongs to. Shared by
    every watcher: never change ``state``."""

    state: notifier_pb2.TaskState
    trace: SpanContext | None = None

    @functools.cached_property
    def size_bytes(self) -> int:
        """The state's serialized size: what sending it costs, and what a watcher's buffer counts."""
        return self.state.ByteSize()


class Denied:
    """Put in a watcher's queue instead of an update: the task belongs to another tenant."""


class Ended:
    """Put in a watcher's queue instead of an update: the task has ended and the watcher resumed after its
    terminal update, so nothing more will come."""


DENIED = Denied()
ENDED = Ended()

WatchItem = Update | Denied | Ended
Deliver = Callable[[WatchItem], None]


@dataclass(eq=False)
class _Watcher:
    tenant: str
    deliver: Deliver
    after: int | None  # the last sequence delivered; None: nothing yet and the watcher wants the current state


@dataclass
class _Record:
    state: notifier_pb2.TaskState
    touched_s: float
    history: deque[Update]  # the updates delivered before the current state, oldest first
    watchers: dict[Hashable, _Watcher] = field(default_factory=dict)
    # The span that read the task's latest result: deliveries to subscribers continue its trace.
    trace: SpanContext | None = None
    tenant: str | None = None  # None: not learned yet
    _current: Update | None = None

    @property
    def known(self) -> bool:
        return self.state.status != result_pb2.TASK_STATUS_UNSPECIFIED

    @property
    def current(self) -> Update:
        """The current state as the one Update every watcher is handed."""
        if self._current is None or self._current.state is not self.state:
            self._current = Update(self.state, self.trace)
        return self._current


class TaskStore:
    """Task states and their updates for ``retention_s`` after their last change, and their watchers."""

    def __init__(
        self,
        retention_s: float,
        *,
        default_tenant: str = "default",
        max_updates_per_task: int = DEFAULT_MAX_UPDATES_PER_TASK,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_updates_per_task < 1:
            raise ValueError("max_updates_per_task must be at least 1")
        self._retention_s = retention_s
        self._default_tenant = default_tenant
        # The current state is kept apart from the history: the history holds one update fewer.
        self._history_len = max_updates_per_task - 1
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
        if record.known:
            # Results read before the task record: their states were handed out, so patch copies.
            record.state = _with_task(record.state, task)
            record.history = deque((_patched(u, task) for u in record.history), maxlen=record.history.maxlen)
        else:
            _fill_task(record.state, task)
        state = record.state
        learned = self._learn_tenant(record, task.tenant or self._default_tenant)
        if state.status == result_pb2.TASK_STATUS_UNSPECIFIED:
            self._change(record, result_pb2.TASK_STATUS_QUEUED, events.QUEUED_SEQUENCE, task.submitted_at, None, None)
        elif learned:
            self._notify(record)

    def apply_result(self, result: result_pb2.AIResultEvent, trace: SpanContext | None = None) -> None:
        record = self._record(result.task_id)
        learned = bool(result.tenant) and self._learn_tenant(record, result.tenant)
        sequence = self._place(record.state, result)
        if not _advances(record.state, result.status, sequence):
            if learned:
                self._notify(record)
            return
        if not record.state.model_name:
            record.state.model_name = result.model_name
        self._change(record, result.status, sequence, result.produced_at, result, trace)

    def watch(self, task_id: str, tenant: str | None = None, after_sequence: int = 0) -> asyncio.Queue[WatchItem]:
        """A queue that receives the task's updates (see ``subscribe``); ``unwatch`` it when done."""
        queue: asyncio.Queue[WatchItem] = asyncio.Queue()
        self.subscribe(task_id, queue, queue.put_nowait, tenant, after_sequence)
        return queue

    def unwatch(self, task_id: str, queue: asyncio.Queue[WatchItem]) -> None:
        self.unsubscribe(task_id, queue)

    def subscribe(
        self, task_id: str, key: Hashable, deliver: Deliver, tenant: str | None = None, after_sequence: int = 0
    ) -> None:
        """Call ``deliver`` with the task's updates once the task is known to be ``tenant``'s (``None``: the
        default tenant): with ``after_sequence`` 0 its current state, else every kept update with a greater
        sequence, then every later change. DENIED, and nothing more, once the task is known to be another
        tenant's; ENDED, and nothing more, if the task has ended at or before ``after_sequence``. ``key``
        names the subscription for ``unsubscribe`` (one per task and key)."""
        record = self._record(task_id)
        watcher = _Watcher(tenant or self._default_tenant, deliver, after_sequence or None)
        record.watchers[key] = watcher
        self._send(record, key, watcher)

    def unsubscribe(self, task_id: str, key: Hashable) -> None:
        record = self._records.get(task_id)
        if record is None:
            return
        record.watchers.pop(key, None)
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
            record = _Record(
                notifier_pb2.TaskState(task_id=task_id), self._clock(), deque(maxlen=max(0, self._history_len))
            )
            self._records[task_id] = record
        return record

    @staticmethod
    def _place(state: notifier_pb2.TaskState, result: result_pb2.AIResultEvent) -> int:
        """The result's sequence number; a result from before sequences (0) is placed by its status. The first
        terminal result always ends the task, so it is numbered past every update delivered before it, even when
        the worker numbered it lower (a rerun after a crash that ended sooner than the first attempt had
        streamed, say: cancelled after 3 partial outputs where the first attempt sent 10)."""
        if events.is_terminal(result.status):
            return max(result.sequence, state.sequence + 1, events.FIRST_PARTIAL_SEQUENCE)
        if result.sequence:
            return result.sequence
        return _LEGACY_SEQUENCE.get(result.status, 0)

    def _change(
        self,
        record: _Record,
        status: int,
        sequence: int,
        when: Timestamp,
        result: result_pb2.AIResultEvent | None,
        trace: SpanContext | None,
    ) -> None:
        if record.known:
            if self._history_len > 0:
                record.history.append(record.current)
            state = _copy(record.state)
        else:
            self._known += 1
            state = record.state
        state.status = status  # type: ignore[assignment]
        state.sequence = sequence
        state.updated_at.CopyFrom(when if when.seconds else events.now_timestamp())
        if result is not None:
            state.result.CopyFrom(result)
        record.state = state
        record.trace = trace
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
        for key, watcher in list(record.watchers.items()):
            self._send(record, key, watcher)

    @staticmethod
    def _send(record: _Record, key: Hashable, watcher: _Watcher) -> None:
        """What ``watcher`` has not had yet of the record, if it may see it; DENIED (once) if it may not."""
        if record.tenant is None:
            return  # held back until the tenant is known
        if record.tenant != watcher.tenant:
            # A denied watcher hears nothing more: it ends its stream on DENIED and unwatches.
            del record.watchers[key]
            watcher.deliver(DENIED)
            return
        if not record.known:
            return
        state = record.state
        if watcher.after is None:
            # The current state; in the middle of a stream of partial outputs, all of them so far.
            partial = state.status == result_pb2.TASK_STATUS_RUNNING and state.result.partial
            watcher.after = events.RUNNING_SEQUENCE if partial else state.sequence - 1
        if watcher.after >= state.sequence:
            if events.is_terminal(state.status):
                del record.watchers[key]
                watcher.deliver(ENDED)
            return
        for update in _since(record, watcher.after):
            watcher.deliver(update)
        watcher.after = state.sequence


def _advances(state: notifier_pb2.TaskState, status: int, sequence: int) -> bool:
    """Whether an update of ``status`` numbered ``sequence`` moves the task on: never after its end, never
    backwards in status or sequence."""
    if events.is_terminal(state.status) or _rank(status) == 0:
        return False
    return sequence > state.sequence and _rank(status) >= _rank(state.status)


def _since(record: _Record, after: int) -> Iterator[Update]:
    """The record's updates numbered above ``after``, in order, the current state last."""
    if record.history and record.history[-1].state.sequence > after:
        yield from (update for update in record.history if update.state.sequence > after)
    yield record.current


def _fill_task(state: notifier_pb2.TaskState, task: task_pb2.AITaskEvent) -> None:
    state.submitted_at.CopyFrom(task.submitted_at)
    state.model_name = task.model_name


def _with_task(state: notifier_pb2.TaskState, task: task_pb2.AITaskEvent) -> notifier_pb2.TaskState:
    patched = _copy(state)
    _fill_task(patched, task)
    return patched


def _patched(update: Update, task: task_pb2.AITaskEvent) -> Update:
    """A kept update read before the task record, with the submission time and model the record brought."""
    state = update.state
    if state.HasField("submitted_at") and state.model_name:
        return update
    return Update(_with_task(state, task), update.trace)


def _copy(state: notifier_pb2.TaskState) -> notifier_pb2.TaskState:
    out = notifier_pb2.TaskState()
    out.CopyFrom(state)
    return out
