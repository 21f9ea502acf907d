"""An asyncio task as a part (``lifecycle.TaskPart``): stopped by cancelling it (or asking it to end), safe to stop
twice and before it started, and a task that ends before it was stopped (raising or returning) is a death reported
to ``on_death``; a cancellation never is."""

from __future__ import annotations

import asyncio

import pytest

from aimesh import runtime
from aimesh.lifecycle import Mortal, Part, Parts, TaskPart

Deaths = list[tuple[str, BaseException]]


def recording() -> tuple[Deaths, TaskPart]:
    """A part whose task runs until cancelled, and the deaths it reports."""
    deaths: Deaths = []

    async def forever() -> None:
        await asyncio.Event().wait()

    return deaths, TaskPart("sweeper", forever, on_death=lambda name, error: deaths.append((name, error)))


async def test_a_task_that_raises_is_reported_to_on_death_with_its_name() -> None:
    deaths: Deaths = []
    died = asyncio.Event()

    async def breaks() -> None:
        await asyncio.sleep(0)
        raise OSError("the store's disk is gone")

    def on_death(name: str, error: BaseException) -> None:
        deaths.append((name, error))
        died.set()

    part = TaskPart("retention-sweeper", breaks, on_death=on_death)
    assert isinstance(part, Part) and isinstance(part, Mortal)
    await part.start()
    await asyncio.wait_for(died.wait(), 10)
    [(name, error)] = deaths
    assert name == "retention-sweeper" and isinstance(error, OSError)
    await part.stop()  # it died already: stopping it is quiet, and no second death
    assert len(deaths) == 1


async def test_a_task_that_dies_in_parts_raises_component_died_on_the_lifeline() -> None:
    async def breaks() -> None:
        raise ValueError("a bug in the sweep")

    lifeline = runtime.Lifeline()
    async with Parts(lifeline) as parts:
        await parts.start(TaskPart("retention-sweeper", breaks))
        with pytest.raises(runtime.ComponentDied) as died:
            await asyncio.wait_for(lifeline.wait_for(asyncio.Event()), 10)
    assert died.value.component == "retention-sweeper" and isinstance(died.value.__cause__, ValueError)


async def test_a_task_that_returns_before_it_was_stopped_is_a_death() -> None:
    deaths: Deaths = []

    async def returns() -> None:
        pass

    part = TaskPart("http-server", returns, returned="uvicorn stopped serving", on_death=lambda *d: deaths.append(d))
    await part.start()
    await asyncio.sleep(0.01)
    [(name, error)] = deaths
    assert name == "http-server" and isinstance(error, RuntimeError) and str(error) == "uvicorn stopped serving"


async def test_stop_cancels_the_task_waits_for_it_and_is_no_death() -> None:
    deaths, part = recording()
    await part.start()
    await asyncio.sleep(0)
    await part.stop()
    await asyncio.sleep(0)  # done callbacks run
    assert deaths == []


async def test_stop_twice_is_safe() -> None:
    deaths, part = recording()
    await part.start()
    await part.stop()
    await part.stop()
    assert deaths == []


async def test_stop_before_start_is_safe_and_the_part_then_never_starts() -> None:
    started = False

    async def body() -> None:
        nonlocal started
        started = True

    part = TaskPart("never", body)
    await part.stop()
    await part.start()
    await asyncio.sleep(0.01)
    assert not started


async def test_start_twice_runs_one_task() -> None:
    runs = 0

    async def body() -> None:
        nonlocal runs
        runs += 1
        await asyncio.Event().wait()

    part = TaskPart("once", body)
    await part.start()
    await part.start()
    await asyncio.sleep(0.01)
    await part.stop()
    assert runs == 1


async def test_a_cancellation_from_elsewhere_is_no_death() -> None:
    deaths, part = recording()
    await part.start()
    await asyncio.sleep(0)
    [task] = [t for t in asyncio.all_tasks() if t.get_name() == "sweeper"]
    task.cancel()
    await asyncio.sleep(0.01)
    assert deaths == []
    await part.stop()


async def test_ask_to_stop_ends_the_task_gracefully_instead_of_cancelling_it() -> None:
    deaths: Deaths = []
    asked = asyncio.Event()
    finished = False

    async def serve() -> None:
        nonlocal finished
        await asked.wait()
        await asyncio.sleep(0.01)  # a graceful shutdown's work, not cut short by a cancellation
        finished = True

    part = TaskPart("http-server", serve, ask_to_stop=asked.set, on_death=lambda *d: deaths.append(d))
    await part.start()
    await part.stop()
    assert finished and deaths == []


async def test_an_error_while_stopping_as_asked_is_raised_by_stop_not_reported_as_a_death() -> None:
    deaths: Deaths = []
    asked = asyncio.Event()

    async def serve() -> None:
        await asked.wait()
        raise RuntimeError("shutdown failed")

    part = TaskPart("http-server", serve, ask_to_stop=asked.set, on_death=lambda *d: deaths.append(d))
    await part.start()
    with pytest.raises(RuntimeError, match="shutdown failed"):
        await part.stop()
    assert deaths == []
