"""The worker's view of Triton's health, and a retry budget that an outage does not spend."""

from __future__ import annotations

import asyncio

import pytest

from aimesh.errors import AimeshError
from aimesh.retry import RetryPolicy
from aimesh.worker.health import TritonHealth


class Flaky(AimeshError):
    retryable = True


async def test_health_follows_the_probe_and_wakes_waiters() -> None:
    up = [False]
    changes: list[bool] = []

    async def probe() -> bool:
        return up[0]

    health = TritonHealth(probe, interval_s=0.01, on_change=changes.append)
    runner = asyncio.create_task(health.run())
    try:
        await asyncio.sleep(0.05)
        assert not health.healthy
        assert not await health.wait_healthy(0.02)
        waiter = asyncio.create_task(health.wait_healthy(5))
        up[0] = True
        assert await waiter
        assert changes == [False, True]
        assert health.unhealthy_seconds() > 0.03
    finally:
        runner.cancel()


async def test_a_probe_that_raises_counts_as_unhealthy() -> None:
    async def probe() -> bool:
        raise ConnectionError("refused")

    health = TritonHealth(probe, interval_s=1)
    assert not await health.check()


async def test_paused_time_does_not_count_against_the_retry_budget() -> None:
    paused = [0.0]
    waits = 0

    async def sleep(wait_s: float) -> None:
        nonlocal waits
        waits += 1
        await asyncio.sleep(0.02)
        if waits <= 10:
            paused[0] += 0.02  # the first ten waits sit out an outage

    policy = RetryPolicy(initial_s=0.001, max_s=0.001, budget_s=0.1)
    attempts = 0
    with pytest.raises(Flaky):
        async for attempt in policy.retrying(sleep=sleep, paused_s=lambda: paused[0]):
            with attempt:
                attempts += 1
                raise Flaky("down")
    # By the wall clock the 0.1 s budget is gone after about 5 waits; the outage's 0.2 s does not count.
    assert attempts > 10


async def test_the_wall_clock_budget_still_applies_during_an_outage() -> None:
    async def sleep(wait_s: float) -> None:
        await asyncio.sleep(0.02)

    policy = RetryPolicy(initial_s=0.001, max_s=0.001, budget_s=None)
    attempts = 0
    with pytest.raises(Flaky):
        async for attempt in policy.retrying(budget_s=0.05, sleep=sleep, paused_s=lambda: 1e9):
            with attempt:
                attempts += 1
                raise Flaky("down")
    assert 2 <= attempts <= 5
