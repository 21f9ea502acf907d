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

On disk: every known task lives in a key-value database (``state_db``; RocksDB in the service): its record
(tenant, time of its last change, current state) under ``s/<id>``, each kept update under ``h/<id>/<sequence>``,
and an index ``t/<last change ms><id>`` by which expiry finds what to remove. The feed calls ``flush`` after
every batch of records with the offsets the batch reached; one atomic write holds both, so after a restart the
state reflects exactly the records before the saved offsets and reading resumes there. Memory holds the tasks
being watched and a bounded cache of the most recently changed others; any other is read from disk when asked
for (an update's trace context is not kept on disk: a delivery of a task read back starts its own trace).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import struct
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass, field

from google.protobuf.timestamp_pb2 import Timestamp
from opentelemetry.trace import SpanContext

from aimesh import events
from aimesh.v1 import notifier_pb2, result_pb2, task_pb2

from .ownership import partition_of
from .state_db import Batch, MemoryStateDb, StateDb

log = logging.getLogger(__name__)

DEFAULT_MAX_UPDATES_PER_TASK = 10_000
DEFAULT_CACHE_TASKS = 10_000
# Most tasks one expire() call forgets: the event loop's pause for one write of their deletions.
EXPIRE_BATCH = 5_000

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


class Moved:
    """Put in a watcher's queue instead of an update: the task's partition moved to another notifier replica,
    so nothing more will come from this one (the servicer follows the task at its new owner)."""


DENIED = Denied()
ENDED = Ended()
MOVED = Moved()

WatchItem = Update | Denied | Ended | Moved
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


class TaskStore:
    """Task states and their updates for ``retention_s`` after their last change, and their watchers.

    Every known task lives in ``db`` (see the module's "On disk"); at most ``cache_tasks`` of those nobody
    watches stay in memory besides, the most recently used. Changes are written by ``flush``, which the feed
    calls after each batch of records with the offsets that batch reached, so the database always reflects
    a prefix of every partition.
    """

    def __init__(
        self,
        retention_s: float,
        *,
        default_tenant: str = "default",
        max_updates_per_task: int = DEFAULT_MAX_UPDATES_PER_TASK,
        cache_tasks: int = DEFAULT_CACHE_TASKS,
        db: StateDb | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_updates_per_task < 1:
            raise ValueError("max_updates_per_task must be at least 1")
        self._retention_s = retention_s
        self._default_tenant = default_tenant
        # The current state is kept apart from the history: the history holds one update fewer.
        self._history_len = max_updates_per_task - 1
        self._cache_tasks = cache_tasks
        self._db: StateDb = db if db is not None else MemoryStateDb()
        self._clock = clock
        self._records: OrderedDict[str, _Record] = OrderedDict()  # least recently used first
        self._dirty: dict[str, _Record] = {}
        count = self._db.get(_KNOWN_KEY)
        self._known = int.from_bytes(count, "big") if count else 0  # kept so len() is cheap

    def get(self, task_id: str, tenant: str | None = None) -> notifier_pb2.TaskState | None:
        """The task's state if it is known and ``tenant``'s (``None``: the default tenant)."""
        record = self._records.get(task_id) or self._load(task_id)
        if record is None or not record.known or record.tenant != (tenant or self._default_tenant):
            return None
        return _copy(record.state)

    def apply_task(self, task: task_pb2.AITaskEvent) -> None:
        record = self._record(task.task_id)
        if record.state.HasField("submitted_at"):
            # The task record read before: a repeat (one idempotency key submitted through two ingest
            # replicas) changes nothing.
            return
        self._dirty[task.task_id] = record
        if record.known:
            # Results read before the task record: their states were handed out, so patch copies.
            record.state = _with_task(record.state, task)
            record.history = deque((_patched(u, task) for u in record.history), maxlen=record.history.maxlen)
            record.history_stale = True
        else:
            _fill_task(record.state, task)
        state = record.state
        learned = self._learn_tenant(record, task.tenant or self._default_tenant)
        if state.status == result_pb2.TASK_STATUS_UNSPECIFIED:
            self._change(record, result_pb2.TASK_STATUS_QUEUED, events.QUEUED_SEQUENCE, task.submitted_at, None, None)
        elif learned:
            self._notify(record)

    def apply_result(self, result: result_pb2.AIResultEvent, trace: SpanContext | None = None) -> bool:
        """Take ``result`` if it advances its task. True if it was a terminal result of a task that had one already
        (dropped: the task ran again, as ``at_least_once`` allows after a worker's crash)."""
        record = self._record(result.task_id)
        learned = bool(result.tenant) and self._learn_tenant(record, result.tenant)
        if learned:
            self._dirty[result.task_id] = record
        sequence = self._place(record.state, result)
        if not _advances(record.state, result.status, sequence):
            if learned:
                self._notify(record)
            return events.is_terminal(result.status) and events.is_terminal(record.state.status)
        if not record.state.model_name:
            record.state.model_name = result.model_name
        self._dirty[result.task_id] = record
        self._change(record, result.status, sequence, result.produced_at, result, trace)
        return False

    def flush(self, offsets: Mapping[tuple[str, int], int] | None = None) -> None:
        """Write every change since the last flush, and ``offsets`` (the next offset to read of each
        partition: what the written state reflects), in one atomic batch; then shrink the cache to its size."""
        batch = Batch()
        for task_id, record in self._dirty.items():
            if record.known:
                self._write(batch, task_id, record)
        self._dirty.clear()
        for (topic, partition), offset in (offsets or {}).items():
            batch.put(_offset_key(topic, partition), offset.to_bytes(8, "big"))
        if batch:
            batch.put(_KNOWN_KEY, self._known.to_bytes(8, "big"))
            self._db.write(batch)
        self._evict()

    def saved_offsets(self) -> dict[tuple[str, int], int]:
        """The offsets the last flush recorded: where reading resumes after a restart."""
        saved: dict[tuple[str, int], int] = {}
        for key, value in self._db.items(_OFFSETS, _after(_OFFSETS)):
            topic, partition = key[len(_OFFSETS) : -5], key[-4:]  # topic, a 0 byte, 4 bytes of partition
            saved[(topic.decode(), int.from_bytes(partition, "big"))] = int.from_bytes(value, "big")
        return saved

    def cluster_id(self) -> str | None:
        """The Kafka cluster the state was read from; None for a new state."""
        value = self._db.get(_CLUSTER_KEY)
        return None if value is None else value.decode()

    def reset(self, cluster_id: str) -> None:
        """Forget everything (the state was read from another Kafka cluster, whose offsets mean nothing here) and
        record ``cluster_id`` as the state's cluster. Watchers stay and get what the new cluster brings."""
        batch = Batch()
        batch.delete_range(b"", b"\xff")
        batch.put(_CLUSTER_KEY, cluster_id.encode())
        batch.put(_KNOWN_KEY, (0).to_bytes(8, "big"))
        self._db.write(batch)
        self._dirty.clear()
        self._known = 0
        for task_id, record in list(self._records.items()):
            if record.watchers:
                self._records[task_id] = self._new_record(task_id, record.watchers)
            else:
                del self._records[task_id]

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

    def expire(self, limit: int = EXPIRE_BATCH) -> int:
        """Forget tasks unchanged for the retention window that nobody watches, on disk too, at most ``limit``
        of them (call again while it returns ``limit``: each call is one write); return how many."""
        self.flush()
        cutoff_ms = max(0, int((self._clock() - self._retention_s) * 1000))
        batch = Batch()
        forgotten = 0
        for key, _ in list(itertools.islice(self._db.items(_TOUCHED, _touched_key(cutoff_ms, "")), limit)):
            task_id = key[len(_TOUCHED) + 8 :].decode()
            record = self._records.get(task_id)
            if record is not None and record.watchers:
                continue
            self._records.pop(task_id, None)
            batch.delete(key)
            batch.delete(_state_key(task_id))
            batch.delete_range(*_history_range(task_id))
            forgotten += 1
        if forgotten:
            self._known -= forgotten
            batch.put(_KNOWN_KEY, self._known.to_bytes(8, "big"))
            self._db.write(batch)
        return forgotten

    def close(self) -> None:
        self.flush()
        self._db.close()

    def moved(self, partitions: set[int], partition_count: int) -> int:
        """Hand MOVED to every watcher of a task of ``partitions`` (results topic partitions, of
        ``partition_count``) and forget them; return how many watchers that was."""
        told = 0
        for task_id, record in list(self._records.items()):
            if record.watchers and partition_of(task_id, partition_count) in partitions:
                watchers, record.watchers = record.watchers, {}
                for watcher in watchers.values():
                    watcher.deliver(MOVED)
                told += len(watchers)
                if not record.known:
                    del self._records[task_id]
        return told

    def watcher_count(self) -> int:
        return sum(len(r.watchers) for r in self._records.values())

    def cached(self) -> int:
        """Tasks held in memory: the watched ones and at most ``cache_tasks`` others."""
        return len(self._records)

    def __len__(self) -> int:
        """Tasks whose state is known. Constant time, and safe to call from another thread (a metrics scrape)."""
        return self._known

    def _record(self, task_id: str) -> _Record:
        record = self._records.get(task_id)
        if record is not None:
            self._records.move_to_end(task_id)
            return record
        record = self._load(task_id) or self._new_record(task_id)
        self._records[task_id] = record
        return record

    def _new_record(self, task_id: str, watchers: dict[Hashable, _Watcher] | None = None) -> _Record:
        """A task nothing is known of yet (``watchers``: who waits for it)."""
        history: deque[Update] = deque(maxlen=max(0, self._history_len))
        return _Record(notifier_pb2.TaskState(task_id=task_id), self._clock(), history, watchers=watchers or {})

    def _load(self, task_id: str) -> _Record | None:
        """The task as the database has it, or None if it has nothing of it."""
        value = self._db.get(_state_key(task_id))
        if value is None:
            return None
        _, touched_ms, kept, tenant_len = _RECORD_HEAD.unpack_from(value)
        tenant_end = _RECORD_HEAD.size + tenant_len
        state = notifier_pb2.TaskState.FromString(value[tenant_end:])
        stored = self._db.items(*_history_range(task_id)) if kept else ()  # a scan costs as much as the rest
        history = deque(
            (Update(notifier_pb2.TaskState.FromString(v)) for _, v in stored), maxlen=max(0, self._history_len)
        )
        record = _Record(
            state, touched_ms / 1000, history, tenant=value[_RECORD_HEAD.size : tenant_end].decode() or None
        )
        record.written_ms = touched_ms
        record.history_written = history[-1].state.sequence if history else 0
        return record

    def _write(self, batch: Batch, task_id: str, record: _Record) -> None:
        touched_ms = int(record.touched_s * 1000)
        tenant = (record.tenant or "").encode()
        head = _RECORD_HEAD.pack(_RECORD_VERSION, touched_ms, len(record.history), len(tenant))
        batch.put(_state_key(task_id), head + tenant + record.state.SerializeToString())
        if record.written_ms != touched_ms:
            if record.written_ms is not None:
                batch.delete(_touched_key(record.written_ms, task_id))
            batch.put(_touched_key(touched_ms, task_id), b"")
            record.written_ms = touched_ms
        if record.history_stale:  # patched by a late task record: rewritten whole
            batch.delete_range(*_history_range(task_id))
            record.history_written, record.history_stale = 0, False
        for sequence in record.history_dropped:
            batch.delete(_history_key(task_id, sequence))
        record.history_dropped.clear()
        for update in record.history:
            if update.state.sequence > record.history_written:
                batch.put(_history_key(task_id, update.state.sequence), update.state.SerializeToString())
        if record.history:
            record.history_written = record.history[-1].state.sequence

    def _evict(self) -> None:
        """Drop the least recently used tasks nobody watches until at most ``cache_tasks`` remain of those."""
        excess = len(self._records) - self._cache_tasks
        passed = 0  # watched tasks moved to the end: once all were, only watched ones are left to drop
        while excess > 0 and passed < len(self._records):
            task_id, record = next(iter(self._records.items()))
            if record.watchers:
                self._records.move_to_end(task_id)
                passed += 1
            else:
                del self._records[task_id]
                excess -= 1

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
                if len(record.history) == self._history_len:
                    record.history_dropped.append(record.history[0].state.sequence)
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


# The database's keys: a task's record, its history updates by sequence, an index of tasks by the time of their
# last change (for expiry), the next offset to read of each partition, and the count of tasks.
_STATE = b"s/"
_HISTORY = b"h/"
_TOUCHED = b"t/"
_OFFSETS = b"o/"
_KNOWN_KEY = b"m/known"
_CLUSTER_KEY = b"m/cluster"
# A record's value: format version, last change (ms since the epoch), how many history updates it keeps, the
# tenant's length; then the tenant (empty: not learned yet) and the serialized TaskState.
_RECORD_HEAD = struct.Struct(">BqIH")
_RECORD_VERSION = 1


def _state_key(task_id: str) -> bytes:
    return _STATE + task_id.encode()


def _history_key(task_id: str, sequence: int) -> bytes:
    return _HISTORY + task_id.encode() + b"/" + sequence.to_bytes(8, "big")


def _history_range(task_id: str) -> tuple[bytes, bytes]:
    prefix = _HISTORY + task_id.encode() + b"/"
    return prefix, _after(prefix)


def _touched_key(touched_ms: int, task_id: str) -> bytes:
    return _TOUCHED + touched_ms.to_bytes(8, "big") + task_id.encode()


def _offset_key(topic: str, partition: int) -> bytes:
    return _OFFSETS + topic.encode() + b"\0" + partition.to_bytes(4, "big")


def _after(prefix: bytes) -> bytes:
    """The least key greater than every key starting with ``prefix`` (its last byte is not 0xff)."""
    return prefix[:-1] + bytes([prefix[-1] + 1])
