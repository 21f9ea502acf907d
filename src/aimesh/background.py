"""A daemon thread with a stop flag, a ``lifecycle.Part``: what every loop that runs beside a service's event loop
shares: the Kafka readers (ingest's admission monitor and results reader, the notifier's feed and partition
directory refresher, the worker's cancellations reader), the worker's consumer, publisher and lag threads, ingest's
model signature reader and the object store's sweeper."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Self

from aimesh.lifecycle import OnDeath

log = logging.getLogger(__name__)


class BackgroundThread:
    """Runs ``run`` on a daemon thread named ``name`` from ``start`` until ``stop``; ``run`` returns once
    ``self.stopping`` is set (``_wake`` wakes a ``run`` that waits on something else too). ``start`` and ``stop`` are
    idempotent; ``async with`` starts and stops it; ``start_sync`` and ``stop_sync`` do the same from another thread.

    If ``run`` raises, the error is logged, kept in ``failed`` and passed to ``on_death`` (settable after
    construction; ``lifecycle.Parts`` sets it): a thread that died must not look alive, so a service hands this to
    its ``Lifeline``.
    """

    def __init__(self, name: str, *, on_death: OnDeath | None = None) -> None:
        self._name = name
        self.stopping = threading.Event()
        self.on_death = on_death
        self.failed: BaseException | None = None
        self._thread: threading.Thread | None = None

    @property
    def name(self) -> str:
        return self._name

    def run(self) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        self.start_sync()

    async def stop(self) -> None:
        if self._tell_to_stop() and self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    def start_sync(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run_reporting, name=self._name, daemon=True)
        self._thread.start()

    def stop_sync(self) -> None:
        """``stop`` from a thread that may block (never the event loop's)."""
        if self._tell_to_stop() and self._thread is not None:
            self._thread.join()

    def _tell_to_stop(self) -> bool:
        """Set ``stopping`` and wake ``run``; False if it was never started or was told already."""
        if self._thread is None or self.stopping.is_set():
            return False
        self.stopping.set()
        self._wake()
        return True

    def _wake(self) -> None:
        """Called once ``stopping`` is set: wake a ``run`` that waits on something else than ``stopping``."""

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def _run_reporting(self) -> None:
        try:
            self.run()
        except BaseException as e:
            log.exception("thread %s died", self._name)
            self.failed = e
            if self.on_death is not None:
                self.on_death(self._name, e)
