"""Remembering idempotency keys, so a retried submission returns the first task's id.

The memory is per ingest process and bounded by a time to live: with several ingest replicas behind a
load balancer a key is only deduplicated by the replica that saw it (documented in docs/design.md).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from google.protobuf.timestamp_pb2 import Timestamp


@dataclass(frozen=True)
class Accepted:
    task_id: str
    accepted_at: Timestamp


class IdempotencyKeys:
    """Maps a key to the task accepted for it. Concurrent calls with one key share one submission."""

    def __init__(self, ttl_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl_s = ttl_s
        self._clock = clock
        self._done: OrderedDict[str, tuple[float, Accepted]] = OrderedDict()
        self._pending: dict[str, asyncio.Future[Accepted]] = {}

    def lookup(self, key: str) -> Accepted | None:
        self._expire()
        entry = self._done.get(key)
        return entry[1] if entry else None

    async def submit_once(self, key: str, submit: Callable[[], Awaitable[Accepted]]) -> tuple[Accepted, bool]:
        """Run ``submit`` unless ``key`` was accepted before; return the accepted task and whether it was a
        duplicate. A failed submission is forgotten, so the client's retry runs it again."""
        known = self.lookup(key)
        if known is not None:
            return known, True
        pending = self._pending.get(key)
        if pending is not None:
            return await asyncio.shield(pending), True
        future: asyncio.Future[Accepted] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        try:
            accepted = await submit()
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as e:
            future.set_exception(e)
            future.exception()  # a waiter may not exist: mark the exception retrieved
            raise
        finally:
            del self._pending[key]
        future.set_result(accepted)
        self.remember(key, accepted)
        return accepted, False

    def remember(self, key: str, accepted: Accepted) -> None:
        self._done[key] = (self._clock() + self._ttl_s, accepted)
        self._done.move_to_end(key)

    def _expire(self) -> None:
        now = self._clock()
        while self._done:
            key, (expires_at, _) = next(iter(self._done.items()))
            if expires_at > now:
                break
            del self._done[key]

    def __len__(self) -> int:
        return len(self._done)
