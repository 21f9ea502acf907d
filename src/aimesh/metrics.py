"""Prometheus metrics of the services, and the HTTP endpoint that serves them.

Each service builds its container (``IngestMetrics``, ``WorkerMetrics``, ``NotifierMetrics``) once at start
and passes it down; every container registers on its own ``CollectorRegistry``, never the global one, so
in-process tests can build as many as they like. Names follow the Prometheus conventions: the base unit in
the name (``_seconds``, ``_records``, ``_items``) and ``_total`` on counters (prometheus_client stores a
counter's name without the suffix and adds it back on exposition, so a counter is written here with it).
Label values are short lowercase slugs. docs/operations.md, "Metrics", lists every metric, its labels and the
fixed values a label takes (tests/unit/test_metrics.py checks the table against these containers).

Updating a metric only touches memory; the scrape runs on the server's own thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)

from aimesh import events
from aimesh.v1 import result_pb2

log = logging.getLogger(__name__)

# From a millisecond (a Kafka acknowledgement on loopback) to minutes (a queue that backed up, a slow model).
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_ITEMS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

# Why ingest turned tasks away: one per gRPC status a client can get for its request.
REJECT_INVALID_ARGUMENT = "invalid_argument"
REJECT_MODEL_NOT_FOUND = "model_not_found"
REJECT_DEADLINE_PASSED = "deadline_passed"
REJECT_BROKER_UNAVAILABLE = "broker_unavailable"
REJECT_BACKLOG_TOO_LONG = "backlog_too_long"
REJECT_TENANT_RATE_LIMITED = "tenant_rate_limited"
REJECT_TENANT_CONCURRENCY_LIMITED = "tenant_concurrency_limited"
REJECT_OBJECT_STORE_UNAVAILABLE = "object_store_unavailable"
REJECT_REASONS = (
    REJECT_INVALID_ARGUMENT,
    REJECT_MODEL_NOT_FOUND,
    REJECT_DEADLINE_PASSED,
    REJECT_BROKER_UNAVAILABLE,
    REJECT_BACKLOG_TOO_LONG,
    REJECT_TENANT_RATE_LIMITED,
    REJECT_TENANT_CONCURRENCY_LIMITED,
    REJECT_OBJECT_STORE_UNAVAILABLE,
)

PUBLISH_OUTCOMES = ("ok", "error")

# What the notifier's CancelTask answered.
CANCEL_REQUESTED = "requested"
CANCEL_ALREADY_ENDED = "already_ended"
CANCEL_NOT_FOUND = "not_found"
CANCEL_UNAVAILABLE = "unavailable"
CANCEL_OUTCOMES = (CANCEL_REQUESTED, CANCEL_ALREADY_ENDED, CANCEL_NOT_FOUND, CANCEL_UNAVAILABLE)

# What the gateway's open streams are: an events stream, a WebSocket connection, a task a WebSocket watches.
STREAM_KINDS = ("sse", "websocket", "watch")

# A worker's transactions by outcome, its refused records by record and action, its Triton endpoints' requests.
TRANSACTION_OUTCOMES = TRANSACTION_COMMITTED, TRANSACTION_ABORTED, TRANSACTION_FATAL = ("committed", "aborted", "fatal")
REFUSED_RECORDS = REFUSED_RESULT, REFUSED_DEAD_LETTER = ("result", "dead_letter")
REFUSAL_PREFLIGHT, REFUSAL_REPLACED, REFUSAL_DROPPED, REFUSAL_BLOCKED = "preflight", "replaced", "dropped", "blocked"
REFUSAL_ACTIONS = (REFUSAL_PREFLIGHT, REFUSAL_REPLACED, REFUSAL_DROPPED, REFUSAL_BLOCKED)
ENDPOINT_OUTCOMES = ENDPOINT_OK, ENDPOINT_UNREACHABLE, ENDPOINT_ERROR = ("ok", "unreachable", "error")


def new_registry() -> CollectorRegistry:
    """A registry of one service's own: its metrics plus the standard process, platform and GC collectors."""
    registry = CollectorRegistry(auto_describe=True)
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)
    return registry


def status_label(status: int) -> str:
    """A TaskStatus as a label value: ``TASK_STATUS_SUCCEEDED`` -> ``succeeded``."""
    try:
        name = result_pb2.TaskStatus.Name(status)  # type: ignore[arg-type]
    except ValueError:
        return "unknown"
    return name.removeprefix("TASK_STATUS_").lower()


# The status labels of terminal results, from the one list of terminal statuses (a cancelled task's result too).
TERMINAL_STATUS_LABELS = tuple(status_label(s) for s in sorted(events.TERMINAL_STATUSES))
UPDATE_STATUS_LABELS = ("queued", "running", *TERMINAL_STATUS_LABELS)


def error_code_label(code: int) -> str:
    """An ErrorCode as a label value: ``ERROR_CODE_UNAVAILABLE`` -> ``unavailable``."""
    try:
        name = result_pb2.ErrorCode.Name(code)  # type: ignore[arg-type]
    except ValueError:
        return "unknown"
    return name.removeprefix("ERROR_CODE_").lower()


class _Metrics:
    """A service's container of metrics, all registered on its own registry (a fresh one unless given)."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self._counter = partial(Counter, registry=self.registry)
        self._gauge = partial(Gauge, registry=self.registry)
        self._histogram = partial(Histogram, registry=self.registry, buckets=SECONDS_BUCKETS)


class IngestMetrics(_Metrics):
    """What ingest counts: tasks accepted and turned away, and how long Kafka takes to acknowledge one."""

    def __init__(self, registry: CollectorRegistry | None = None, *, models: frozenset[str] = frozenset()) -> None:
        super().__init__(registry)
        self.tasks_accepted = self._counter(
            "aimesh_ingest_tasks_accepted_total",
            "Tasks published and acknowledged by Kafka (a repeated idempotency key publishes nothing and is not "
            "counted).",
            ["model"],
        )
        self.tasks_rejected = self._counter(
            "aimesh_ingest_tasks_rejected_total",
            "Tasks turned away, by reason: invalid_argument, model_not_found, deadline_passed, backlog_too_long, "
            "tenant_rate_limited, tenant_concurrency_limited (every task of the rejected request counts), "
            "broker_unavailable (tasks Kafka did not acknowledge in time).",
            ["reason"],
        )
        self.publish_seconds = self._histogram(
            "aimesh_ingest_publish_seconds",
            "Time from producing a task record to its delivery report; outcome ok or error.",
            ["outcome"],
        )
        self.backlog_records = self._gauge(
            "aimesh_ingest_backlog_records",
            "Tasks of a tasks topic (one per priority class) the worker group has not committed, as admission "
            "control last measured them.",
            ["topic"],
        )
        self.estimated_wait_seconds = self._gauge(
            "aimesh_ingest_estimated_wait_seconds",
            "Admission control's estimate of how long a task published to a tasks topic now would wait: backlog "
            "over drain rate (+Inf while no worker has been seen draining a large backlog).",
            ["topic"],
        )
        self.admission_monitor_errors = self._counter(
            "aimesh_ingest_admission_monitor_errors_total",
            "Backlog measurements that failed (broker unreachable); admission control admits every task while its "
            "estimates are stale.",
        )
        # Series that exist before their first event, so rate() sees them start from zero.
        for model in models:
            self.tasks_accepted.labels(model)
        for reason in REJECT_REASONS:
            self.tasks_rejected.labels(reason)
        for outcome in PUBLISH_OUTCOMES:
            self.publish_seconds.labels(outcome)

    @contextmanager
    def time_publish(self) -> Iterator[None]:
        """Observe ``publish_seconds`` around one publication: ``ok`` when the block returns, ``error`` when it
        raises. A cancelled publication (the client went away) is not observed."""
        started = time.perf_counter()
        try:
            yield
        except Exception:
            self.publish_seconds.labels("error").observe(time.perf_counter() - started)
            raise
        self.publish_seconds.labels("ok").observe(time.perf_counter() - started)


class WorkerMetrics(_Metrics):
    """What a worker measures: queueing, inference, results, retries, skipped records, load and lag."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__(registry)
        self._task_metrics()
        self._record_metrics()
        self._triton_and_load_metrics()

    def _task_metrics(self) -> None:
        """Queueing, inference and results, per model."""
        self.queue_wait_seconds = self._histogram(
            "aimesh_worker_queue_wait_seconds",
            "Time from a task's submission (its submitted_at) to the start of its inference.",
            ["model"],
        )
        self.inference_seconds = self._histogram(
            "aimesh_worker_inference_seconds",
            "Time of a task's Triton inference, retries included, whatever its outcome.",
            ["model"],
        )
        self.inference_batch_items = self._histogram(
            "aimesh_worker_inference_batch_items",
            "Items in each request the worker sent to Triton (Triton's dynamic batcher batches further).",
            ["model"],
            buckets=BATCH_ITEMS_BUCKETS,
        )
        self.results = self._counter(
            "aimesh_worker_results_total",
            "Terminal results published and acknowledged by Kafka, by status: succeeded, failed, expired, cancelled.",
            ["model", "status"],
        )
        self.retries = self._counter(
            "aimesh_worker_retries_total",
            "Triton calls retried after a transient error, by the error's code (unavailable, deadline_exceeded).",
            ["model", "code"],
        )

    def _record_metrics(self) -> None:
        """Records skipped, dead-lettered, refused or not run, and the transactions that publish the rest."""
        self.undecodable_records = self._counter(
            "aimesh_worker_undecodable_records_total",
            "Tasks-topic records skipped because they could not be decoded, by reason.",
            ["reason"],
        )
        self.dead_lettered = self._counter(
            "aimesh_worker_dead_lettered_total",
            "Task records published (committed) to the dead-letter topic, by reason: not_protobuf, model_not_found...",
            ["reason"],
        )
        self.transactions = self._counter(
            "aimesh_worker_transactions_total",
            "Kafka transactions that published results and committed offsets, by outcome: committed, aborted, fatal.",
            ["outcome"],
        )
        self.refused_records = self._counter(
            "aimesh_worker_refused_records_total",
            "Result and dead-letter records that would not fit AIMESH_MAX_RECORD_BYTES or that Kafka refused for good, "
            "by record (result, dead_letter) and action: preflight (replaced or cut before publishing), replaced "
            "(by a smaller one), dropped (a dead-letter record refused even when minimal), blocked (its topic takes "
            "no record: publishing waits).",
            ["record", "action"],
        )
        self.duplicate_tasks = self._counter(
            "aimesh_worker_duplicate_tasks_total",
            "Task records not run because an earlier record of their partition carries the same task id (one derived "
            "from an idempotency key: a retry another ingest replica published), counted once their offsets commit.",
            ["topic"],
        )
        self.publish_blocked = self._gauge(
            "aimesh_worker_publish_blocked",
            "1 while a topic the worker publishes to refuses every record (missing, not authorized): nothing is "
            "published or fetched meanwhile; 0 otherwise.",
        )

    def _triton_and_load_metrics(self) -> None:
        """Triton's readiness (per endpoint of a list), the tasks in flight and the consumer lag."""
        self.triton_ready = self._gauge(
            "aimesh_worker_triton_ready",
            "1 while the worker's Triton server is ready (with several: any of them), 0 while it is not (the worker "
            "then fetches nothing).",
        )
        self.triton_ready.set(1)
        self.triton_endpoint_requests = self._counter(
            "aimesh_worker_triton_endpoint_requests_total",
            "Requests (micro-batches and streams) sent to each Triton endpoint of a list in AIMESH_TRITON_URL, by "
            "outcome: ok, unreachable (sent again to another endpoint that is up, if any), error.",
            ["endpoint", "outcome"],
        )
        self.triton_endpoint_up = self._gauge(
            "aimesh_worker_triton_endpoint_up",
            "1 while the worker sends requests to this Triton endpoint of a list in AIMESH_TRITON_URL, 0 while it is "
            "down (a call found it unreachable or its readiness probe failed) and routed around.",
            ["endpoint"],
        )
        self.tasks_in_flight = self._gauge(
            "aimesh_worker_tasks_in_flight",
            "Tasks this worker has fetched and not yet published (running, or finished and awaiting publication).",
        )
        self.consumer_lag_records = self._gauge(
            "aimesh_worker_consumer_lag_records",
            "Records of an owned partition not yet done: its high watermark minus the group's committed offset.",
            ["topic", "partition"],
        )

    def observe_retry(self, model: str, code: int) -> None:
        self.retries.labels(model, error_code_label(code)).inc()


class NotifierMetrics(_Metrics):
    """What the notifier measures: open streams, what they delivered, and the whole trip of each task."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__(registry)
        self.active_subscriptions = self._gauge(
            "aimesh_notifier_active_subscriptions",
            "Tasks watched on open WatchTask and WatchTasks streams (a WatchTasks stream counts each task).",
        )
        self.end_to_end_seconds = self._histogram(
            "aimesh_notifier_end_to_end_seconds",
            "Time from a task's submission to the moment its terminal update is handed to a subscriber's stream; "
            "observed once per delivered terminal update (a late subscriber observes a long time).",
            ["model", "status"],
        )
        self.tasks_known = self._gauge(
            "aimesh_notifier_tasks_known",
            "Tasks whose state the notifier holds (within the retention window).",
        )
        self.updates_delivered = self._counter(
            "aimesh_notifier_updates_delivered_total",
            "Task state updates handed to WatchTask streams, by the status they carry.",
            ["status"],
        )
        for status in UPDATE_STATUS_LABELS:
            self.updates_delivered.labels(status)
        self.cancel_requests = self._counter(
            "aimesh_notifier_cancel_requests_total",
            "CancelTask calls answered, by outcome: requested (published), already_ended, not_found, unavailable "
            "(the broker did not acknowledge).",
            ["outcome"],
        )
        for outcome in CANCEL_OUTCOMES:
            self.cancel_requests.labels(outcome)
        self.repeated_results = self._counter(
            "aimesh_notifier_repeated_results_total",
            "Terminal results read for a task that had one already, and dropped: the task ran again after a worker "
            "died between publishing its result and committing its offset (AIMESH_PROCESSING_GUARANTEE=at_least_once).",
        )


class GatewayMetrics(_Metrics):
    """What the HTTP gateway measures: requests by route and status, their duration, and open streams."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__(registry)
        self.requests = self._counter(
            "aimesh_gateway_requests_total",
            "HTTP requests answered, by route template (`/v1/tasks/{task_id}`, never a task id), method and status.",
            ["route", "method", "status"],
        )
        self.request_seconds = self._histogram(
            "aimesh_gateway_request_seconds",
            "From a request's arrival to the end of its answer (a stream: until it closes), by route and method.",
            ["route", "method"],
        )
        self.open_streams = self._gauge(
            "aimesh_gateway_open_streams",
            "Open streams by kind: `sse` (an events stream), `websocket` (a connection), `watch` (a task a "
            "WebSocket watches).",
            ["kind"],
        )
        for kind in STREAM_KINDS:
            self.open_streams.labels(kind)


class MetricsServer:
    """Serves a registry at ``http://host:port/metrics`` from a thread of its own; port 0 serves nothing.

    A ``lifecycle.Part`` (or ``async with MetricsServer(host, port, registry)``). A port that cannot be bound is
    logged and the service runs on without metrics: telemetry never stops the data path. ``stop`` is idempotent.
    """

    name = "metrics-endpoint"

    def __init__(self, host: str, port: int, registry: CollectorRegistry) -> None:
        self.host = host
        self.port = port
        self._registry = registry
        self._server: WSGIServer | None = None

    async def __aenter__(self) -> MetricsServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        if self._server is not None or self.port == 0:
            return
        try:
            self._server, _ = start_http_server(self.port, addr=self.host, registry=self._registry)
        except OSError as e:
            log.error("metrics endpoint %s:%d not started, running without it: %s", self.host, self.port, e)
            return
        log.info("metrics on http://%s:%d/metrics", self.host, self.port)

    async def stop(self) -> None:
        if self._server is None:
            return
        server, self._server = self._server, None
        # shutdown() waits for serve_forever's next poll (up to half a second): keep it off the event loop.
        await asyncio.to_thread(server.shutdown)
        server.server_close()
