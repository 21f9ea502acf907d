"""How the task store lays tasks out in its key-value database (see ``store``, "On disk"): a task's record
under ``s/<id>``, each kept update under ``h/<id>/<sequence>``, an index ``t/<last change ms><id>`` by which
expiry finds what to remove, the next offset to read of each partition under ``o/<topic>\\0<partition>``, and
the count of tasks and the Kafka cluster the state was read from under ``m/``."""

from __future__ import annotations

import itertools
import struct
from collections import deque
from collections.abc import Mapping

from aimesh.v1 import notifier_pb2

from .state_db import Batch, StateDb
from .task_entry import TaskEntry
from .updates import Update

_STATE = b"s/"
_HISTORY = b"h/"
_TOUCHED = b"t/"
_OFFSETS = b"o/"
KNOWN_KEY = b"m/known"
CLUSTER_KEY = b"m/cluster"
# A record's value: format version, last change (ms since the epoch), how many history updates it keeps, the
# tenant's length; then the tenant (empty: not learned yet) and the serialized TaskState.
_RECORD_HEAD = struct.Struct(">BqIH")
_RECORD_VERSION = 1


def load_entry(db: StateDb, task_id: str, history_len: int) -> TaskEntry | None:
    """The task as the database has it, or None if it has nothing of it."""
    value = db.get(_state_key(task_id))
    if value is None:
        return None
    _, touched_ms, kept, tenant_len = _RECORD_HEAD.unpack_from(value)
    tenant_end = _RECORD_HEAD.size + tenant_len
    state = notifier_pb2.TaskState.FromString(value[tenant_end:])
    stored = db.items(*_history_range(task_id)) if kept else ()  # a scan costs as much as the rest
    history = deque((Update(notifier_pb2.TaskState.FromString(v)) for _, v in stored), maxlen=max(0, history_len))
    record = TaskEntry(state, touched_ms / 1000, history, tenant=value[_RECORD_HEAD.size : tenant_end].decode() or None)
    record.written_ms = touched_ms
    record.history_written = history[-1].state.sequence if history else 0
    return record


def write_entry(batch: Batch, task_id: str, record: TaskEntry) -> None:
    """Add to ``batch`` what changed of the task since it was last written, and note it written."""
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


def put_offsets(batch: Batch, offsets: Mapping[tuple[str, int], int]) -> None:
    for (topic, partition), offset in offsets.items():
        batch.put(_offset_key(topic, partition), offset.to_bytes(8, "big"))


def read_offsets(db: StateDb) -> dict[tuple[str, int], int]:
    saved: dict[tuple[str, int], int] = {}
    for key, value in db.items(_OFFSETS, _after(_OFFSETS)):
        topic, partition = key[len(_OFFSETS) : -5], key[-4:]  # topic, a 0 byte, 4 bytes of partition
        saved[(topic.decode(), int.from_bytes(partition, "big"))] = int.from_bytes(value, "big")
    return saved


def unchanged_since(db: StateDb, cutoff_ms: int, limit: int) -> list[tuple[bytes, str]]:
    """At most ``limit`` tasks last changed before ``cutoff_ms``, oldest first: each one's index key and id."""
    keys = [key for key, _ in itertools.islice(db.items(_TOUCHED, _touched_key(cutoff_ms, "")), limit)]
    return [(key, key[len(_TOUCHED) + 8 :].decode()) for key in keys]


def delete_task(batch: Batch, index_key: bytes, task_id: str) -> None:
    """Add the deletion of everything stored of the task (``index_key``: its entry in the expiry index)."""
    batch.delete(index_key)
    batch.delete(_state_key(task_id))
    batch.delete_range(*_history_range(task_id))


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
