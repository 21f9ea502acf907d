"""The worker's own parts (its consumer, publisher and lag threads, its Triton health check): each that dies is
reported as the worker's death, ``stop`` drains them in order, and a wedged publisher is not waited for."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from test_worker_poison_outcomes import FakePublisher, IdleConsumer, StartablePublisher, idle_consumers, make_worker

from aimesh import runtime
from aimesh.lifecycle import run_until
from aimesh.worker.worker import Worker


@pytest.fixture
def consumers(monkeypatch: pytest.MonkeyPatch) -> list[IdleConsumer]:
    """Every Kafka consumer the worker makes fetches nothing; the lag thread never refreshes."""
    return idle_consumers(monkeypatch)


async def until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_a_triton_health_check_that_dies_stops_the_worker(
    consumers: list[IdleConsumer], monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = make_worker(StartablePublisher())

    async def broken_check() -> bool:
        raise ValueError("a bug in the health check")

    monkeypatch.setattr(worker.health, "check", broken_check)
    with pytest.raises(runtime.ComponentDied) as died:
        await asyncio.wait_for(run_until(asyncio.Event(), worker), 20)
    assert died.value.component == "triton-health" and isinstance(died.value.__cause__, ValueError)
    assert consumers and all(c.closed.is_set() for c in consumers)  # stopped: the consumer left its group


async def test_a_lag_thread_that_dies_stops_the_worker(
    consumers: list[IdleConsumer], monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = make_worker(StartablePublisher())

    def dies() -> None:
        raise ValueError("a bug in the lag reporter")

    monkeypatch.setattr(worker.consumer._lag, "run", dies)
    with pytest.raises(runtime.ComponentDied) as died:
        await asyncio.wait_for(run_until(asyncio.Event(), worker), 20)
    assert died.value.component == "kafka-lag" and isinstance(died.value.__cause__, ValueError)
    assert consumers and all(c.closed.is_set() for c in consumers)


def record_calls(monkeypatch: pytest.MonkeyPatch, order: list[str], target: object, method: str, label: str) -> None:
    original = getattr(target, method)
    if asyncio.iscoroutinefunction(original):

        async def called_async(*args: Any, **kwargs: Any) -> Any:
            order.append(label)
            return await original(*args, **kwargs)

        monkeypatch.setattr(target, method, called_async)
    else:

        def called(*args: Any, **kwargs: Any) -> Any:
            order.append(label)
            return original(*args, **kwargs)

        monkeypatch.setattr(target, method, called)


async def test_stop_drains_the_parts_in_order(consumers: list[IdleConsumer], monkeypatch: pytest.MonkeyPatch) -> None:
    worker = make_worker(StartablePublisher(), cancel_topic="aimesh.tasks.cancel", cancel_consumer_config={})
    reader = worker.cancel_reader
    assert reader is not None
    monkeypatch.setattr(reader, "run", reader.stopping.wait)  # reads nothing until stopped
    order: list[str] = []
    for target, method, label in [
        (worker.scheduler, "drain", "drain"),
        (worker.consumer, "stop", "consumer"),
        (worker.committer, "stop", "publisher"),
        (reader, "stop", "cancels"),
        (worker._health_check, "stop", "health"),
        (worker.runner, "close", "runner"),
        (worker.committer.publisher, "close", "producer"),
    ]:
        record_calls(monkeypatch, order, target, method, label)
    stop = asyncio.Event()
    running = asyncio.create_task(run_until(stop, worker))
    await until(lambda: bool(consumers) and any(t.name == "kafka-publisher" for t in threading.enumerate()))
    stop.set()
    await asyncio.wait_for(running, 20)
    assert order == ["drain", "consumer", "publisher", "cancels", "health", "runner", "producer"]
    assert all(c.closed.is_set() for c in consumers)
    names = {t.name for t in threading.enumerate()}
    assert not names & {"kafka-consumer", "kafka-publisher", "kafka-lag", "kafka-cancels"}  # all joined
    await worker.stop()  # a second stop does nothing
    assert len(order) == 7


async def test_a_wedged_publisher_is_told_to_stop_but_not_waited_for(monkeypatch: pytest.MonkeyPatch) -> None:
    committer = make_worker(FakePublisher()).committer
    inside, release = threading.Event(), threading.Event()

    def stuck(keys: Any = None) -> bool:
        inside.set()
        release.wait(10)
        return True

    monkeypatch.setattr(committer, "publish_ready", stuck)
    await committer.start()
    try:
        committer.work_ready.set()
        assert await asyncio.to_thread(inside.wait, 10)
        committer.wedged.set()
        await asyncio.wait_for(committer.stop(), 1)  # returns although its thread is stuck
        assert committer.stopping.is_set()
    finally:
        release.set()


async def test_a_worker_never_started_stops_quietly() -> None:
    worker: Worker = make_worker(FakePublisher())
    await worker.stop()
    await worker.stop()
