"""A daemon thread with a stop flag, a ``lifecycle.Part``: what the services' Kafka readers that run beside the
event loop share."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Self

from aimesh.lifecycle import OnDeath

log = logging.getLogger(__name__)


class BackgroundThread:
    """Runs ``run`` on a daemon thread named ``name`` from ``start`` until ``stop``; ``run`` returns once
    ``self.stopping`` is set. ``start`` and ``stop`` are idempotent; ``async with`` starts and stops it.

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
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run_reporting, name=self._name, daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        if self._thread is None or self.stopping.is_set():
            return
        self.stopping.set()
        await asyncio.to_thread(self._thread.join)

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
