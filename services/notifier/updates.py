"""What a watcher of a task receives: each change of the task as an ``Update``, or a marker that ends its
watch (``DENIED``, ``ENDED``, ``MOVED``). See ``store`` for when each is handed out."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

from opentelemetry.trace import SpanContext

from aimesh.v1 import notifier_pb2


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
