"""One task as the store holds it in memory (``TaskEntry``: its state, the updates it delivered, its
watchers, and what the database holds of it), and the rules by which a result moves a task on: how a
result's sequence is placed, and whether an update advances the task."""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field

from opentelemetry.trace import SpanContext

from aimesh import events
from aimesh.v1 import notifier_pb2, result_pb2, task_pb2

from .updates import Deliver, Update

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


@dataclass(eq=False)
class Watcher:
    tenant: str
    deliver: Deliver
    after: int | None  # the last sequence delivered; None: nothing yet and the watcher wants the current state


@dataclass
class TaskEntry:
    state: notifier_pb2.TaskState
    touched_s: float
    history: deque[Update]  # the updates delivered before the current state, oldest first
    watchers: dict[Hashable, Watcher] = field(default_factory=dict)
    # The span that read the task's latest result: deliveries to subscribers continue its trace.
    trace: SpanContext | None = None
    tenant: str | None = None  # None: not learned yet
    _current: Update | None = None
    # What the database holds of it: the time it was last written with (None: nothing), the sequence of the
    # last history update written, the history updates dropped since (to delete), and whether the history
    # there is stale (patched since).
    written_ms: int | None = None
    history_written: int = 0
    history_dropped: list[int] = field(default_factory=list)
    history_stale: bool = False

    @property
    def known(self) -> bool:
        return self.state.status != result_pb2.TASK_STATUS_UNSPECIFIED

    @property
    def current(self) -> Update:
        """The current state as the one Update every watcher is handed."""
        if self._current is None or self._current.state is not self.state:
            self._current = Update(self.state, self.trace)
        return self._current


def place(state: notifier_pb2.TaskState, result: result_pb2.AIResultEvent) -> int:
    """The result's sequence number; a result from before sequences (0) is placed by its status. The first
    terminal result always ends the task, so it is numbered past every update delivered before it, even when
    the worker numbered it lower (a rerun after a crash that ended sooner than the first attempt had
    streamed, say: cancelled after 3 partial outputs where the first attempt sent 10)."""
    if events.is_terminal(result.status):
        return max(result.sequence, state.sequence + 1, events.FIRST_PARTIAL_SEQUENCE)
    if result.sequence:
        return result.sequence
    return _LEGACY_SEQUENCE.get(result.status, 0)


def advances(state: notifier_pb2.TaskState, status: int, sequence: int) -> bool:
    """Whether an update of ``status`` numbered ``sequence`` moves the task on: never after its end, never
    backwards in status or sequence."""
    if events.is_terminal(state.status) or _rank(status) == 0:
        return False
    return sequence > state.sequence and _rank(status) >= _rank(state.status)


def since(record: TaskEntry, after: int) -> Iterator[Update]:
    """The record's updates numbered above ``after``, in order, the current state last."""
    if record.history and record.history[-1].state.sequence > after:
        yield from (update for update in record.history if update.state.sequence > after)
    yield record.current


def fill_task(state: notifier_pb2.TaskState, task: task_pb2.AITaskEvent) -> None:
    state.submitted_at.CopyFrom(task.submitted_at)
    state.model_name = task.model_name


def with_task(state: notifier_pb2.TaskState, task: task_pb2.AITaskEvent) -> notifier_pb2.TaskState:
    patched = copy_state(state)
    fill_task(patched, task)
    return patched


def patched(update: Update, task: task_pb2.AITaskEvent) -> Update:
    """A kept update read before the task record, with the submission time and model the record brought."""
    state = update.state
    if state.HasField("submitted_at") and state.model_name:
        return update
    return Update(with_task(state, task), update.trace)


def copy_state(state: notifier_pb2.TaskState) -> notifier_pb2.TaskState:
    out = notifier_pb2.TaskState()
    out.CopyFrom(state)
    return out
