"""The client's retry policy: a config object; the retrying itself is tenacity's.

A retryable error (``ClientError.retryable``) is retried after the delay the server asked for in its
google.rpc.RetryInfo (plus jitter, capped), or else after an exponential backoff with jitter, up to
``max_attempts`` attempts in all and never past the call's own deadline.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt, wait_exponential_jitter
from tenacity.stop import stop_base
from tenacity.wait import wait_base

from aimesh.client.errors import ClientError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    """How the client retries UNAVAILABLE and RESOURCE_EXHAUSTED-with-RetryInfo.

    ``max_attempts`` counts the first try (1: never retry). Without a server hint the wait is
    ``initial_s * multiplier**n`` plus up to ``jitter_s``, at most ``max_s``; with a RetryInfo delay it is
    that delay plus up to ``hint_jitter`` of it, at most ``max_hint_s`` (a server asking for a longer wait
    than that is not waited for: the error surfaces).
    """

    max_attempts: int = 5
    initial_s: float = 0.1
    multiplier: float = 2.0
    max_s: float = 5.0
    jitter_s: float = 0.1
    hint_jitter: float = 0.2
    max_hint_s: float = 30.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")

    @classmethod
    def never(cls) -> RetryPolicy:
        return cls(max_attempts=1)

    def retrying(
        self,
        *,
        deadline: float | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> AsyncRetrying:
        """An AsyncRetrying for one call; ``deadline`` (time.monotonic) also ends it: no wait runs past it."""
        return AsyncRetrying(
            retry=retry_if_exception(self._retryable),
            wait=_Wait(self),
            stop=stop_after_attempt(self.max_attempts) | _StopAtDeadline(deadline),
            before_sleep=_log_retry,
            reraise=True,
            sleep=sleep,
        )

    def _retryable(self, error: BaseException) -> bool:
        if not isinstance(error, ClientError) or not error.retryable:
            return False
        hint = error.retry_delay_s
        return hint is None or hint <= self.max_hint_s


class _Wait(wait_base):
    """The server's RetryInfo delay with jitter if it sent one, else exponential backoff with jitter."""

    def __init__(self, policy: RetryPolicy) -> None:
        self._policy = policy
        self._backoff = wait_exponential_jitter(
            multiplier=policy.initial_s, exp_base=policy.multiplier, max=policy.max_s, jitter=policy.jitter_s
        )

    def __call__(self, state: RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome else None
        hint = error.retry_delay_s if isinstance(error, ClientError) else None
        if hint is not None:
            return hint + random.uniform(0, hint * self._policy.hint_jitter)
        return float(self._backoff(state))


class _StopAtDeadline(stop_base):
    """Stop when the coming wait would end past the deadline: the last error surfaces now, not a timeout later.
    (tenacity computes the wait before it asks whether to stop.)"""

    def __init__(self, deadline: float | None) -> None:
        self._deadline = deadline

    def __call__(self, state: RetryCallState) -> bool:
        return self._deadline is not None and time.monotonic() + (state.upcoming_sleep or 0.0) >= self._deadline


def _log_retry(state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome else None
    log.info("retrying in %.2f s (attempt %d): %s", state.upcoming_sleep, state.attempt_number, error)
