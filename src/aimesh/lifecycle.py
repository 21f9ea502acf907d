"""One lifecycle for every long-lived part of a service: the gRPC server, the Kafka producers and reader threads,
the metrics endpoint, the worker.

A ``Part`` is started once and stopped once: ``stop`` drains what it holds (in-flight calls, queued records,
running tasks) and ends it, and is safe to call twice or before ``start``. A part that can die while the service
runs (a reader thread, the worker's threads, an asyncio task run as a ``TaskPart``) takes an ``on_death`` callback
and reports there; the service hands it its ``runtime.Lifeline``, whose ``wait_for`` then raises ``ComponentDied``,
so the service turns its health NOT_SERVING and stops rather than running on half-blind. ``Parts`` starts a
service's parts in order and stops them last-started first however the service ends, a part that failed to start
included.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol, Self, TypeVar, runtime_checkable

from aimesh.runtime import Lifeline

log = logging.getLogger(__name__)

# Told the part's name and what ended it; may be called from any thread (``runtime.Lifeline.report`` is safe).
OnDeath = Callable[[str, BaseException], None]


@runtime_checkable
class Part(Protocol):
    """A long-lived part of a service."""

    @property
    def name(self) -> str: ...

    async def start(self) -> None: ...

    async def stop(self) -> None:
        """Drain and end; safe to call twice, and before ``start``."""
        ...


@runtime_checkable
class Mortal(Protocol):
    """A part that can die while the service runs, and says so to ``on_death``."""

    on_death: OnDeath | None


P = TypeVar("P", bound=Part)


class Closing:
    """A part that only needs closing when the service ends (a client, a store): ``close`` is called once."""

    def __init__(self, name: str, close: Callable[[], object | Awaitable[object]]) -> None:
        self._name = name
        self._close: Callable[[], object | Awaitable[object]] | None = close

    @property
    def name(self) -> str:
        return self._name

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        close, self._close = self._close, None
        if close is not None:
            result = close()
            if isinstance(result, Awaitable):
                await result


class TaskPart:
    """Runs ``run()`` as an asyncio task named ``name`` from ``start`` until ``stop``, which cancels it (or, with
    ``ask_to_stop``, calls that instead, for a task that ends gracefully when asked) and waits for it to end. ``start``
    and ``stop`` are idempotent; ``stop`` is safe before ``start``.

    A ``Mortal`` part: a task that ends before ``stop`` asked it to, by raising or by returning (then the error is
    ``RuntimeError(returned)``), is logged and reported to ``on_death``; a cancellation is never a death.
    """

    def __init__(
        self,
        name: str,
        run: Callable[[], Coroutine[Any, Any, object]],
        *,
        ask_to_stop: Callable[[], object] | None = None,
        returned: str = "ended before it was stopped",
        on_death: OnDeath | None = None,
    ) -> None:
        self._name = name
        self._run, self._ask_to_stop, self._returned = run, ask_to_stop, returned
        self.on_death = on_death
        self._task: asyncio.Task[object] | None = None
        self._stopping = self._asked = False

    @property
    def name(self) -> str:
        return self._name

    async def start(self) -> None:
        if self._task is not None or self._stopping:
            return
        self._task = asyncio.create_task(self._run(), name=self._name)
        self._task.add_done_callback(self._ended)

    async def stop(self) -> None:
        """Cancel the task (or ask it to stop) and wait for it; an error it ends with once asked is raised here."""
        if self._stopping:
            return
        self._stopping = True
        task = self._task
        if task is None:
            return
        if not task.done():  # one that ended already was reported to on_death
            self._asked = True
            if self._ask_to_stop is not None:
                self._ask_to_stop()
            else:
                task.cancel()
        await asyncio.wait([task])
        if self._asked and not task.cancelled() and (error := task.exception()) is not None:
            raise error

    def _ended(self, task: asyncio.Task[object]) -> None:
        if self._asked or task.cancelled():
            return
        error = task.exception() or RuntimeError(self._returned)
        log.error("task %s died", self._name, exc_info=error)
        if self.on_death is not None:
            self.on_death(self._name, error)


class Parts:
    """The parts a service runs. ``async with Parts(lifeline) as parts``, then ``await parts.start(part)`` for each
    in order; leaving the block stops every started part, last started first (an error stopping one is logged and
    the others are still stopped). A ``Mortal`` part reports its death to ``lifeline``."""

    def __init__(self, lifeline: Lifeline | None = None) -> None:
        self._lifeline = lifeline
        self._started: list[Part] = []

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self, part: P) -> P:
        """Start ``part`` (it is stopped with the others even if its start fails half-way) and return it."""
        if self._lifeline is not None and isinstance(part, Mortal):
            part.on_death = self._lifeline.report
        self._started.append(part)
        await part.start()
        return part

    def close_on_stop(self, name: str, close: Callable[[], object | Awaitable[object]]) -> None:
        """Call ``close`` when the parts stop, in its turn (as if it were a part started now)."""
        self._started.append(Closing(name, close))

    async def stop(self) -> None:
        """Stop every started part, last started first; safe to call twice."""
        while self._started:
            part = self._started.pop()
            try:
                await part.stop()
            except Exception:
                log.exception("stopping %s failed", part.name)


async def run_until(stop: asyncio.Event, *parts: Part) -> None:
    """Start ``parts`` in order and run them until ``stop`` is set, then stop them last-started first. If one of
    them dies first, they are stopped all the same and ``ComponentDied`` is raised."""
    lifeline = Lifeline()
    async with Parts(lifeline) as running:
        for part in parts:
            await running.start(part)
        await lifeline.wait_for(stop)
