"""One open WatchTask or WatchTasks stream (``Watch``), and the shape its servicer method takes (``written``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Hashable
from dataclasses import dataclass, field
from typing import Any

from .buffers import StreamBuffer
from .forwarding import Answer, Relays


@dataclass(eq=False)
class Watch:
    """One open stream: whose it is (``connection`` None: a forwarded one, counted per tenant only), its
    buffer, the task serving it (``handler``), the last sequence sent of each task, the tasks finished with,
    the tasks followed at other replicas (``relays``; None for a forwarded stream, which follows only tasks
    owned here), and the answer it was interrupted with. It is its own key in the store's subscriptions."""

    tenant: str
    connection: Hashable | None
    buffer: StreamBuffer
    handler: asyncio.Task[Any] | None
    sent: dict[str, int] = field(default_factory=dict)
    ended: set[str] = field(default_factory=set)
    relays: Relays | None = None
    failure: Answer | None = None

    def interrupt(self, answer: Answer) -> None:
        """End the stream with ``answer`` (once: a later answer is not taken), whatever it is waiting for."""
        if self.failure is None and self.handler is not None:
            self.failure = answer
            self.handler.cancel()

    @property
    def pending(self) -> list[str]:
        """The tasks not finished with."""
        return [task_id for task_id in self.sent if task_id not in self.ended]


async def written(watch: Awaitable[None]) -> AsyncIterator[Any]:
    """A server-streaming method whose responses ``watch`` writes with ``context.write`` (so that each write
    can have a timeout), in the shape of an async generator that yields nothing: what OpenTelemetry's
    server interceptor iterates. grpc.aio allows both on one call."""
    await watch
    return
    yield  # pragma: no cover - makes this an async generator
