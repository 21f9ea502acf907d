"""The notifier's on-disk key-value database: RocksDB through rocksdict (chosen by measurement, see
docs/benchmarks.md "Notifier state"), and an in-memory stand-in with the same interface for unit tests.

Keys and values are bytes; a write is a batch of puts and deletes applied atomically (one RocksDB WriteBatch,
written to the write-ahead log before it returns, so a killed process loses nothing written; a lost machine
may lose the last writes, which the notifier reads again from Kafka because the offsets go in the same batch).
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, cast

if TYPE_CHECKING:
    from rocksdict import Options

log = logging.getLogger(__name__)

# Memory RocksDB may use besides its block cache: two memtables of this size.
WRITE_BUFFER_BYTES = 16 << 20


class Batch:
    """Puts and deletes to apply together; a later operation on a key replaces an earlier one."""

    def __init__(self) -> None:
        self.puts: dict[bytes, bytes | None] = {}  # None: delete
        self.ranges: list[tuple[bytes, bytes]] = []  # [start, stop) to delete, applied before the puts

    def put(self, key: bytes, value: bytes) -> None:
        self.puts[key] = value

    def delete(self, key: bytes) -> None:
        self.puts[key] = None

    def delete_range(self, start: bytes, stop: bytes) -> None:
        self.ranges.append((start, stop))

    def __bool__(self) -> bool:
        return bool(self.puts or self.ranges)


class StateDb(Protocol):
    def get(self, key: bytes) -> bytes | None: ...

    def write(self, batch: Batch) -> None: ...

    def items(self, start: bytes, stop: bytes) -> Iterator[tuple[bytes, bytes]]:
        """Pairs with ``start <= key < stop``, in key order."""
        ...

    def close(self) -> None: ...


class RocksStateDb:
    """A RocksDB database in ``path`` (created if missing). Its memory is bounded: ``cache_bytes`` of block
    cache, which also holds the index and filter blocks, and two memtables of WRITE_BUFFER_BYTES."""

    def __init__(self, path: str | Path, *, cache_bytes: int = 32 << 20) -> None:
        from rocksdict import Rdict, WriteBatch

        self._write_batch = WriteBatch
        Path(path).mkdir(parents=True, exist_ok=True)
        self._db = Rdict(str(path), rocksdb_options(cache_bytes))

    def get(self, key: bytes) -> bytes | None:
        value = self._db.get(key)
        return None if value is None else bytes(value)

    def write(self, batch: Batch) -> None:
        out = self._write_batch(raw_mode=True)
        for start, stop in batch.ranges:
            out.delete_range(start, stop)
        for key, value in batch.puts.items():
            if value is None:
                out.delete(key)
            else:
                out.put(key, value)
        self._db.write(out)

    def items(self, start: bytes, stop: bytes) -> Iterator[tuple[bytes, bytes]]:
        for key, value in self._db.items(from_key=start):
            if cast(bytes, key) >= stop:
                return
            yield cast(bytes, key), value

    def close(self) -> None:
        self._db.close()


class MemoryStateDb:
    """The same interface in memory, for unit tests: nothing survives the process."""

    def __init__(self) -> None:
        self._data: dict[bytes, bytes] = {}
        self._keys: list[bytes] = []  # sorted

    def get(self, key: bytes) -> bytes | None:
        return self._data.get(key)

    def write(self, batch: Batch) -> None:
        for start, stop in batch.ranges:
            for key, _ in list(self.items(start, stop)):
                self._remove(key)
        for key, value in batch.puts.items():
            if value is None:
                self._remove(key)
            else:
                if key not in self._data:
                    bisect.insort(self._keys, key)
                self._data[key] = value

    def items(self, start: bytes, stop: bytes) -> Iterator[tuple[bytes, bytes]]:
        first = bisect.bisect_left(self._keys, start)
        last = bisect.bisect_left(self._keys, stop)
        for key in self._keys[first:last]:
            yield key, self._data[key]

    def close(self) -> None:
        pass

    def _remove(self, key: bytes) -> None:
        if self._data.pop(key, None) is not None:
            del self._keys[bisect.bisect_left(self._keys, key)]


def rocksdb_options(cache_bytes: int) -> Options:
    """The options the notifier opens RocksDB with (the store-choice benchmark uses them too): memory bounded
    by ``cache_bytes`` of block cache and two memtables of WRITE_BUFFER_BYTES."""
    from rocksdict import BlockBasedIndexType, BlockBasedOptions, Cache, DBCompressionType, Options

    options = Options(raw_mode=True)
    options.create_if_missing(True)
    options.set_write_buffer_size(WRITE_BUFFER_BYTES)
    options.set_max_write_buffer_number(2)
    options.set_compression_type(DBCompressionType.lz4())
    options.set_max_background_jobs(2)
    table = BlockBasedOptions()
    table.set_block_cache(Cache(cache_bytes))
    # Index and filter blocks count against the cache, so memory does not grow with the data; partitioned
    # into 4 KiB pieces with only the top level pinned, since whole ones at a million tasks made a lookup
    # miss the cache and read a whole index back: a get's p99 4.4-8.9 ms, against 30-50 us partitioned
    # (benchmarks/state_store_choice.py).
    table.set_cache_index_and_filter_blocks(True)
    table.set_index_type(BlockBasedIndexType.two_level_index_search())
    table.set_partition_filters(True)
    table.set_metadata_block_size(4096)
    table.set_pin_top_level_index_and_filter(True)
    table.set_pin_l0_filter_and_index_blocks_in_cache(True)
    table.set_bloom_filter(10, False)
    options.set_block_based_table_factory(table)
    return options
