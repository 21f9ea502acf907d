"""The broker stopped while clients submit: they hear UNAVAILABLE, and every task they were told was accepted
gets exactly one terminal result once the broker is back."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable

import grpc
import pytest
from integration.mesh_client import (
    MeshClient,
    TopicReader,
    not_exactly_once,
    terminal_results_by_task,
    wait_caught_up,
    wait_for_results,
)

from aimesh.devstack.stack import Stack

from .conftest import WORKER_GROUP, assert_workers_rejoined

# Generous: a failing run should end on the tests' own timeouts, whose messages name the tasks concerned.
pytestmark = [pytest.mark.fault, pytest.mark.timeout(600)]

CLIENTS = 4
BEFORE = 100  # tasks accepted before the broker stops
AFTER = 100  # tasks accepted after it is back


class SubmitLoop:
    """``CLIENTS`` callers, each calling SubmitTask again as soon as the last call answered."""

    def __init__(self, client: MeshClient) -> None:
        self._client = client
        self.accepted: list[str] = []
        self.accepted_at: list[float] = []
        self.errors: list[tuple[float, grpc.StatusCode, str]] = []
        self._stop = asyncio.Event()
        self._callers: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._callers = [asyncio.create_task(self._call(i)) for i in range(CLIENTS)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._callers)

    def error_codes(self) -> Counter[str]:
        return Counter(code.name for _, code, _ in self.errors)

    async def accepted_at_least(self, count: int, timeout_s: float) -> None:
        await self._until(lambda: len(self.accepted) >= count, timeout_s, f"{count} accepted tasks")

    async def errors_at_least(self, count: int, timeout_s: float) -> None:
        await self._until(lambda: len(self.errors) >= count, timeout_s, f"{count} errors")

    async def _until(self, condition: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            for caller in self._callers:
                if caller.done():
                    caller.result()  # a caller that crashed says why
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no {what} after {timeout_s:.0f} s: {len(self.accepted)} accepted, errors {self.error_codes()}"
                )
            await asyncio.sleep(0.05)

    async def _call(self, caller: int) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            try:
                task_id = await self._client.submit("sleep", f"client {caller} call {n}")
                self.accepted.append(task_id)
                self.accepted_at.append(time.monotonic())
            except grpc.aio.AioRpcError as e:
                self.errors.append((time.monotonic(), e.code(), e.details() or ""))


async def test_clients_hear_unavailable_while_the_broker_is_down_and_lose_no_accepted_task(
    stack: Stack, client: MeshClient
) -> None:
    calls = SubmitLoop(client)
    with TopicReader(stack.kafka_bootstrap, stack.topics.results_topic) as results:
        calls.start()
        try:
            await calls.accepted_at_least(BEFORE, timeout_s=60)
            stopping = time.monotonic()
            await asyncio.to_thread(stack.stop_kafka)  # a clean shutdown, so it may come back at once
            stopped = time.monotonic()
            accepted_before = len(calls.accepted)
            # Each caller waits AIMESH_PUBLISH_TIMEOUT_S (2 s) for its answer.
            await calls.errors_at_least(CLIENTS, timeout_s=30)
            restarting = time.monotonic()
            await asyncio.to_thread(stack.start_kafka)  # same data folder and ports; returns once it serves
            back = time.monotonic()
            await calls.accepted_at_least(len(calls.accepted) + AFTER, timeout_s=120)
        finally:
            await calls.stop()
        down_s = back - stopping
        print(
            f"broker: stop {stopped - stopping:.1f} s, down {restarting - stopped:.1f} s, "
            f"start {back - restarting:.1f} s; accepted {accepted_before} before, {len(calls.accepted)} in all; "
            f"errors {dict(calls.error_codes())}"
        )
        assert set(calls.error_codes()) == {"UNAVAILABLE"}, f"errors other than UNAVAILABLE: {calls.errors[:5]}"
        # While no broker ran (a margin for answers already on their way), nothing was accepted.
        assert not [t for t in calls.accepted_at if stopped + 0.5 < t < restarting]
        assert len([t for t, _, _ in calls.errors if stopped < t <= back]) >= CLIENTS
        assert len(set(calls.accepted)) == len(calls.accepted)
        wait_for_results(results, calls.accepted, timeout_s=120)
    wait_caught_up(stack.kafka_bootstrap, WORKER_GROUP, stack.topics.tasks_topic)

    counts = terminal_results_by_task(stack.kafka_bootstrap, stack.topics.results_topic)
    problem = not_exactly_once(calls.accepted, counts)
    assert not problem, f"after a broker outage of {down_s:.1f} s: {problem}"
    assert_workers_rejoined(stack)
