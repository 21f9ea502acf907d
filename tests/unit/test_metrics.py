"""The metrics containers, their HTTP endpoint, and what the ingest and notifier edges count, in process."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import urllib.request
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from aimesh import events
from aimesh.devstack.ports import free_port_block, free_ports
from aimesh.errors import BrokerUnavailable, UndecodableRecord
from aimesh.grpc_edge import GrpcServer
from aimesh.ingest.idempotency import IdempotencyKeys
from aimesh.ingest.service import IngestServicer
from aimesh.ingest.validation import Limits
from aimesh.metrics import (
    CANCEL_OUTCOMES,
    ENDPOINT_OUTCOMES,
    PUBLISH_OUTCOMES,
    REFUSAL_ACTIONS,
    REFUSED_RECORDS,
    REJECT_REASONS,
    SECONDS_BUCKETS,
    STREAM_KINDS,
    TERMINAL_STATUS_LABELS,
    TRANSACTION_OUTCOMES,
    UPDATE_STATUS_LABELS,
    GatewayMetrics,
    IngestMetrics,
    MetricsServer,
    NotifierMetrics,
    WorkerMetrics,
    error_code_label,
    new_registry,
    status_label,
)
from aimesh.notifier.service import NotifierServicer
from aimesh.notifier.store import TaskStore
from aimesh.v1 import ingest_pb2, ingest_pb2_grpc, notifier_pb2, notifier_pb2_grpc, result_pb2, task_pb2
from aimesh.worker.ledger import Ledger, Outcome

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


def exposed(registry: CollectorRegistry) -> Samples:
    return samples(generate_latest(registry).decode())


def test_names_follow_the_prometheus_conventions() -> None:
    names = {
        family.name + ("_total" if family.type == "counter" else "")
        for metrics in (IngestMetrics(), WorkerMetrics(), NotifierMetrics())
        for family in metrics.registry.collect()
    }
    assert names == {
        "aimesh_ingest_tasks_accepted_total",
        "aimesh_ingest_tasks_rejected_total",
        "aimesh_ingest_publish_seconds",
        "aimesh_ingest_backlog_records",
        "aimesh_ingest_estimated_wait_seconds",
        "aimesh_ingest_admission_monitor_errors_total",
        "aimesh_worker_queue_wait_seconds",
        "aimesh_worker_inference_seconds",
        "aimesh_worker_inference_batch_items",
        "aimesh_worker_results_total",
        "aimesh_worker_retries_total",
        "aimesh_worker_undecodable_records_total",
        "aimesh_worker_dead_lettered_total",
        "aimesh_worker_transactions_total",
        "aimesh_worker_refused_records_total",
        "aimesh_worker_duplicate_tasks_total",
        "aimesh_worker_publish_blocked",
        "aimesh_worker_triton_ready",
        "aimesh_worker_triton_endpoint_requests_total",
        "aimesh_worker_triton_endpoint_up",
        "aimesh_worker_tasks_in_flight",
        "aimesh_worker_consumer_lag_records",
        "aimesh_notifier_active_subscriptions",
        "aimesh_notifier_cancel_requests_total",
        "aimesh_notifier_repeated_results_total",
        "aimesh_notifier_end_to_end_seconds",
        "aimesh_notifier_tasks_known",
        "aimesh_notifier_updates_delivered_total",
    }


def test_latency_buckets_span_a_millisecond_to_minutes() -> None:
    metrics = WorkerMetrics()
    metrics.inference_seconds.labels("sleep").observe(0.0004)
    metrics.inference_batch_items.labels("sleep").observe(1)
    found = exposed(metrics.registry)
    bounds = sorted(
        float(dict(labels)["le"])
        for name, labels in found
        if name == "aimesh_worker_inference_seconds_bucket" and dict(labels)["le"] != "+Inf"
    )
    assert bounds == [float(b) for b in SECONDS_BUCKETS] and bounds[0] == 0.001 and bounds[-1] == 300
    assert value(found, "aimesh_worker_inference_seconds_bucket", model="sleep", le="0.001") == 1
    assert value(found, "aimesh_worker_inference_batch_items_bucket", model="sleep", le="1.0") == 1


def test_known_label_values_are_exposed_before_their_first_event() -> None:
    found = exposed(IngestMetrics(models=frozenset({"sleep"})).registry)
    for reason in ("invalid_argument", "model_not_found", "deadline_passed", "broker_unavailable"):
        assert ("aimesh_ingest_tasks_rejected_total", frozenset({("reason", reason)})) in found
    assert ("aimesh_ingest_tasks_accepted_total", frozenset({("model", "sleep")})) in found


def test_label_values_are_lowercase_slugs() -> None:
    assert status_label(result_pb2.TASK_STATUS_SUCCEEDED) == "succeeded"
    assert status_label(result_pb2.TASK_STATUS_EXPIRED) == "expired"
    assert status_label(999) == "unknown"
    assert error_code_label(result_pb2.ERROR_CODE_DEADLINE_EXCEEDED) == "deadline_exceeded"
    with pytest.raises(UndecodableRecord) as info:
        events.decode_task(b"\xff\x00 not protobuf")
    assert info.value.reason == "not_protobuf" and info.value.reason in UndecodableRecord.REASONS
    with pytest.raises(UndecodableRecord) as info:
        events.decode_task(b"")
    assert info.value.reason == "empty_value"


DOCS = Path(__file__).resolve().parents[2] / "docs"
README = DOCS.parent / "README.md"
METRIC_ROW = re.compile(r"^\| `(aimesh_[a-z_]+)` \| (\w*) \|([^|]*)\| (.*) \|$", flags=re.MULTILINE)

# Labels that take a fixed set of values, and where metrics.py (or the error it counts) defines that set.
FIXED_LABEL_VALUES = {
    ("aimesh_ingest_tasks_rejected_total", "reason"): REJECT_REASONS,
    ("aimesh_ingest_publish_seconds", "outcome"): PUBLISH_OUTCOMES,
    ("aimesh_worker_results_total", "status"): TERMINAL_STATUS_LABELS,
    ("aimesh_worker_undecodable_records_total", "reason"): UndecodableRecord.REASONS,
    ("aimesh_worker_transactions_total", "outcome"): TRANSACTION_OUTCOMES,
    ("aimesh_worker_refused_records_total", "record"): REFUSED_RECORDS,
    ("aimesh_worker_refused_records_total", "action"): REFUSAL_ACTIONS,
    ("aimesh_worker_triton_endpoint_requests_total", "outcome"): ENDPOINT_OUTCOMES,
    ("aimesh_notifier_end_to_end_seconds", "status"): TERMINAL_STATUS_LABELS,
    ("aimesh_notifier_updates_delivered_total", "status"): UPDATE_STATUS_LABELS,
    ("aimesh_notifier_cancel_requests_total", "outcome"): CANCEL_OUTCOMES,
    ("aimesh_gateway_open_streams", "kind"): STREAM_KINDS,
}


def registered() -> dict[str, tuple[str, tuple[str, ...]]]:
    """Every metric the containers register: name (as exposed) -> (type, label names)."""
    found = {}
    for metrics in (IngestMetrics(), WorkerMetrics(), NotifierMetrics(), GatewayMetrics()):
        for metric in vars(metrics).values():
            if isinstance(metric, MetricWrapperBase):
                # prometheus_client keeps a metric's type and label names only on these attributes.
                kind, labels = metric._type, tuple(metric._labelnames)
                found[metric._name + ("_total" if kind == "counter" else "")] = (kind, labels)
    return found


def documented() -> dict[str, tuple[str, tuple[str, ...], str]]:
    """The rows of docs/operations.md's metrics table: name -> (type, label names, meaning)."""
    rows = METRIC_ROW.findall((DOCS / "operations.md").read_text())
    assert len(rows) == len({name for name, *_ in rows}), "a metric is listed twice"
    return {
        name: (kind, tuple(re.findall(r"`([a-z_]+)`", labels)), meaning.strip()) for name, kind, labels, meaning in rows
    }


def test_the_operations_table_lists_every_metric_with_its_type_and_labels() -> None:
    table = documented()
    assert {name: row[:2] for name, row in table.items()} == registered()


def test_the_operations_table_lists_the_fixed_values_of_each_label() -> None:
    table = documented()
    fixed: dict[str, set[str]] = {}  # a metric's fixed values, of all its labels together
    for (name, label), values in FIXED_LABEL_VALUES.items():
        assert label in table[name][1], name
        fixed.setdefault(name, set()).update(values)
    for name, values in fixed.items():
        kind, labels, meaning = table[name]
        quoted = set(re.findall(r"`([a-z][a-z_]*)`", meaning)) - set(labels)
        assert quoted == values, name


def test_the_metrics_table_is_the_only_one() -> None:
    for path in [README, *DOCS.glob("*.md")]:
        if path.name != "operations.md":
            assert not METRIC_ROW.search(path.read_text()), path


def test_fixed_label_values_are_exposed_before_their_first_event() -> None:
    registries = {"ingest": IngestMetrics().registry, "notifier": NotifierMetrics().registry}
    registries["gateway"] = GatewayMetrics().registry
    for name, label in (
        ("aimesh_ingest_tasks_rejected_total", "reason"),
        ("aimesh_ingest_publish_seconds", "outcome"),
        ("aimesh_notifier_updates_delivered_total", "status"),
        ("aimesh_notifier_cancel_requests_total", "outcome"),
        ("aimesh_gateway_open_streams", "kind"),
    ):
        found = exposed(registries[name.split("_")[1]])
        values = {dict(labels)[label] for sample, labels in found if sample.startswith(name)}
        assert values == set(FIXED_LABEL_VALUES[name, label]), name


def test_every_terminal_status_has_its_label_value() -> None:
    terminal = {status_label(s) for s in result_pb2.TaskStatus.values() if events.is_terminal(s)}
    assert terminal == {"succeeded", "failed", "expired", "cancelled"}
    assert set(TERMINAL_STATUS_LABELS) == terminal


async def test_publish_timer_tells_ok_from_error_and_ignores_cancellation() -> None:
    metrics = IngestMetrics()
    with metrics.time_publish():
        pass
    with pytest.raises(BrokerUnavailable), metrics.time_publish():
        raise BrokerUnavailable("delivery failed")
    with pytest.raises(asyncio.CancelledError), metrics.time_publish():
        raise asyncio.CancelledError
    found = exposed(metrics.registry)
    assert value(found, "aimesh_ingest_publish_seconds_count", outcome="ok") == 1
    assert value(found, "aimesh_ingest_publish_seconds_count", outcome="error") == 1


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return str(reply.read().decode())


async def test_server_serves_its_registry_and_stops_twice() -> None:
    (port,) = free_ports(1)
    metrics = WorkerMetrics(new_registry())
    metrics.tasks_in_flight.set(3)
    server = MetricsServer("127.0.0.1", port, metrics.registry)
    async with server:
        text = await asyncio.to_thread(scrape, port)
    await server.stop()
    found = samples(text)
    assert value(found, "aimesh_worker_tasks_in_flight") == 3
    assert any(name.startswith("process_") for name, _ in found)  # the standard collectors ride along
    with pytest.raises(OSError):
        await asyncio.to_thread(scrape, port)


async def test_a_taken_port_or_port_zero_leaves_the_service_running_without_metrics(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with caplog.at_level(logging.ERROR, logger="aimesh.metrics"):
            async with MetricsServer("127.0.0.1", port, CollectorRegistry()):
                pass
        assert "not started" in caplog.text
    async with MetricsServer("127.0.0.1", 0, CollectorRegistry()):
        pass


def test_free_port_block_gives_consecutive_ports_that_can_be_bound() -> None:
    avoid = free_ports(3)
    first = free_port_block(3, avoid=avoid)
    block = range(first, first + 3)
    assert not set(block) & set(avoid)
    sockets = [socket.socket() for _ in block]
    try:
        for s, port in zip(sockets, block, strict=True):
            s.bind(("127.0.0.1", port))
    finally:
        for s in sockets:
            s.close()


def test_ledger_reports_committed_offsets_of_owned_partitions() -> None:
    ledger = Ledger()
    ledger.assign([("tasks", 0), ("tasks", 1)])
    partition = ledger.fetched(("tasks", 0), 4)
    assert partition is not None
    ledger.finished(partition, 4, Outcome())
    ledger.committed(ledger.ready())
    assert ledger.committed_offsets() == {("tasks", 0): 5, ("tasks", 1): None}


def test_store_counts_known_tasks_as_they_come_and_expire() -> None:
    now = [0.0]
    store = TaskStore(retention_s=10, clock=lambda: now[0])
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    queue = store.watch(first)  # watched before it is known: not counted
    assert len(store) == 0
    store.apply_task(task_pb2.AITaskEvent(schema_version=1, task_id=first, model_name="sleep"))
    store.apply_result(
        result_pb2.AIResultEvent(schema_version=1, task_id=second, status=result_pb2.TASK_STATUS_SUCCEEDED)
    )
    store.apply_result(result_pb2.AIResultEvent(schema_version=1, task_id=first, status=result_pb2.TASK_STATUS_RUNNING))
    assert len(store) == 2
    now[0] = 11
    assert store.expire() == 1  # the watched task stays
    assert len(store) == 1
    store.unwatch(first, queue)
    assert store.expire() == 1 and len(store) == 0


# --- the edges count what they do --------------------------------------------------------------------------


class AckingProducer:
    def __init__(self) -> None:
        self.fail = False

    async def produce(self, topic: str, *, key: str, value: bytes, headers: object = None) -> None:
        await asyncio.sleep(0)
        if self.fail:
            raise BrokerUnavailable("delivery failed: Local: Message timed out")


@pytest.fixture
async def ingest() -> AsyncIterator[tuple[ingest_pb2_grpc.IngestServiceStub, AckingProducer, IngestMetrics]]:
    producer = AckingProducer()
    metrics = IngestMetrics(models=frozenset({"sleep"}))
    servicer = IngestServicer(
        producer,  # type: ignore[arg-type]
        tasks_topic="tasks",
        limits=Limits(models=frozenset({"sleep"}), max_text_bytes=64),
        max_batch_tasks=3,
        publish_timeout_s=1.0,
        idempotency=IdempotencyKeys(60),
        metrics=metrics,
    )
    server = GrpcServer("127.0.0.1:0", ["aimesh.v1.IngestService"])
    server.add(ingest_pb2_grpc.add_IngestServiceServicer_to_server, servicer)
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield ingest_pb2_grpc.IngestServiceStub(channel), producer, metrics
    await server.stop(0)


def submit(text: str = "hello", model: str = "sleep", **kw: object) -> ingest_pb2.SubmitTaskRequest:
    return ingest_pb2.SubmitTaskRequest(model_name=model, input=task_pb2.TaskInput(text=text), **kw)  # type: ignore[arg-type]


async def test_ingest_counts_accepted_and_rejected_tasks(ingest) -> None:
    stub, producer, metrics = ingest
    await stub.SubmitTask(submit())
    await stub.SubmitTasks(ingest_pb2.SubmitTasksRequest(tasks=[submit(), submit()]))
    await stub.SubmitTask(submit(idempotency_key="k"))
    await stub.SubmitTask(submit(idempotency_key="k"))  # a repeat publishes nothing
    past = Timestamp(seconds=1)
    rejected = [
        submit(text=""),
        submit(model="nope"),
        submit(deadline=past),
        ingest_pb2.SubmitTasksRequest(tasks=[submit(), submit(text="x" * 65)]),
    ]
    for request in rejected:
        call = stub.SubmitTasks if isinstance(request, ingest_pb2.SubmitTasksRequest) else stub.SubmitTask
        with pytest.raises(grpc.aio.AioRpcError):
            await call(request)  # type: ignore[operator]
    producer.fail = True
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.SubmitTask(submit())
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE

    found = exposed(metrics.registry)
    assert value(found, "aimesh_ingest_tasks_accepted_total", model="sleep") == 4
    assert value(found, "aimesh_ingest_tasks_rejected_total", reason="invalid_argument") == 3  # 1 + a batch of 2
    assert value(found, "aimesh_ingest_tasks_rejected_total", reason="model_not_found") == 1
    assert value(found, "aimesh_ingest_tasks_rejected_total", reason="deadline_passed") == 1
    assert value(found, "aimesh_ingest_tasks_rejected_total", reason="broker_unavailable") == 1
    assert value(found, "aimesh_ingest_publish_seconds_count", outcome="ok") == 4
    assert value(found, "aimesh_ingest_publish_seconds_count", outcome="error") == 1


async def test_notifier_counts_deliveries_streams_and_end_to_end_time() -> None:
    store = TaskStore(retention_s=60)
    ready = asyncio.Event()
    ready.set()
    metrics = NotifierMetrics()
    server = GrpcServer("127.0.0.1:0", ["aimesh.v1.NotifierService"])
    servicer = NotifierServicer(store, ready=ready, metrics=metrics)
    server.add(notifier_pb2_grpc.add_NotifierServiceServicer_to_server, servicer)
    await server.start()
    task_id = str(uuid.uuid4())
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = notifier_pb2_grpc.NotifierServiceStub(channel)
            task = task_pb2.AITaskEvent(schema_version=1, task_id=task_id, model_name="sleep")
            task.submitted_at.GetCurrentTime()
            store.apply_task(task)
            stream = stub.WatchTask(notifier_pb2.WatchTaskRequest(task_id=task_id))
            first = await stream.read()
            assert first.state.status == result_pb2.TASK_STATUS_QUEUED
            assert value(exposed(metrics.registry), "aimesh_notifier_active_subscriptions") == 1
            done = result_pb2.AIResultEvent(
                schema_version=1, task_id=task_id, status=result_pb2.TASK_STATUS_FAILED, model_name="sleep"
            )
            store.apply_result(done)
            assert (await stream.read()).state.status == result_pb2.TASK_STATUS_FAILED
            assert await stream.read() is grpc.aio.EOF
    finally:
        await server.stop(0)
    found = exposed(metrics.registry)
    assert value(found, "aimesh_notifier_active_subscriptions") == 0
    assert value(found, "aimesh_notifier_updates_delivered_total", status="queued") == 1
    assert value(found, "aimesh_notifier_updates_delivered_total", status="failed") == 1
    assert value(found, "aimesh_notifier_end_to_end_seconds_count", model="sleep", status="failed") == 1
