"""Retry policy as a config object; the retrying itself is tenacity's."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    before_sleep_log,
    retry_if_exception,
    stop_after_delay,
    stop_never,
    wait_exponential_jitter,
)

from aimesh import tracing
from aimesh.errors import AimeshError

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter: ``initial_s`` doubling (``multiplier``) up to ``max_s`` per wait,
    giving up after ``budget_s`` in all (None: never)."""

    initial_s: float = 0.1
    multiplier: float = 2.0
    max_s: float = 5.0
    budget_s: float | None = 60.0

    def retrying(
        self, *, budget_s: float | None = None, on_retry: Callable[[BaseException], None] | None = None
    ) -> AsyncRetrying:
        """An AsyncRetrying that retries errors whose ``retryable`` is true; ``budget_s`` can tighten the
        policy's budget (a task's deadline, say). ``on_retry`` (which must not raise) sees each error that is
        about to be retried, not the last one."""
        budgets = [b for b in (self.budget_s, budget_s) if b is not None]

        def before_sleep(state: RetryCallState) -> None:
            _before_sleep(state)
            error = state.outcome.exception() if state.outcome else None
            if on_retry is not None and error is not None:
                on_retry(error)

        return AsyncRetrying(
            retry=retry_if_exception(lambda e: isinstance(e, AimeshError) and e.retryable),
            wait=wait_exponential_jitter(initial=self.initial_s, exp_base=self.multiplier, max=self.max_s),
            stop=stop_after_delay(min(budgets)) if budgets else stop_never,
            before_sleep=before_sleep,
            reraise=True,
        )
