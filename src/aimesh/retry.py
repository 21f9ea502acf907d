"""Retry policy as a config object; the retrying itself is tenacity's."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    before_sleep_log,
    retry_if_exception,
    stop_after_delay,
    stop_any,
    stop_never,
    wait_exponential_jitter,
)
from tenacity.stop import stop_base

from aimesh import tracing
from aimesh.errors import AimeshError

log = logging.getLogger(__name__)

T = TypeVar("T")


_log_retry = before_sleep_log(log, logging.WARNING)


def _before_sleep(state: RetryCallState) -> None:
    _log_retry(state)
    error = state.outcome.exception() if state.outcome else None
    tracing.event(
        "retry",
        {
            "retry.attempt": state.attempt_number,
            "retry.wait_s": state.upcoming_sleep,
            "exception.message": str(error) if error else "",
        },
    )


class _StopAfterActiveDelay(stop_base):
    """Stop once ``budget_s`` has passed, not counting time ``paused_s`` reports (an outage waited out)."""

    def __init__(self, budget_s: float, paused_s: Callable[[], float]) -> None:
        self._budget_s = budget_s
        self._paused_s = paused_s
        self._paused_at_start = paused_s()

    def __call__(self, state: RetryCallState) -> bool:
        elapsed = state.seconds_since_start or 0.0
        return elapsed - (self._paused_s() - self._paused_at_start) >= self._budget_s


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter: ``initial_s`` doubling (``multiplier``) up to ``max_s`` per wait,
    giving up after ``budget_s`` in all (None: never)."""

    initial_s: float = 0.1
    multiplier: float = 2.0
    max_s: float = 5.0
    budget_s: float | None = 60.0

    async def call(
        self,
        attempt: Callable[[], Awaitable[T]],
        *,
        budget_s: float | None = None,
        on_retry: Callable[[BaseException], None] | None = None,
        sleep: Callable[[float], Awaitable[None]] | None = None,
        paused_s: Callable[[], float] | None = None,
    ) -> T:
        """``await attempt()``, retried as ``retrying`` would (same arguments). The first try runs without the
        retry machinery, whose set-up per call took a sixth of a busy worker's event loop; only an error to retry
        builds it, and enters it as the first attempt's outcome (logged, then the first backoff), the time the
        first try took counted against the budgets."""
        started = time.monotonic()
        try:
            return await attempt()
        except AimeshError as e:
            if not e.retryable:
                raise
            first: AimeshError | None = e
        retrying = self.retrying(
            budget_s=budget_s, on_retry=on_retry, sleep=sleep, paused_s=paused_s, spent_s=time.monotonic() - started
        )
        async for retry in retrying:
            with retry:
                if first is not None:
                    error, first = first, None
                    raise error
                return await attempt()
        raise AssertionError("unreachable: tenacity returns or raises")  # pragma: no cover

    def retrying(
        self,
        *,
        budget_s: float | None = None,
        on_retry: Callable[[BaseException], None] | None = None,
        sleep: Callable[[float], Awaitable[None]] | None = None,
        paused_s: Callable[[], float] | None = None,
        spent_s: float = 0.0,
    ) -> AsyncRetrying:
        """An AsyncRetrying that retries errors whose ``retryable`` is true; ``budget_s`` (wall time: a task's
        deadline, say) can tighten the policy's budget. ``on_retry`` (which must not raise) sees each error that
        is about to be retried, not the last one. ``sleep`` replaces the backoff sleep (it may wait longer, for
        a server to come back); time that ``paused_s`` reports passing does not count against the policy's own
        budget, only against ``budget_s``. ``spent_s``, time this call already took, comes off both budgets."""
        stops: list[stop_base] = []
        if budget_s is not None:
            stops.append(stop_after_delay(budget_s - spent_s))
        if self.budget_s is not None:
            own_s = self.budget_s - spent_s
            stops.append(_StopAfterActiveDelay(own_s, paused_s) if paused_s else stop_after_delay(own_s))

        def before_sleep(state: RetryCallState) -> None:
            _before_sleep(state)
            error = state.outcome.exception() if state.outcome else None
            if on_retry is not None and error is not None:
                on_retry(error)

        return AsyncRetrying(
            retry=retry_if_exception(lambda e: isinstance(e, AimeshError) and e.retryable),
            wait=wait_exponential_jitter(multiplier=self.initial_s, exp_base=self.multiplier, max=self.max_s),
            stop=stop_any(*stops) if stops else stop_never,
            before_sleep=before_sleep,
            reraise=True,
            sleep=sleep if sleep is not None else asyncio.sleep,
        )
