"""Task ids derived from idempotency keys, and remembering the keys, so a retried submission returns the first
task's id.

A submission with a key gets a task id derived from its tenant and key (``derived_task_id``), the same in every
ingest replica: a retry through another replica publishes a record with the same id, hence the same record key and
partition, and the worker that owns the partition runs only the first of them (``aimesh.worker.duplicates``). That
is the guarantee across replicas. The memory here is per ingest process and bounded by a time to live: it spares a
retry through the same replica a second record, and resolves records in doubt.

A key whose record may have been written without being acknowledged (a delivery timeout) is never forgotten:
it stays *in doubt* with the record's task id, and a retry with that key only resolves the doubt (learns
whether that very record landed) instead of publishing another.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from aimesh.errors import PublishInDoubt

# The namespace of derived task ids. Fixed for good: a new one would give a key retried across the change a second
# task id, and so a second execution.
TASK_ID_NAMESPACE = uuid.UUID("cf429220-42dd-4fcb-bc8e-95e8386ecce8")


def derived_task_id(tenant: str, key: str) -> str:
    """The task id of ``tenant``'s submission with idempotency ``key``: a UUID version 5 in canonical (lower-case)
    form. Tenant and key are length-prefixed, so no two pairs name the same id (``a`` + ``b/c`` and ``a/b`` + ``c``
    do not meet)."""
    return str(uuid.uuid5(TASK_ID_NAMESPACE, f"{len(tenant)}:{tenant}{len(key)}:{key}"))


@dataclass(frozen=True)
class Accepted:
    task_id: str
    accepted_at: Timestamp


@dataclass(frozen=True)
class SentRecord:
    """A task record that was handed to the producer but not acknowledged: where it would be and when it was
    produced (its Kafka timestamp is no earlier), and the delivery report librdkafka may still deliver."""

    topic: str
    model_name: str
    accepted: Accepted
    produced_at_ms: int
    delivery: asyncio.Future[Any]


class IdempotencyKeys:
    """Maps a key to the task accepted for it, or to the record whose fate is in doubt. Concurrent calls with
    one key share one submission."""

    def __init__(self, ttl_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl_s = ttl_s
        self._clock = clock
        self._done: OrderedDict[str, tuple[float, Accepted]] = OrderedDict()
        self._in_doubt: OrderedDict[str, tuple[float, SentRecord]] = OrderedDict()
        self._pending: dict[str, asyncio.Future[Accepted]] = {}

    def lookup(self, key: str) -> Accepted | None:
        self._expire()
        entry = self._done.get(key)
        return entry[1] if entry else None

    def in_doubt(self, key: str) -> SentRecord | None:
        self._expire()
        entry = self._in_doubt.get(key)
        return entry[1] if entry else None

    async def submit_once(
        self,
        key: str,
        submit: Callable[[], Awaitable[Accepted]],
        resolve: Callable[[SentRecord], Awaitable[Accepted]],
    ) -> tuple[Accepted, bool]:
        """Run ``submit`` unless ``key`` was accepted before, or ``resolve`` when its earlier record is in doubt;
        return the accepted task and whether an earlier call published it.

        Either may raise ``PublishInDoubt``: the key is then kept in doubt with that record. Any other failure of
        ``submit`` means nothing was written and is forgotten, so the client's retry runs it again; a failure of
        ``resolve`` leaves the doubt as it was."""
        known = self.lookup(key)
        if known is not None:
            return known, True
        pending = self._pending.get(key)
        if pending is not None:
            return await asyncio.shield(pending), True
        doubt = self.in_doubt(key)
        future: asyncio.Future[Accepted] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        try:
            accepted = await (resolve(doubt) if doubt is not None else submit())
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as e:
            if isinstance(e, PublishInDoubt):
                self._in_doubt[key] = (self._clock() + self._ttl_s, e.record)
                self._in_doubt.move_to_end(key)
            future.set_exception(e)
            future.exception()  # a waiter may not exist: mark the exception retrieved
            raise
        finally:
            del self._pending[key]
        future.set_result(accepted)
        self._in_doubt.pop(key, None)
        self.remember(key, accepted)
        return accepted, doubt is not None

    def remember(self, key: str, accepted: Accepted) -> None:
        self._done[key] = (self._clock() + self._ttl_s, accepted)
        self._done.move_to_end(key)

    def _expire(self) -> None:
        now = self._clock()
        for entries in (self._done, self._in_doubt):
            while entries:
                key, (expires_at, _) = next(iter(entries.items()))
                if expires_at > now:
                    break
                del entries[key]

    def __len__(self) -> int:
        return len(self._done)
