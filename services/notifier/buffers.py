"""What the notifier holds for each open stream: the updates handed to it and not sent yet, bounded in bytes
and in count per stream, and in bytes for all streams together.

Updates are shared between watchers (see ``store``), so a buffer's bytes overstate the memory it alone
keeps alive: the bounds are conservative. A buffer never waits for room: an update that does not fit makes
it *full*, it takes nothing more, and its stream sends what it holds and ends RESOURCE_EXHAUSTED, to be
resumed with ``after_sequence`` from the task's kept history. An update is always taken by an empty buffer
(within the total), so each stream, resumed as often as it takes, makes progress.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass

from aimesh.settings import NotifierSettings

from .store import Update, WatchItem


class SubscriptionMemory:
    """The bytes buffered for all streams together, never more than ``max_bytes``."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.used_bytes = 0

    @property
    def free_bytes(self) -> int:
        return self.max_bytes - self.used_bytes

    def take(self, size_bytes: int) -> bool:
        """Count ``size_bytes`` more if they fit; whether they did."""
        if self.used_bytes + size_bytes > self.max_bytes:
            return False
        self.used_bytes += size_bytes
        return True

    def give(self, size_bytes: int) -> None:
        self.used_bytes -= size_bytes


@dataclass(frozen=True)
class BufferLimits:
    """What one stream may hold unsent: serialized bytes of updates, and items. The defaults are
    ``NotifierSettings``'."""

    max_bytes: int = NotifierSettings.model_fields["max_stream_buffer_bytes"].default
    max_items: int = NotifierSettings.model_fields["max_stream_buffer_updates"].default


class StreamBuffer:
    """The (task id, item) pairs handed to one stream, in order, until the stream sends them.

    ``offer`` never blocks (the store calls it for every watcher of a task); ``next`` waits for the next
    pair, and answers None once the buffer is full and every pair it took was taken out. ``close`` gives
    its bytes back; it takes nothing after.
    """

    def __init__(self, limits: BufferLimits, memory: SubscriptionMemory) -> None:
        self._limits = limits
        self._memory = memory
        self._items: deque[tuple[str, WatchItem, int]] = deque()
        self._wake = asyncio.Event()
        self.size_bytes = 0
        self.full = False

    def __len__(self) -> int:
        return len(self._items)

    def offer(self, task_id: str, item: WatchItem) -> None:
        if self.full:
            return
        size = item.size_bytes if isinstance(item, Update) else 0
        if not (self._fits(size) and self._memory.take(size)):
            self.full = True
            self._wake.set()
            return
        self._items.append((task_id, item, size))
        self.size_bytes += size
        self._wake.set()

    async def next(self) -> tuple[str, WatchItem] | None:
        while not self._items:
            if self.full:
                return None
            self._wake.clear()
            await self._wake.wait()
        task_id, item, size = self._items.popleft()
        self.size_bytes -= size
        self._memory.give(size)
        return task_id, item

    def close(self) -> None:
        self.full = True
        self._memory.give(self.size_bytes)
        self.size_bytes = 0
        self._items.clear()

    def _fits(self, size_bytes: int) -> bool:
        if not self._items:
            return True
        return self.size_bytes + size_bytes <= self._limits.max_bytes and len(self._items) < self._limits.max_items
