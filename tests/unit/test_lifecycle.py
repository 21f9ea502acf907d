"""One lifecycle for every part of a service (aimesh.lifecycle): parts start in order and stop last-started first
however the service ends, each once; a part that dies is reported to the service's lifeline."""

from __future__ import annotations

import asyncio

import pytest

from aimesh import runtime
from aimesh.background import BackgroundThread
from aimesh.lifecycle import Mortal, Part, Parts, run_until


class Recorded:
    """A part that notes its starts and stops in ``log``; ``fail_start`` makes its start raise half-way."""

    def __init__(self, name: str, log: list[str], *, fail_start: bool = False, fail_stop: bool = False) -> None:
        self.name = name
        self._log = log
        self._fail_start, self._fail_stop = fail_start, fail_stop
        self.stops = 0

    async def start(self) -> None:
        self._log.append(f"start {self.name}")
        if self._fail_start:
            raise OSError(f"{self.name} cannot bind its port")

    async def stop(self) -> None:
        self.stops += 1
        self._log.append(f"stop {self.name}")
        if self._fail_stop:
            raise RuntimeError(f"{self.name} failed to stop")


async def test_parts_stop_last_started_first_each_once() -> None:
    log: list[str] = []
    parts = Parts()
    a, b = Recorded("a", log), Recorded("b", log)
    async with parts:
        await parts.start(a)
        parts.close_on_stop("c", lambda: log.append("close c"))
        await parts.start(b)
    await parts.stop()  # again: nothing left to stop
    assert log == ["start a", "start b", "stop b", "close c", "stop a"]
    assert (a.stops, b.stops) == (1, 1)


async def test_a_part_that_fails_to_start_is_stopped_with_those_started_before_it() -> None:
    log: list[str] = []
    with pytest.raises(OSError, match="cannot bind"):
        async with Parts() as parts:
            await parts.start(Recorded("server", log))
            await parts.start(Recorded("metrics", log, fail_start=True))
            await parts.start(Recorded("never", log))
    assert log == ["start server", "start metrics", "stop metrics", "stop server"]


async def test_a_part_that_fails_to_stop_does_not_keep_the_others_running(caplog: pytest.LogCaptureFixture) -> None:
    log: list[str] = []
    async with Parts() as parts:
        await parts.start(Recorded("first", log))
        await parts.start(Recorded("broken", log, fail_stop=True))
    assert log == ["start first", "start broken", "stop broken", "stop first"]
    assert "stopping broken failed" in caplog.text


class Dies(BackgroundThread):
    def run(self) -> None:
        raise ValueError("a bug in the reader")


async def test_run_until_stops_every_part_and_raises_component_died_when_one_dies() -> None:
    log: list[str] = []
    first, dying = Recorded("producer", log), Dies("results-reader")
    assert isinstance(dying, Mortal) and isinstance(dying, Part) and isinstance(first, Part)
    with pytest.raises(runtime.ComponentDied) as died:
        await asyncio.wait_for(run_until(asyncio.Event(), first, dying), 10)
    assert died.value.component == "results-reader" and isinstance(died.value.__cause__, ValueError)
    assert log == ["start producer", "stop producer"]


async def test_run_until_returns_after_stopping_every_part_once_stop_is_set() -> None:
    log: list[str] = []
    stop = asyncio.Event()
    running = asyncio.create_task(run_until(stop, Recorded("a", log), Recorded("b", log)))
    await asyncio.sleep(0)
    stop.set()
    await asyncio.wait_for(running, 10)
    assert log == ["start a", "start b", "stop b", "stop a"]
