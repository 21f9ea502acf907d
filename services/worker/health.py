"""Whether Triton can serve: checked every ``interval_s``, and at once when a call fails as if it were down.

While Triton is unhealthy the worker fetches nothing new and its running tasks wait here instead of
spending their retry budget, so an outage costs time, never tasks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


class TritonHealth:
    def __init__(
        self,
        probe: Callable[[], Awaitable[bool]],
        *,
        interval_s: float,
        on_change: Callable[[bool], None] = lambda healthy: None,
    ) -> None:
        self._probe = probe
        self._interval_s = interval_s
        self._on_change = on_change
        self._healthy = asyncio.Event()
        self._healthy.set()  # until a check says otherwise
        self._wake = asyncio.Event()
        self._unhealthy_since: float | None = None
        self._unhealthy_total_s = 0.0

    @property
    def healthy(self) -> bool:
        return self._healthy.is_set()

    def unhealthy_seconds(self) -> float:
        """Time Triton has been unhealthy since this monitor started (the current outage included)."""
        current = time.monotonic() - self._unhealthy_since if self._unhealthy_since is not None else 0.0
        return self._unhealthy_total_s + current

    def check_soon(self) -> None:
        """Check now rather than at the next interval (a call just failed as if Triton were down)."""
        self._wake.set()

    async def wait_healthy(self, timeout_s: float | None) -> bool:
        """Wait until Triton is healthy (at most ``timeout_s``); return whether it is."""
        if self.healthy:
            return True
        try:
            await asyncio.wait_for(self._healthy.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def check(self) -> bool:
        try:
            healthy = await self._probe()
        except Exception as e:  # a probe that fails to answer is an unhealthy server
            log.debug("Triton health probe failed: %r", e)
            healthy = False
        self._set(healthy)
        return healthy

    async def run(self) -> None:
        """Check forever (cancel to stop)."""
        while True:
            await self.check()
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self._interval_s)
            except TimeoutError:
                pass

    def _set(self, healthy: bool) -> None:
        if healthy == self.healthy:
            return
        now = time.monotonic()
        if healthy:
            outage_s = now - self._unhealthy_since if self._unhealthy_since is not None else 0.0
            self._unhealthy_total_s += outage_s
            self._unhealthy_since = None
            self._healthy.set()
            log.warning("Triton is healthy again after %.1fs; resuming", outage_s)
        else:
            self._unhealthy_since = now
            self._healthy.clear()
            log.warning("Triton is not ready; pausing consumption until it is")
        self._on_change(healthy)
