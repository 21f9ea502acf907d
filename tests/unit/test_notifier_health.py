"""Health that does not lie: the notifier's ``serve`` with its Kafka feed and producer replaced by fakes at the
seam (everything else real: the gRPC server on a free port, health, the lifeline), and the lifeline and
``run_service`` that any service uses when one of its threads dies."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aimesh import runtime
from aimesh.background import BackgroundThread
from aimesh.grpc_edge import GrpcServer
from aimesh.lifecycle import Parts
from aimesh.notifier import __main__ as notifier_main
from aimesh.settings import NotifierSettings

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class FakeFeed:
    """The Kafka feed at its seam: history is read when the test sets ``caught_up``; ``die`` kills its
    thread as an error in librdkafka would."""

    made: list[FakeFeed] = []
    name = "notifier-feed"

    def __init__(self, *args: object, on_death: Callable[[str, BaseException], None] | None = None, **kw: Any):
        self.caught_up = asyncio.Event()
        self.on_death = on_death
        self.started = self.stopped = False
        FakeFeed.made.append(self)

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.stopped = True

    def die(self, error: BaseException) -> None:
        thread = threading.Thread(target=lambda: self.on_death and self.on_death("notifier-feed", error))
        thread.start()
        thread.join()


class FakeProducer:
    made: list[FakeProducer] = []

    def __init__(self, config: object, *, name: str = "kafka-producer") -> None:
        self.name = name
        self.started = self.stopped = False
        FakeProducer.made.append(self)

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.stopped = True


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    FakeFeed.made.clear()
    FakeProducer.made.clear()
    monkeypatch.setattr(notifier_main, "Feed", FakeFeed)
    monkeypatch.setattr(notifier_main, "AsyncProducer", FakeProducer)
    yield


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def settings(port: int) -> NotifierSettings:
    return NotifierSettings(
        auth="off", notifier_address=f"127.0.0.1:{port}", metrics_port=0, kafka_bootstrap="127.0.0.1:1"
    )


async def until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def check(port: int) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        return int(reply.status)


async def test_not_serving_until_the_history_is_read_and_again_once_the_feed_dies(
    fakes: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    told: list[tuple[bool, bool]] = []  # (serving, history read) of every health change
    set_serving = GrpcServer.set_serving

    async def spy(server: GrpcServer, serving: bool) -> None:
        told.append((serving, bool(FakeFeed.made) and FakeFeed.made[0].caught_up.is_set()))
        await set_serving(server, serving)

    monkeypatch.setattr(GrpcServer, "set_serving", spy)
    port = free_port()
    serving = asyncio.create_task(notifier_main.serve(settings(port), asyncio.Event()))
    await until(lambda: bool(FakeFeed.made) and FakeFeed.made[0].started)
    feed = FakeFeed.made[0]
    assert await check(port) == NOT_SERVING
    feed.caught_up.set()
    await until(lambda: told[-1] == (True, True))
    assert await check(port) == SERVING
    assert (True, False) not in told  # never SERVING before the history was read

    feed.die(RuntimeError("librdkafka: fatal error"))
    with pytest.raises(runtime.ComponentDied) as info:
        await asyncio.wait_for(serving, 10)
    assert info.value.component == "notifier-feed"
    assert told[-1] == (False, True)
    assert feed.stopped and FakeProducer.made[0].stopped


async def test_a_feed_that_dies_before_the_history_is_read_stops_the_notifier(fakes: None) -> None:
    serving = asyncio.create_task(notifier_main.serve(settings(free_port()), asyncio.Event()))
    await until(lambda: bool(FakeFeed.made) and FakeFeed.made[0].started)
    FakeFeed.made[0].die(RuntimeError("no broker"))
    with pytest.raises(runtime.ComponentDied):
        await asyncio.wait_for(serving, 10)
    assert FakeFeed.made[0].stopped


async def test_a_port_in_use_stops_the_notifier_with_nothing_left_running(fakes: None) -> None:
    with socket.socket() as taken:  # no SO_REUSEPORT: gRPC cannot share it
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(RuntimeError, match="cannot bind"):
            await asyncio.wait_for(notifier_main.serve(settings(taken.getsockname()[1]), asyncio.Event()), 10)
    for part in (*FakeFeed.made, *FakeProducer.made):
        assert part.stopped or not part.started


async def test_the_lifeline_returns_on_the_stop_signal_when_nothing_died() -> None:
    lifeline = runtime.Lifeline()
    stop = asyncio.Event()
    stop.set()
    await lifeline.wait_for(stop)  # returns: no death
    assert lifeline.death is None


class Dying(BackgroundThread):
    def run(self) -> None:
        raise OSError("the reader's socket broke")


async def test_a_background_thread_that_dies_is_reported_to_the_lifeline_of_the_parts_it_runs_in() -> None:
    lifeline = runtime.Lifeline()
    thread = Dying("results-reader")
    async with Parts(lifeline) as parts:
        await parts.start(thread)
        with pytest.raises(runtime.ComponentDied) as info:
            await asyncio.wait_for(lifeline.wait_for(asyncio.Event()), 10)
    assert info.value.component == "results-reader" and isinstance(info.value.__cause__, OSError)
    assert isinstance(thread.failed, OSError)


def test_run_service_exits_non_zero_when_a_component_died(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "configure_logging", lambda *args, **kwargs: None)
    monkeypatch.setattr(runtime.tracing, "configure", lambda *args, **kwargs: None)

    async def serve(settings: NotifierSettings, stop: asyncio.Event) -> None:
        raise runtime.ComponentDied("notifier-feed", RuntimeError("gone"))

    with pytest.raises(SystemExit) as info:
        runtime.run_service("notifier", settings(free_port()), serve)
    assert info.value.code == runtime.EXIT_COMPONENT_DIED != 0
