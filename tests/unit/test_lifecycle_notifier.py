"""The notifier's parts as one lifecycle: its retention sweeper is a part whose death turns health NOT_SERVING and
stops the notifier, and its task store is closed (its temporary folder removed after it) only once everything that
writes to it has stopped."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from typing import Any

import pytest
from test_notifier_health import FakeFeed, FakeProducer, free_port, settings, until

from aimesh import runtime
from aimesh.grpc_edge import GrpcServer
from aimesh.notifier import __main__ as notifier_main
from aimesh.notifier.state_db import RocksStateDb
from aimesh.notifier.store import TaskStore


@pytest.fixture
def notifier_fakes(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The feed and producer faked at their seam; yields the order in which the feed stopped and the store closed."""
    FakeFeed.made.clear()
    FakeProducer.made.clear()
    monkeypatch.setattr(notifier_main, "Feed", FakeFeed)
    monkeypatch.setattr(notifier_main, "AsyncProducer", FakeProducer)
    order: list[str] = []
    feed_stop, store_close = FakeFeed.stop, TaskStore.close

    async def stop_feed(feed: FakeFeed) -> None:
        order.append("feed stopped")
        await feed_stop(feed)

    def close_store(store: TaskStore) -> None:
        order.append("store closed")
        store_close(store)

    monkeypatch.setattr(FakeFeed, "stop", stop_feed)
    monkeypatch.setattr(TaskStore, "close", close_store)
    yield order


async def test_a_retention_sweeper_that_dies_stops_the_notifier_not_serving(
    notifier_fakes: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    told: list[bool] = []
    set_serving = GrpcServer.set_serving

    async def spy(server: GrpcServer, serving: bool) -> None:
        told.append(serving)
        await set_serving(server, serving)

    async def broken_sweep(store: TaskStore, retention_s: float) -> None:
        await asyncio.sleep(0.05)
        raise OSError("the state's disk is gone")

    monkeypatch.setattr(GrpcServer, "set_serving", spy)
    monkeypatch.setattr(notifier_main, "_sweep", broken_sweep)
    serving = asyncio.create_task(notifier_main.serve(settings(free_port()), asyncio.Event()))
    await until(lambda: bool(FakeFeed.made) and FakeFeed.made[0].started)
    FakeFeed.made[0].caught_up.set()
    with pytest.raises(runtime.ComponentDied) as info:
        await asyncio.wait_for(serving, 10)
    assert info.value.component == "retention-sweeper" and isinstance(info.value.__cause__, OSError)
    assert told[-1] is False  # NOT_SERVING at once
    assert notifier_fakes == ["feed stopped", "store closed"]


async def test_the_store_closes_after_the_feed_stopped_and_its_temporary_folder_goes_after_it(
    notifier_fakes: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    folders: list[str] = []
    open_db = notifier_main.RocksStateDb

    def remember_folder(path: str, **kwargs: Any) -> RocksStateDb:
        folders.append(path)
        return open_db(path, **kwargs)

    monkeypatch.setattr(notifier_main, "RocksStateDb", remember_folder)
    stop = asyncio.Event()
    serving = asyncio.create_task(notifier_main.serve(settings(free_port()), stop))
    await until(lambda: bool(FakeFeed.made) and FakeFeed.made[0].started)
    [folder] = folders
    assert await asyncio.to_thread(os.path.isdir, folder)
    stop.set()
    await asyncio.wait_for(serving, 10)
    assert notifier_fakes == ["feed stopped", "store closed"]
    assert not await asyncio.to_thread(os.path.exists, folder)
