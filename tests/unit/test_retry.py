"""RetryPolicy.call: a first try without the retry machinery, then tenacity's retrying as if it had run it."""

from __future__ import annotations

import asyncio

import pytest

from aimesh.errors import AimeshError
from aimesh.retry import RetryPolicy

FAST = RetryPolicy(initial_s=0.001, max_s=0.001, budget_s=5.0)


class Flaky(AimeshError):
    retryable = True


class Broken(AimeshError):
    retryable = False


class Script:
    """An attempt that raises the scripted errors in turn, then returns the number of tries."""

    def __init__(self, *errors: Exception, delay_s: float = 0.0) -> None:
        self.errors = list(errors)
        self.tries = 0
        self.delay_s = delay_s

    async def __call__(self) -> int:
        self.tries += 1
        await asyncio.sleep(self.delay_s)
        if self.errors:
            raise self.errors.pop(0)
        return self.tries


async def test_a_first_try_that_succeeds_is_the_answer() -> None:
    attempt = Script()
    assert await FAST.call(attempt) == 1


async def test_retryable_errors_are_retried_with_each_one_reported_and_slept_on() -> None:
    first, second = Flaky("one"), Flaky("two")
    attempt = Script(first, second)
    retried: list[BaseException] = []
    waits: list[float] = []

    async def sleep(wait_s: float) -> None:
        waits.append(wait_s)

    assert await FAST.call(attempt, on_retry=retried.append, sleep=sleep) == 3
    assert retried == [first, second]
    assert len(waits) == 2


async def test_an_error_not_to_retry_is_raised_at_once() -> None:
    attempt = Script(Broken("bad input"))
    retried: list[BaseException] = []
    with pytest.raises(Broken):
        await FAST.call(attempt, on_retry=retried.append)
    assert attempt.tries == 1 and retried == []


async def test_the_last_error_is_raised_when_the_budget_is_spent() -> None:
    attempt = Script(*(Flaky(f"down {i}") for i in range(1000)), delay_s=0.01)
    with pytest.raises(Flaky):
        await RetryPolicy(initial_s=0.001, max_s=0.001, budget_s=0.1).call(attempt)
    assert 3 <= attempt.tries < 20


async def test_the_first_try_counts_against_the_budget() -> None:
    # The first try alone takes longer than the budget: its error is final, nothing is retried.
    attempt = Script(Flaky("slow and down"), delay_s=0.06)
    retried: list[BaseException] = []
    with pytest.raises(Flaky, match="slow and down"):
        await FAST.call(attempt, budget_s=0.05, on_retry=retried.append)
    assert attempt.tries == 1 and retried == []
