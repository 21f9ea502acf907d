"""RocksDB (rocksdict) against LMDB (py-lmdb) for the notifier's on-disk task state, on its access pattern.

    python benchmarks/run.py --only store_choice [--store-tasks 1000000] [--rounds 2]

Each engine runs in processes of its own, so their memory is measured apart. The first process loads the store the
way the notifier's feed would: records arrive in batches of 501, each batch one write (a RocksDB WriteBatch, an LMDB
write transaction) holding a third QUEUED, a third RUNNING and a third terminal updates of different tasks, so that
every task is written three times (each write overwrites the last), and the offsets the batch brings the store to
go with it. A task's key is its 36-character UUID; its value a serialized `TaskState` (the terminal one with a
sentiment label and scores or a short generated text inside, 280-550 bytes); a time index key
`t/<ms:016d>/<task_id>`, written with the first update, lets expiry find the oldest tasks in order. Then it reads
`--store-gets` random task ids one at a time (after 1,000 more to warm up), and exits without closing the store, as
a crash would. A second process reopens the store (timed to its first answer), reads as many random tasks again,
deletes the oldest half through the time index (scans of 1,000 index keys, each scan and its deletes one write),
compacts (RocksDB; LMDB has no compaction), then writes as many new tasks as it deleted, to see whether the space
freed goes back to the file system or is reused inside the files.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any, Protocol

if __package__ in (None, ""):  # run as a script (the child processes): make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from google.protobuf.timestamp_pb2 import Timestamp  # noqa: E402

from aimesh.v1 import notifier_pb2, result_pb2  # noqa: E402
from benchmarks import sections
from benchmarks.common import Section, log, median  # noqa: E402
from benchmarks.notifier_state import result_event, task_id  # noqa: E402

TITLE = sections.STATE_STORE_CHOICE
ENGINES = ("rocksdb", "lmdb")
BATCH_RECORDS = 501  # ~500 records per feed batch, a third of each kind of update
GROUP = BATCH_RECORDS // 3  # tasks per kind of update in a batch
DELETE_CHUNK = 1000  # tasks deleted per write while expiring
WARMUP_GETS = 1000
OFFSETS_KEY = b"o/offsets"
INDEX_PREFIX = b"t/"
BLOCK_CACHE_BYTES = 32 << 20
LMDB_MAP_BYTES = 16 << 30  # address space only: the file grows as pages are used
T0_MS = 1_700_000_000_000
STATUSES = (result_pb2.TASK_STATUS_QUEUED, result_pb2.TASK_STATUS_RUNNING, result_pb2.TASK_STATUS_SUCCEEDED)

METHOD = (
    " ".join((__doc__ or "").split("\n\n", 2)[2].split())
    + "\n\n"
    + (
        "RocksDB: a 32 MiB LRU block cache that also holds the index and filter blocks, partitioned (so the memory "
        "they take is bounded too, and a get reads one 4 KiB piece of each, not a table's whole index), a 10-bit "
        "Bloom filter (point gets of keys that are not in a table skip it), 16 MiB memtables (two at most), LZ4, "
        "the write-ahead log on, not synced per write. LMDB: a 16 GiB "
        "map (address space; the file grows with the pages used), `writemap` off (pages are written with write(), "
        "so a stray pointer cannot corrupt the file and the mapping stays read-only), `sync` off (a commit is not "
        "fsynced: a process crash loses nothing, a machine crash may lose the last commits but never the file's "
        "integrity; the same durability as RocksDB's unsynced WAL, and the feed rereads from the saved offsets "
        "anyway), `readahead` off (random reads of a store larger than memory). RSS is the process's resident "
        "memory from /proc (anonymous and file-backed pages apart: LMDB's reads map the file, RocksDB reads "
        "through its own cache). Disk is the blocks allocated to the store's files. MB are 10^6 bytes."
    )
)


# --- the workload --------------------------------------------------------------------------------------------
def index_key(index: int, tid: str) -> bytes:
    return f"t/{T0_MS + index:016d}/{tid}".encode()


def state(index: int, kind: int) -> bytes:
    """Task ``index``'s serialized state: ``kind`` 0 QUEUED, 1 RUNNING, 2 terminal (with its result)."""
    ms = T0_MS + index
    at = Timestamp(seconds=ms // 1000, nanos=(ms % 1000) * 1_000_000)
    result = result_event(index)
    task = notifier_pb2.TaskState(
        task_id=result.task_id, status=STATUSES[kind], submitted_at=at, updated_at=at, model_name=result.model_name,
        sequence=kind + 1,
    )  # fmt: skip
    if kind == 2:
        task.result.CopyFrom(result)
    return task.SerializeToString()


Put = tuple[bytes, bytes]


def batches(first: int, count: int) -> Iterator[tuple[list[Put], bytes]]:
    """The writes of tasks ``first`` .. ``first + count - 1`` in feed batches: batch b holds the QUEUED updates
    (and time index keys) of task group b, the RUNNING ones of group b - 1 and the terminal ones of group b - 2;
    with each, the offsets the batch brings the store to."""
    groups = (count + GROUP - 1) // GROUP
    for b in range(groups + 2):
        puts: list[Put] = []
        for kind in (0, 1, 2):
            g = b - kind
            if 0 <= g < groups:
                for i in range(first + g * GROUP, first + min(count, (g + 1) * GROUP)):
                    tid = task_id(i)
                    puts.append((tid.encode(), state(i, kind)))
                    if kind == 0:
                        puts.append((index_key(i, tid), b""))
        yield puts, json.dumps({"results": {str(p): first + b * 167 + p for p in range(6)}}).encode()


# --- the engines ---------------------------------------------------------------------------------------------
class Store(Protocol):
    def write(self, puts: Sequence[Put], deletes: Sequence[bytes], offsets: bytes | None) -> None: ...
    def get(self, key: bytes) -> bytes | None: ...
    def index_range(self, start: bytes, end: bytes, limit: int) -> list[bytes]: ...
    def compact(self) -> None: ...
    def close(self) -> None: ...


class Rocks:
    def __init__(self, path: Path) -> None:
        from rocksdict import Rdict

        from aimesh.notifier.state_db import rocksdb_options

        # The notifier's own options (see rocksdb_options for the index and filter layout, chosen here: a get at
        # 1,000,000 tasks took p50 270 us with whole index and filter blocks cached, 17 us partitioned, 16 us
        # with them held outside the cache, where their memory grows with the data).
        self.db = Rdict(str(path), rocksdb_options(BLOCK_CACHE_BYTES))

    def write(self, puts: Sequence[Put], deletes: Sequence[bytes], offsets: bytes | None) -> None:
        from rocksdict import WriteBatch

        batch = WriteBatch(raw_mode=True)
        for key, value in puts:
            batch.put(key, value)
        for key in deletes:
            batch.delete(key)
        if offsets is not None:
            batch.put(OFFSETS_KEY, offsets)
        self.db.write(batch)

    def get(self, key: bytes) -> bytes | None:
        value = self.db.get(key)
        return None if value is None else bytes(value)

    def index_range(self, start: bytes, end: bytes, limit: int) -> list[bytes]:
        it = self.db.iter()
        it.seek(start)
        keys: list[bytes] = []
        while it.valid() and len(keys) < limit:
            key = bytes(it.key())
            if key >= end:
                break
            keys.append(key)
            it.next()
        return keys

    def compact(self) -> None:
        self.db.compact_range(None, None)

    def close(self) -> None:
        self.db.close()


class Lmdb:
    def __init__(self, path: Path) -> None:
        import lmdb

        self.env = lmdb.open(
            str(path), map_size=LMDB_MAP_BYTES, writemap=False, sync=False, metasync=False, readahead=False
        )

    def write(self, puts: Sequence[Put], deletes: Sequence[bytes], offsets: bytes | None) -> None:
        with self.env.begin(write=True) as txn:
            cursor = txn.cursor()
            for key, value in puts:
                cursor.put(key, value)
            for key in deletes:
                txn.delete(key)
            if offsets is not None:
                cursor.put(OFFSETS_KEY, offsets)

    def get(self, key: bytes) -> bytes | None:
        with self.env.begin(buffers=False) as txn:
            value = txn.get(key)
        return None if value is None else bytes(value)

    def index_range(self, start: bytes, end: bytes, limit: int) -> list[bytes]:
        keys: list[bytes] = []
        with self.env.begin() as txn:
            cursor = txn.cursor()
            if cursor.set_range(start):
                for key in cursor.iternext(values=False):
                    if key >= end or len(keys) >= limit:
                        break
                    keys.append(bytes(key))
        return keys

    def compact(self) -> None:
        """LMDB never gives pages back to the file system: freed pages go to its free list and are reused."""

    def close(self) -> None:
        self.env.close()


def open_store(engine: str, path: Path) -> Store:
    return Rocks(path) if engine == "rocksdb" else Lmdb(path)


# --- the child processes -------------------------------------------------------------------------------------
def memory_mb() -> dict[str, float]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile"):
            fields[name] = int(value.split()[0]) * 1024 / 1e6  # /proc's kB are KiB
    return fields


def disk_mb(path: Path) -> float:
    return sum(f.stat().st_blocks * 512 for f in path.rglob("*") if f.is_file()) / 1e6


def growth(now: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: now[k] - before[k] for k in now}


def timed_gets(store: Store, tasks: int, gets: int, seed: int) -> dict[str, float]:
    """p50 and p99 (µs) of ``gets`` point gets of random tasks, after ``WARMUP_GETS`` more."""
    rng = random.Random(seed)
    latencies_ns = np.empty(WARMUP_GETS + gets, dtype=np.int64)
    for n in range(len(latencies_ns)):
        key = task_id(rng.randrange(tasks)).encode()
        started_ns = time.perf_counter_ns()
        value = store.get(key)
        latencies_ns[n] = time.perf_counter_ns() - started_ns
        if value is None:
            raise RuntimeError(f"task {key!r} missing")
    measured = latencies_ns[WARMUP_GETS:]
    return {"p50": float(np.quantile(measured, 0.5)) / 1000, "p99": float(np.quantile(measured, 0.99)) / 1000}


def load(engine: str, path: Path, tasks: int, gets: int) -> dict[str, Any]:
    store = open_store(engine, path)
    state(0, 2)  # import and warm the protobuf modules before the baseline
    base = memory_mb()
    written, write_s = 0, 0.0
    for puts, offsets in batches(0, tasks):
        started = time.perf_counter()
        store.write(puts, (), offsets)
        write_s += time.perf_counter() - started
        written += len(puts)
    after_load = growth(memory_mb(), base)
    latency_us = timed_gets(store, tasks, gets, seed=1)
    return {
        "tasks_per_s": tasks / write_s,
        "records_per_s": written / write_s,
        "get_p50_us": latency_us["p50"],
        "get_p99_us": latency_us["p99"],
        "rss_load_mb": after_load,
        "rss_gets_mb": growth(memory_mb(), base),
        "disk_mb": disk_mb(path),
    }


def reopen(engine: str, path: Path, tasks: int, gets: int) -> dict[str, Any]:
    base = memory_mb()
    started = time.perf_counter()
    store = open_store(engine, path)
    offsets = store.get(OFFSETS_KEY)
    reopen_s = time.perf_counter() - started
    if offsets is None or store.get(task_id(tasks - 1).encode()) is None:
        raise RuntimeError(f"{engine}: the reopened store lost writes")
    latency_us = timed_gets(store, tasks, gets, seed=2)
    rss_reopened = growth(memory_mb(), base)
    return {
        "reopen_s": reopen_s,
        "reopened_get_p50_us": latency_us["p50"],
        "reopened_get_p99_us": latency_us["p99"],
        "rss_reopened_mb": rss_reopened,
        **expire_half(store, path, tasks),
    }


def expire_half(store: Store, path: Path, tasks: int) -> dict[str, Any]:
    """Delete the oldest half of the tasks through the time index, compact, then write as many new tasks."""
    half_end = index_key(tasks // 2, "")
    started = time.perf_counter()
    deleted, start = 0, INDEX_PREFIX
    # Each scan starts after the last key deleted: from the prefix again, RocksDB would step over every
    # tombstone left so far.
    while keys := store.index_range(start, half_end, DELETE_CHUNK):
        tids = [k.rsplit(b"/", 1)[1] for k in keys]
        store.write((), [*keys, *tids], None)
        deleted, start = deleted + len(keys), keys[-1] + b"\0"
    expire_s = time.perf_counter() - started
    if deleted != tasks // 2:
        raise RuntimeError(f"expiry found {deleted} of {tasks // 2} tasks")
    disk_after_delete = disk_mb(path)
    started = time.perf_counter()
    store.compact()
    compact_s = time.perf_counter() - started
    disk_after_compact = disk_mb(path)
    if store.get(task_id(0).encode()) is not None or store.get(task_id(tasks - 1).encode()) is None:
        raise RuntimeError("expiry deleted the wrong tasks")
    for puts, offsets in batches(tasks, tasks // 2):  # as many new tasks as expired
        store.write(puts, (), offsets)
    disk_after_refill = disk_mb(path)
    store.close()
    return {
        "expire_s": expire_s,
        "disk_after_delete_mb": disk_after_delete,
        "compact_s": compact_s,
        "disk_after_compact_mb": disk_after_compact,
        "disk_after_refill_mb": disk_after_refill,
    }


def child(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("step", choices=("load", "reopen"))
    parser.add_argument("engine", choices=ENGINES)
    parser.add_argument("path", type=Path)
    parser.add_argument("--tasks", type=int, required=True)
    parser.add_argument("--gets", type=int, default=100_000)
    args = parser.parse_args(argv)
    if args.step == "load":
        print(json.dumps(load(args.engine, args.path, args.tasks, args.gets)), flush=True)
        os._exit(0)  # no close: the reopen that follows is a restart after a crash
    print(json.dumps(reopen(args.engine, args.path, args.tasks, args.gets)), flush=True)


# --- the parent ----------------------------------------------------------------------------------------------
def run_child(*args: str) -> dict[str, Any]:
    command = [sys.executable, __file__, *args]
    done = subprocess.run(command, stdout=subprocess.PIPE, check=True, text=True)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def measure(engine: str, tasks: int, gets: int) -> dict[str, Any]:
    path = Path(tempfile.mkdtemp(prefix=f"aimesh-store-{engine}-"))
    try:
        measured = run_child("load", engine, str(path), f"--tasks={tasks}", f"--gets={gets}")
        measured |= run_child("reopen", engine, str(path), f"--tasks={tasks}", f"--gets={gets}")
    finally:
        shutil.rmtree(path, ignore_errors=True)
    log(f"  {engine}: {json.dumps(measured)}")
    return measured


def run_rounds(args: argparse.Namespace) -> list[dict[str, dict[str, Any]]]:
    rounds = []
    for i in range(args.rounds):
        rounds.append({engine: measure(engine, args.store_tasks, args.store_gets) for engine in ENGINES})
        log(f"store choice round {i + 1}/{args.rounds} done")
    return rounds


ROWS: list[tuple[str, str]] = [
    ("write throughput, tasks/s (3 writes each)", "tasks_per_s"),
    ("point get p50, µs", "get_p50_us"),
    ("point get p99, µs", "get_p99_us"),
    ("RSS growth after the load, MB (anon + file)", "rss_load_mb"),
    ("RSS growth after the gets, MB (anon + file)", "rss_gets_mb"),
    ("point get p50 after reopening, µs", "reopened_get_p50_us"),
    ("point get p99 after reopening, µs", "reopened_get_p99_us"),
    ("RSS growth of the reopened store after as many gets, MB (anon + file)", "rss_reopened_mb"),
    ("disk after the load, MB", "disk_mb"),
    ("reopen after a crash to the first answer, s", "reopen_s"),
    ("expire the oldest half (scan + deletes), s", "expire_s"),
    ("disk after expiring half, MB", "disk_after_delete_mb"),
    ("full compaction, s", "compact_s"),
    ("disk after the compaction, MB", "disk_after_compact_mb"),
    ("disk after writing as many new tasks, MB", "disk_after_refill_mb"),
]


def cell(values: list[Any]) -> str:
    if isinstance(values[0], dict):
        anon = [v["RssAnon"] for v in values]
        file = [v["RssFile"] for v in values]
        each = ", ".join(f"{a:.0f}+{f:.0f}" for a, f in zip(anon, file, strict=True))
        return f"{median(anon):.0f} + {median(file):.0f} ({each})"
    digits = 3 if median(values) < 1 else 1 if median(values) < 100 else 0
    return f"{median(values):.{digits}f} ({', '.join(f'{v:.{digits}f}' for v in values)})"


def summary(rounds: Sequence[dict[str, dict[str, Any]]]) -> str:
    """The comparison in a sentence, from the medians."""

    def m(engine: str, key: str, part: str | None = None) -> float:
        return median([r[engine][key][part] if part else r[engine][key] for r in rounds])

    return (
        f"RocksDB wrote {m('rocksdb', 'tasks_per_s') / m('lmdb', 'tasks_per_s'):.1f} times as many tasks per second "
        f"as LMDB; its point gets took {m('rocksdb', 'reopened_get_p99_us') / m('lmdb', 'reopened_get_p99_us'):.1f} "
        f"times as long at p99 after reopening ({m('rocksdb', 'reopened_get_p99_us'):.0f} µs against "
        f"{m('lmdb', 'reopened_get_p99_us'):.0f} µs). After the load and the gets the process's resident memory had "
        f"grown by {m('rocksdb', 'rss_gets_mb', 'VmRSS'):.0f} MB with RocksDB and "
        f"{m('lmdb', 'rss_gets_mb', 'VmRSS'):.0f} MB with LMDB ({m('lmdb', 'rss_gets_mb', 'RssFile'):.0f} MB of it "
        "LMDB's file, mapped). The store took "
        f"{m('rocksdb', 'disk_after_compact_mb'):.0f} MB against {m('lmdb', 'disk_after_compact_mb'):.0f} MB of disk "
        f"once half was expired (and compacted), {m('rocksdb', 'disk_after_refill_mb'):.0f} MB against "
        f"{m('lmdb', 'disk_after_refill_mb'):.0f} MB once as many new tasks were written."
    )


def report(rounds: Sequence[dict[str, dict[str, Any]]], args: argparse.Namespace) -> Section:
    lmdb_library = ".".join(map(str, __import__("lmdb").version()))
    lines = [
        f"{args.store_tasks:,} tasks, {args.store_gets:,} gets, {len(rounds)} round(s); each cell the median and, "
        f"in brackets, every round's figure. rocksdict {version('rocksdict')}, lmdb {version('lmdb')} (LMDB "
        f"{lmdb_library}).",
        "",
        "| figure | RocksDB (rocksdict) | LMDB |",
        "|---|---|---|",
    ]
    for name, key in ROWS:
        lines.append(
            f"| {name} | {cell([r['rocksdb'][key] for r in rounds])} | {cell([r['lmdb'][key] for r in rounds])} |"
        )
    lines += ["", summary(rounds)]
    return Section(TITLE, METHOD, "\n".join(lines))


if __name__ == "__main__":
    child(sys.argv[1:])
