"""Ingest's background readers: one that died turns the service NOT_SERVING and ends ``serve`` with
ComponentDied (``run_service`` exits non-zero on it); one that keeps retrying its broker is alive."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest

import aimesh.ingest.__main__ as ingest_main
from aimesh.grpc_edge import GrpcServer
from aimesh.ingest import quotas
from aimesh.ingest.admission import Admission, AdmissionMonitor, BacklogSample, LagUnavailable
from aimesh.runtime import ComponentDied
from aimesh.settings import IngestSettings


class BrokenSource:
    """A lag source with a bug: every measurement raises something no retry helps."""

    def __init__(self, *args: object) -> None:
        pass

    def measure(self, topics: Sequence[str]) -> dict[str, BacklogSample]:
        raise RuntimeError("a bug in the measurement")

    def close(self) -> None:
        pass


def broken_consumer(config: object, **kwargs: object) -> None:
    raise RuntimeError("cannot create the results consumer")


@pytest.fixture
def health_changes(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    changes: list[bool] = []
    set_serving = GrpcServer.set_serving

    async def recording(self: GrpcServer, serving: bool) -> None:
        changes.append(serving)
        await set_serving(self, serving)

    monkeypatch.setattr(GrpcServer, "set_serving", recording)
    return changes


def settings(**overrides: object) -> IngestSettings:
    return IngestSettings(
        kafka_bootstrap="127.0.0.1:1",  # nothing listens: the producer and readers only ever retry
        ingest_address="127.0.0.1:0",
        metrics_port=0,
        auth="off",
        shutdown_grace_s=0,
        **overrides,  # type: ignore[arg-type]
    )


async def test_a_dead_admission_monitor_turns_ingest_not_serving_and_ends_it(monkeypatch, health_changes) -> None:
    monkeypatch.setattr(ingest_main, "KafkaLagSource", BrokenSource)
    with pytest.raises(ComponentDied, match="admission-monitor"):
        await asyncio.wait_for(ingest_main.serve(settings(), asyncio.Event()), 30)
    assert health_changes == [True, False]


async def test_a_dead_results_reader_turns_ingest_not_serving_and_ends_it(monkeypatch, health_changes) -> None:
    monkeypatch.setattr(quotas.kafka, "consumer", broken_consumer)
    with pytest.raises(ComponentDied, match="results-reader"):
        await asyncio.wait_for(
            ingest_main.serve(settings(admission_max_wait_s=0, tenant_max_concurrent=5), asyncio.Event()), 30
        )
    assert health_changes == [True, False]


async def test_a_monitor_retrying_an_unreachable_broker_is_not_dead() -> None:
    retried = threading.Event()
    attempts = 0

    class Unreachable(BrokenSource):
        def measure(self, topics: Sequence[str]) -> dict[str, BacklogSample]:
            nonlocal attempts
            attempts += 1
            if attempts >= 3:
                retried.set()
            raise LagUnavailable("broker unreachable")

    deaths: list[str] = []
    monitor = AdmissionMonitor(
        Unreachable(), Admission(10, stale_after_s=3), ["tasks"], interval_s=0.01, stalled_backlog=10
    )
    monitor.on_death = lambda name, error: deaths.append(name)
    async with monitor:
        assert await asyncio.to_thread(retried.wait, 10)
    assert deaths == [] and monitor.failed is None


async def test_serve_stops_cleanly_on_its_stop_event(health_changes) -> None:
    stop = asyncio.Event()
    stop.set()  # a signal that came while ingest was starting: it starts, then stops without an error
    await asyncio.wait_for(ingest_main.serve(settings(tenant_max_concurrent=5), stop), 30)
    assert health_changes == [True]
