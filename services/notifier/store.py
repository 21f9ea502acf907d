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

On disk (laid out by ``store_layout``): every known task lives in a key-value database (``state_db``; RocksDB in the
service): its record (tenant, time of its last change, current state) under ``s/<id>``, each kept update under
``h/<id>/<sequence>``, and an index ``t/<last change ms><id>`` by which expiry finds what to remove. The feed calls
``flush`` after every batch of records with the offsets the batch reached; one atomic write holds both, so after a
restart the state reflects exactly the records before the saved offsets and reading resumes there. Memory holds the
tasks being watched and a bounded cache of the most recently changed others; any other is read from disk when asked
for (an update's trace context is not kept on disk: a delivery of a task read back starts its own trace).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Mapping

from google.protobuf.timestamp_pb2 import Timestamp
from opentelemetry.trace import SpanContext

from aimesh import events
from aimesh.v1 import notifier_pb2, result_pb2, task_pb2

from . import store_layout
from .ownership import partition_of
from .state_db import Batch, MemoryStateDb, StateDb
from .task_entry import TaskEntry, Watcher, advances, copy_state, fill_task, patched, place, since, with_task
from .updates import DENIED, ENDED, MOVED, Deliver, Denied, Ended, Moved, Update, WatchItem

__all__ = [
    "DEFAULT_CACHE_TASKS",
    "DEFAULT_MAX_UPDATES_PER_TASK",
    "DENIED",
    "ENDED",
    "EXPIRE_BATCH",
    "MOVED",
    "Deliver",
    "Denied",
    "Ended",
    "Moved",
    "TaskStore",
    "Update",
    "WatchItem",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_UPDATES_PER_TASK = 10_000
DEFAULT_CACHE_TASKS = 10_000
# Most tasks one expire() call forgets: the event loop's pause for one write of their deletions.
EXPIRE_BATCH = 5_000


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
        self._records: OrderedDict[str, TaskEntry] = OrderedDict()  # least recently used first
        self._dirty: dict[str, TaskEntry] = {}
        count = self._db.get(store_layout.KNOWN_KEY)
        self._known = int.from_bytes(count, "big") if count else 0  # kept so len() is cheap

    def get(self, task_id: str, tenant: str | None = None) -> notifier_pb2.TaskState | None:
        """The task's state if it is known and ``tenant``'s (``None``: the default tenant)."""
        record = self._records.get(task_id) or store_layout.load_entry(self._db, task_id, self._history_len)
        if record is None or not record.known or record.tenant != (tenant or self._default_tenant):
            return None
        return copy_state(record.state)

    def apply_task(self, task: task_pb2.AITaskEvent) -> None:
        record = self._record(task.task_id)
        if record.state.HasField("submitted_at"):
            # The task record read before: a repeat (one idempotency key submitted through two ingest
            # replicas) changes nothing.
            return
        self._dirty[task.task_id] = record
        if record.known:
            # Results read before the task record: their states were handed out, so patch copies.
            record.state = with_task(record.state, task)
            record.history = deque((patched(u, task) for u in record.history), maxlen=record.history.maxlen)
            record.history_stale = True
        else:
            fill_task(record.state, task)
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
        sequence = place(record.state, result)
        if not advances(record.state, result.status, sequence):
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
                store_layout.write_entry(batch, task_id, record)
        self._dirty.clear()
        store_layout.put_offsets(batch, offsets or {})
        if batch:
            batch.put(store_layout.KNOWN_KEY, self._known.to_bytes(8, "big"))
            self._db.write(batch)
        self._evict()

    def saved_offsets(self) -> dict[tuple[str, int], int]:
        """The offsets the last flush recorded: where reading resumes after a restart."""
        return store_layout.read_offsets(self._db)

    def cluster_id(self) -> str | None:
        """The Kafka cluster the state was read from; None for a new state."""
        value = self._db.get(store_layout.CLUSTER_KEY)
        return None if value is None else value.decode()

    def reset(self, cluster_id: str) -> None:
        """Forget everything (the state was read from another Kafka cluster, whose offsets mean nothing here) and
        record ``cluster_id`` as the state's cluster. Watchers stay and get what the new cluster brings."""
        batch = Batch()
        batch.delete_range(b"", b"\xff")
        batch.put(store_layout.CLUSTER_KEY, cluster_id.encode())
        batch.put(store_layout.KNOWN_KEY, (0).to_bytes(8, "big"))
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
        watcher = Watcher(tenant or self._default_tenant, deliver, after_sequence or None)
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
        for key, task_id in store_layout.unchanged_since(self._db, cutoff_ms, limit):
            record = self._records.get(task_id)
            if record is not None and record.watchers:
                continue
            self._records.pop(task_id, None)
            store_layout.delete_task(batch, key, task_id)
            forgotten += 1
        if forgotten:
            self._known -= forgotten
            batch.put(store_layout.KNOWN_KEY, self._known.to_bytes(8, "big"))
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

    def _record(self, task_id: str) -> TaskEntry:
        record = self._records.get(task_id)
        if record is not None:
            self._records.move_to_end(task_id)
            return record
        record = store_layout.load_entry(self._db, task_id, self._history_len) or self._new_record(task_id)
        self._records[task_id] = record
        return record

    def _new_record(self, task_id: str, watchers: dict[Hashable, Watcher] | None = None) -> TaskEntry:
        """A task nothing is known of yet (``watchers``: who waits for it)."""
        history: deque[Update] = deque(maxlen=max(0, self._history_len))
        return TaskEntry(notifier_pb2.TaskState(task_id=task_id), self._clock(), history, watchers=watchers or {})

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

    def _change(
        self,
        record: TaskEntry,
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
            state = copy_state(record.state)
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
    def _learn_tenant(record: TaskEntry, tenant: str) -> bool:
        """Record the task's tenant unless known already (the first source wins); whether it was learned now."""
        if record.tenant is not None:
            return False
        record.tenant = tenant
        return True

    def _notify(self, record: TaskEntry) -> None:
        for key, watcher in list(record.watchers.items()):
            self._send(record, key, watcher)

    @staticmethod
    def _send(record: TaskEntry, key: Hashable, watcher: Watcher) -> None:
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
        for update in since(record, watcher.after):
            watcher.deliver(update)
        watcher.after = state.sequence
