"""Each service's Prometheus endpoint, scraped over HTTP before and after a known run through the real mesh:
the counts must move by exactly what was done."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Callable

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client.parser import text_string_to_metric_families

from aimesh.devstack.stack import Stack
from aimesh.v1 import result_pb2

from .mesh_client import MeshClient, publish_garbage_then_expired_task

pytestmark = pytest.mark.integration

WORKERS = ("worker-0", "worker-1")
SERVICES = ("ingest", *WORKERS, "notifier")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class Scrape:
    """One scrape of every service: sample values by service, metric sample name and labels."""

    def __init__(self, by_service: dict[str, Samples]) -> None:
        self.by_service = by_service

    def value(self, service: str, name: str, **labels: str) -> float:
        return self.by_service[service].get((name, frozenset(labels.items())), 0.0)

    def workers(self, name: str, **labels: str) -> float:
        """Summed over the workers: which worker ran a task is the group's choice."""
        return sum(self.value(w, name, **labels) for w in WORKERS)

    def series(self, service: str, name: str) -> dict[frozenset[tuple[str, str]], float]:
        return {labels: v for (n, labels), v in self.by_service[service].items() if n == name}


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as reply:
        assert reply.status == 200
        return str(reply.read().decode())


async def scrape(mesh: Stack) -> Scrape:
    texts = await asyncio.gather(*(asyncio.to_thread(_get, mesh.metrics_url(s)) for s in SERVICES))
    return Scrape(
        {
            service: {
                (s.name, frozenset(s.labels.items())): s.value
                for family in text_string_to_metric_families(text)
                for s in family.samples
            }
            for service, text in zip(SERVICES, texts, strict=True)
        }
    )


async def scrape_until(mesh: Stack, condition: Callable[[Scrape], bool], timeout_s: float = 30) -> Scrape:
    deadline = time.monotonic() + timeout_s
    while True:
        found = await scrape(mesh)
        if condition(found) or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.2)


def at_rest(found: Scrape) -> bool:
    return (
        all(found.value(w, "aimesh_worker_tasks_in_flight") == 0 for w in WORKERS)
        and found.value("notifier", "aimesh_notifier_active_subscriptions") == 0
    )


async def test_each_service_counts_exactly_what_was_done(mesh: Stack, client: MeshClient) -> None:
    before = await scrape_until(mesh, at_rest)
    assert at_rest(before), "the mesh did not come to rest before the run"

    # Accepted: five tasks that succeed, one for a model ingest accepts and Triton does not serve.
    succeeded = [await client.submit("sleep", f"metrics {i}") for i in range(5)]
    ghost = await client.submit("ghost", "nobody serves this model")
    # Rejected by ingest, one for each reason a request can be wrong.
    past = Timestamp(seconds=int(time.time()) - 60)
    for model, text, extra, code in [
        ("sleep", "", {}, grpc.StatusCode.INVALID_ARGUMENT),
        ("no-such-model", "hello", {}, grpc.StatusCode.NOT_FOUND),
        ("sleep", "too late", {"deadline": past}, grpc.StatusCode.FAILED_PRECONDITION),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await client.submit(model, text, **extra)
        assert info.value.code() == code
    # Straight onto the tasks topic: a record that is not protobuf, and a task whose deadline has passed.
    expired = publish_garbage_then_expired_task(mesh.kafka_bootstrap, mesh.topics.tasks_topic)

    # One WatchTask stream per task, each ending with its one terminal update.
    results = await asyncio.gather(*(client.result(t) for t in [*succeeded, ghost, expired]))
    assert [r.status for r in results] == [result_pb2.TASK_STATUS_SUCCEEDED] * 5 + [
        result_pb2.TASK_STATUS_FAILED,
        result_pb2.TASK_STATUS_EXPIRED,
    ]
    after = await scrape_until(mesh, at_rest)
    assert at_rest(after), "tasks still in flight or streams still open after every result was delivered"

    def delta(service: str, name: str, **labels: str) -> float:
        return after.value(service, name, **labels) - before.value(service, name, **labels)

    def workers_delta(name: str, **labels: str) -> float:
        return after.workers(name, **labels) - before.workers(name, **labels)

    # ingest
    assert delta("ingest", "aimesh_ingest_tasks_accepted_total", model="sleep") == 5
    assert delta("ingest", "aimesh_ingest_tasks_accepted_total", model="ghost") == 1
    for reason, count in [
        ("invalid_argument", 1),
        ("model_not_found", 1),
        ("deadline_passed", 1),
        ("broker_unavailable", 0),
    ]:
        assert delta("ingest", "aimesh_ingest_tasks_rejected_total", reason=reason) == count, reason
    assert delta("ingest", "aimesh_ingest_publish_seconds_count", outcome="ok") == 6
    assert delta("ingest", "aimesh_ingest_publish_seconds_count", outcome="error") == 0

    # workers, summed
    assert workers_delta("aimesh_worker_results_total", model="sleep", status="succeeded") == 5
    assert workers_delta("aimesh_worker_results_total", model="ghost", status="failed") == 1
    assert workers_delta("aimesh_worker_results_total", model="sleep", status="expired") == 1
    assert workers_delta("aimesh_worker_undecodable_records_total", reason="not_protobuf") == 1
    for model, inferred in [("sleep", 5), ("ghost", 1)]:  # the expired task never reached Triton
        assert workers_delta("aimesh_worker_queue_wait_seconds_count", model=model) == inferred
        assert workers_delta("aimesh_worker_inference_seconds_count", model=model) == inferred
        retried = sum(
            after.workers("aimesh_worker_retries_total", model=model, code=code)
            - before.workers("aimesh_worker_retries_total", model=model, code=code)
            for code in ("unavailable", "deadline_exceeded")
        )
        # One item per attempt. Attempts that overlap may share a Triton request (the batcher joins tasks
        # that wait while a request is in flight), so the request count is at most the item count.
        attempts = inferred + retried
        assert workers_delta("aimesh_worker_inference_batch_items_sum", model=model) == attempts
        assert 1 <= workers_delta("aimesh_worker_inference_batch_items_count", model=model) <= attempts
    assert delta("notifier", "aimesh_notifier_tasks_known") == 7

    # notifier: one terminal update per stream, each observed once end to end
    for model, status, count in [("sleep", "succeeded", 5), ("ghost", "failed", 1), ("sleep", "expired", 1)]:
        assert delta("notifier", "aimesh_notifier_end_to_end_seconds_count", model=model, status=status) == count
    for status, count in [("succeeded", 5), ("failed", 1), ("expired", 1)]:
        assert delta("notifier", "aimesh_notifier_updates_delivered_total", status=status) == count
    # The expired task was submitted a minute before it reached its subscriber.
    assert delta("notifier", "aimesh_notifier_end_to_end_seconds_sum", model="sleep", status="expired") >= 59


async def test_workers_report_the_lag_of_exactly_the_partitions_they_own(mesh: Stack) -> None:
    partitions = {str(p) for p in range(mesh.settings.tasks_partitions)}
    topic = mesh.topics.tasks_topic

    def owned(found: Scrape) -> list[tuple[str, float]]:
        return [
            (dict(labels)["partition"], v)
            for w in WORKERS
            for labels, v in found.series(w, "aimesh_worker_consumer_lag_records").items()
            if dict(labels)["topic"] == topic
        ]

    def settled(found: Scrape) -> bool:
        reported = owned(found)
        return sorted(p for p, _ in reported) == sorted(partitions) and all(v == 0 for _, v in reported)

    # Refreshed every few seconds on each worker's consumer thread; at rest everything is committed.
    found = await scrape_until(mesh, lambda f: at_rest(f) and settled(f), timeout_s=30)
    reported = owned(found)
    assert sorted(p for p, _ in reported) == sorted(partitions), "each partition reported by exactly one worker"
    assert all(v == 0 for _, v in reported), reported
    assert all(found.series(w, "aimesh_worker_consumer_lag_records") for w in WORKERS), "both workers own partitions"
