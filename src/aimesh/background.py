"""A daemon thread with a stop flag, usable as an async context manager: what the services' Kafka readers
that run beside the event loop share."""

from __future__ import annotations

import asyncio
import threading
from typing import Self


class BackgroundThread:
    """Runs ``run`` on a daemon thread named ``name`` from ``start`` until ``stop``; ``run`` returns once
    ``self.stopping`` is set. ``start`` and ``stop`` are idempotent; ``async with`` starts and stops it."""

    def __init__(self, name: str) -> None:
        self._name = name
        self.stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def run(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self.run, name=self._name, daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        if self._thread is None or self.stopping.is_set():
            return
        self.stopping.set()
        await asyncio.to_thread(self._thread.join)

    async def __aenter__(self) -> Self:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()
