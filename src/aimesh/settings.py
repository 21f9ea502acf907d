"""Typed settings for every service, read once from the environment in ``main``.

Precedence: explicit constructor argument, then environment variable (``AIMESH_`` + field name,
upper case), then the default here. The README's configuration table lists every variable.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from .shared_settings import (
    RESERVED_KAFKA_PROPERTIES,
    TENANT_PATTERN,
    KafkaSettings,
    ObjectStoreSettings,
    ServerSettings,
)

__all__ = [
    "RESERVED_KAFKA_PROPERTIES",
    "TENANT_PATTERN",
    "GatewaySettings",
    "IngestSettings",
    "KafkaSettings",
    "NotifierSettings",
    "ObjectStoreSettings",
    "ServerSettings",
    "WorkerSettings",
]


class IngestSettings(ServerSettings, ObjectStoreSettings):
    """Settings of the ingest gRPC service."""

    ingest_address: str = Field("127.0.0.1:50051", description="host:port the ingest gRPC server binds.")
    models: str = Field(
        "summarize,sentiment,embed,sleep,generate,digits,resize,identity",
        description="Comma-separated model names that ingest accepts; others get NOT_FOUND.",
    )
    max_text_bytes: int = Field(
        1_000_000,
        gt=0,
        description="Largest accepted input text, UTF-8 bytes; the task's whole record must also fit "
        "AIMESH_MAX_RECORD_BYTES, so this may not exceed it.",
    )
    max_deadline_s: float = Field(
        86_400.0, gt=0, description="Latest deadline a task may ask for, in seconds from its submission."
    )
    model_parameters_file: str = Field(
        "",
        description="JSON file declaring each model's request parameters and their limits, replacing the built-in "
        "declarations of the models it names; empty: the built-in declarations of the repository's models.",
    )
    model_metadata_url: str = Field(
        "",
        description="Triton gRPC address (host:port) ingest reads each accepted model's declared inputs from, at "
        "start and then every AIMESH_MODEL_METADATA_INTERVAL_S, to refuse tensors the model does not take; empty: "
        "tensor inputs are only checked against their own datatype and shape.",
    )
    model_metadata_interval_s: float = Field(
        60.0, gt=0, description="How often ingest reads the models' declared inputs again from Triton."
    )
    max_batch_tasks: int = Field(1000, gt=0, description="Most tasks in one SubmitTasks call.")
    publish_timeout_s: float = Field(
        5.0, gt=0, description="How long SubmitTask waits for the broker before answering UNAVAILABLE."
    )
    idempotency_ttl_s: float = Field(
        3600.0, gt=0, description="How long an idempotency key maps to its first task id (in memory)."
    )
    shutdown_grace_s: float = Field(10.0, ge=0, description="Grace period for in-flight calls on SIGTERM.")
    metrics_port: int = Field(9101, ge=0, le=65535, description="Port of the /metrics endpoint; 0 disables it.")
    worker_group: str = Field(
        "aimesh-workers", description="Kafka consumer group of the workers, whose backlog admission control measures."
    )
    admission_max_wait_s: float = Field(
        300.0,
        ge=0,
        description="Longest estimated wait of a priority class's backlog before new tasks of that class get "
        "RESOURCE_EXHAUSTED (BACKLOG_TOO_LONG); 0 turns admission control off.",
    )
    admission_interval_s: float = Field(
        1.0, gt=0, description="How often ingest measures the workers' backlog and drain rate."
    )
    admission_stalled_backlog: int = Field(
        10_000,
        ge=0,
        description="While no drain rate has been observed yet, a backlog above this many tasks counts as too long.",
    )
    tenant_rate_per_s: float = Field(
        0.0, ge=0, description="Tasks per second each tenant may submit (a token bucket); 0 means unlimited."
    )
    tenant_rate_burst: int = Field(
        0, ge=0, description="Tasks a tenant may submit at once above its rate; 0 means one second's worth."
    )
    tenant_rate_overrides: str = Field(
        "", description="Per-tenant rate quotas, `tenant=rate[:burst]` separated by commas, e.g. `a=50:200,b=5`."
    )
    tenant_max_concurrent: int = Field(
        0, ge=0, description="Tasks a tenant may have accepted and not yet finished; 0 means unlimited."
    )
    tenant_max_concurrent_overrides: str = Field(
        "", description="Per-tenant concurrency quotas, `tenant=count` separated by commas, e.g. `a=500,b=10`."
    )

    @model_validator(mode="after")
    def _largest_text_fits_a_message(self) -> IngestSettings:
        if self.max_message_bytes <= self.max_text_bytes:
            raise ValueError(
                "AIMESH_MAX_MESSAGE_BYTES must exceed AIMESH_MAX_TEXT_BYTES, or no text that large could arrive"
            )
        if self.max_text_bytes > self.max_record_bytes:
            raise ValueError(
                "AIMESH_MAX_TEXT_BYTES may not exceed AIMESH_MAX_RECORD_BYTES: no task with a text that large "
                "could be published"
            )
        return self

    @property
    def model_names(self) -> frozenset[str]:
        return frozenset(m.strip() for m in self.models.split(",") if m.strip())

    @property
    def rate_overrides(self) -> dict[str, tuple[float, int]]:
        """``AIMESH_TENANT_RATE_OVERRIDES`` as tenant -> (rate per second, burst; 0: one second's worth)."""
        overrides = {}
        for tenant, value in _tenant_entries(self.tenant_rate_overrides, "AIMESH_TENANT_RATE_OVERRIDES").items():
            rate, _, burst = value.partition(":")
            try:
                overrides[tenant] = (float(rate), int(burst or 0))
            except ValueError:
                raise ValueError(f"AIMESH_TENANT_RATE_OVERRIDES: {tenant}={value} is not rate[:burst]") from None
            if overrides[tenant][0] < 0 or overrides[tenant][1] < 0:
                raise ValueError(f"AIMESH_TENANT_RATE_OVERRIDES: {tenant}={value} is negative")
        return overrides

    @property
    def max_concurrent_overrides(self) -> dict[str, int]:
        """``AIMESH_TENANT_MAX_CONCURRENT_OVERRIDES`` as tenant -> most tasks in flight (0: unlimited)."""
        overrides = {}
        entries = _tenant_entries(self.tenant_max_concurrent_overrides, "AIMESH_TENANT_MAX_CONCURRENT_OVERRIDES")
        for tenant, value in entries.items():
            if not value.isdigit():
                raise ValueError(f"AIMESH_TENANT_MAX_CONCURRENT_OVERRIDES: {tenant}={value} is not a count")
            overrides[tenant] = int(value)
        return overrides

    @model_validator(mode="after")
    def _quota_overrides_parse(self) -> IngestSettings:
        self.rate_overrides  # noqa: B018 - raises ValueError on a malformed entry, at start
        self.max_concurrent_overrides  # noqa: B018
        return self


def _tenant_entries(text: str, variable: str) -> dict[str, str]:
    entries = {}
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        tenant, sep, value = (part.strip() for part in entry.partition("="))
        if not sep or not re.fullmatch(TENANT_PATTERN, tenant):
            raise ValueError(f"{variable}: {entry!r} is not tenant=value")
        entries[tenant] = value
    return entries


class WorkerSettings(KafkaSettings, ObjectStoreSettings):
    """Settings of the inference worker."""

    triton_url: str = Field(
        "127.0.0.1:8001",
        description="Triton gRPC endpoint host:port; several, comma-separated, to spread requests over them and route "
        "around a dead one; or one dns:///name:port target, gRPC round_robin over every address the name resolves to.",
    )
    worker_group: str = Field("aimesh-workers", description="Kafka consumer group of the workers.")
    worker_group_protocol: Literal["consumer", "classic"] = Field(
        "consumer",
        description="Rebalance protocol of the worker group: consumer (KIP-848, Kafka 4; the broker's range assignor "
        "spreads each tasks topic over the workers) or classic (cooperative-sticky, for older brokers; it may leave "
        "one worker every interactive partition).",
    )
    worker_id: str = Field("", description="Stable worker name; defaults to hostname-pid.")
    processing_guarantee: Literal["exactly_once", "at_least_once"] = Field(
        "exactly_once",
        description="exactly_once: each terminal result is published in the Kafka transaction that commits its "
        "task's offset. at_least_once: results are published by an idempotent producer and acknowledged before the "
        "offsets are committed, with no transaction (lower latency; a crash may publish a result twice on the "
        "results topic, and the notifier delivers only the first).",
    )
    commit_interval_s: float = Field(
        1.0,
        gt=0,
        description="Under at_least_once, how often the worker commits the offsets of the results it published (and "
        "at once when partitions are revoked): a crash runs again at most the tasks of the last interval.",
    )
    transactional_id: str = Field(
        "",
        description="Kafka transactional.id, stable and unique per worker instance; default aimesh-worker-<id>. "
        "Unused under at_least_once.",
    )
    max_in_flight: int = Field(
        256, gt=0, description="Most tasks one worker runs at once; fetched records beyond wait in a bounded backlog."
    )
    max_batch_size: int = Field(64, gt=0, description="Most tasks the worker sends to Triton in one request.")
    max_request_bytes: int = Field(
        4_194_304,
        gt=0,
        description="Most input text bytes in one Triton request; a task larger than this goes in a request alone.",
    )
    transaction_timeout_s: float = Field(
        60.0, gt=0, description="Kafka transaction.timeout.ms; a transaction only spans publishing, never inference."
    )
    triton_health_interval_s: float = Field(
        1.0, gt=0, description="How often the worker checks Triton's health; fetching pauses while it is unhealthy."
    )
    inference_timeout_s: float = Field(60.0, gt=0, description="Deadline of one Triton call.")
    retry_budget_s: float = Field(
        120.0, gt=0, description="How long transient Triton errors are retried before the task FAILS."
    )
    retry_initial_s: float = Field(0.1, gt=0, description="First retry wait; doubles up to retry_max_s.")
    retry_max_s: float = Field(5.0, gt=0, description="Longest wait between two retries.")
    shutdown_grace_s: float = Field(20.0, ge=0, description="Grace period for in-flight tasks on SIGTERM.")
    cancel_window_s: float = Field(
        3600.0,
        gt=0,
        description="How far back a starting worker reads the cancellations topic, and how long it remembers a "
        "cancelled task id.",
    )
    idempotency_window_s: float = Field(
        3600.0,
        gt=0,
        description="How long after a task record with a task id derived from an idempotency key a later record with "
        "the same id is dropped as a duplicate; at least ingest's AIMESH_IDEMPOTENCY_TTL_S.",
    )
    metrics_port: int = Field(9102, ge=0, le=65535, description="Port of the /metrics endpoint; 0 disables it.")


class NotifierSettings(ServerSettings, ObjectStoreSettings):
    """Settings of the notifier gRPC service."""

    notifier_address: str = Field("127.0.0.1:50052", description="host:port the notifier gRPC server binds.")
    notifier_group: str = Field(
        "",
        description="Consumer group id of the notifier; empty means a unique one per process. Partitioned replicas "
        "(AIMESH_NOTIFIER_PARTITIONED) share one.",
    )
    notifier_partitioned: bool = Field(
        False,
        description="Join AIMESH_NOTIFIER_GROUP with the other replicas and keep only the partitions the group "
        "assigns this one; calls for other tasks are forwarded to their owner. Off: read every partition.",
    )
    notifier_advertised_address: str = Field(
        "",
        description="host:port at which the other partitioned replicas reach this one; empty: AIMESH_NOTIFIER_ADDRESS.",
    )
    retention_s: float = Field(
        3600.0, gt=0, description="How long a terminal result stays available to late subscribers."
    )
    shutdown_grace_s: float = Field(5.0, ge=0, description="Grace period for open streams on SIGTERM.")
    max_subscriptions_per_connection: int = Field(
        1000,
        gt=0,
        description="Most watched tasks (a WatchTask stream, or one task of a WatchTasks stream) on one client "
        "connection; more get RESOURCE_EXHAUSTED.",
    )
    max_subscriptions_per_tenant: int = Field(
        10000, gt=0, description="Most watched tasks of one tenant; more get RESOURCE_EXHAUSTED."
    )
    stream_idle_timeout_s: float = Field(
        600.0, gt=0, description="A WatchTask or WatchTasks stream with no update for this long ends DEADLINE_EXCEEDED."
    )
    stream_send_timeout_s: float = Field(
        30.0,
        gt=0,
        description="A WatchTask or WatchTasks stream whose client does not take an update for this long (its "
        "HTTP/2 window stays full) ends DEADLINE_EXCEEDED and its buffer is freed.",
    )
    max_stream_buffer_bytes: int = Field(
        4 << 20,
        ge=1024,
        description="Most bytes of updates (serialized size) buffered for one WatchTask or WatchTasks stream; past "
        "it the stream sends what it holds and ends RESOURCE_EXHAUSTED (resume with after_sequence).",
    )
    max_stream_buffer_updates: int = Field(
        10_000, gt=0, description="Most updates buffered for one stream; past it, as for the bytes."
    )
    max_subscription_buffer_bytes: int = Field(
        512 << 20,
        ge=1024,
        description="Most bytes buffered for all streams together; a stream that would pass it ends as above, and "
        "new WatchTask/WatchTasks calls get RESOURCE_EXHAUSTED while less than one stream's buffer is free.",
    )
    max_updates_per_task: int = Field(
        10_000,
        ge=2,
        description="Most updates kept per task for resuming watchers (after_sequence); past it the oldest are "
        "forgotten.",
    )
    notifier_state_dir: str = Field(
        "",
        description="Directory of the notifier's on-disk task state (RocksDB) and the offsets it reflects, so a "
        "restart resumes where it stopped; one per replica. Empty: a temporary directory removed at exit (a "
        "restart then reads the retention window again).",
    )
    notifier_cache_tasks: int = Field(
        10_000,
        ge=0,
        description="Most tasks nobody watches that the notifier keeps in memory besides the on-disk state (the "
        "most recently changed); watched tasks are always in memory.",
    )
    notifier_state_cache_bytes: int = Field(
        32 << 20, ge=1 << 20, description="RocksDB block cache of the notifier's state (index and filters included)."
    )
    publish_timeout_s: float = Field(
        5.0, gt=0, description="How long CancelTask waits for the broker before answering UNAVAILABLE."
    )
    metrics_port: int = Field(9103, ge=0, le=65535, description="Port of the /metrics endpoint; 0 disables it.")

    @model_validator(mode="after")
    def _partitioned_replicas_share_a_group(self) -> NotifierSettings:
        if self.notifier_partitioned and not self.notifier_group:
            raise ValueError("AIMESH_NOTIFIER_PARTITIONED needs AIMESH_NOTIFIER_GROUP, shared by the replicas")
        host = self.advertised_address.rpartition(":")[0].strip("[]")
        if self.notifier_partitioned and host in ("", "0.0.0.0", "::"):
            raise ValueError(
                "a partitioned notifier bound to every interface needs AIMESH_NOTIFIER_ADVERTISED_ADDRESS, the "
                "host:port its peers reach it at"
            )
        return self

    @property
    def advertised_address(self) -> str:
        return self.notifier_advertised_address or self.notifier_address


class GatewaySettings(KafkaSettings):
    """Settings of the HTTP/JSON gateway: where it listens, and the ingest and notifier it calls over gRPC.
    (It reads no Kafka topic; the base class brings logging and the metrics host.)"""

    gateway_address: str = Field("127.0.0.1:8080", description="host:port the HTTP gateway binds.")
    ingest_address: str = Field("127.0.0.1:50051", description="host:port of the ingest gRPC server the gateway calls.")
    notifier_address: str = Field(
        "127.0.0.1:50052", description="host:port of the notifier gRPC server the gateway calls."
    )
    client_tls: bool = Field(False, description="Call ingest and the notifier over TLS (implied by a client file).")
    client_ca_file: str = Field("", description="PEM CA bundle that verifies ingest and the notifier (TLS).")
    client_cert_file: str = Field("", description="PEM client certificate for mutual TLS with ingest and the notifier.")
    client_key_file: str = Field("", description="PEM private key of the client certificate.")
    gateway_tls_cert_file: str = Field("", description="PEM certificate chain of the gateway; with the key, HTTPS.")
    gateway_tls_key_file: str = Field("", description="PEM private key of the gateway.")
    gateway_cors_origins: str = Field(
        "", description="Origins allowed to call the gateway from a browser (CORS), comma separated; `*` allows any."
    )
    gateway_max_body_bytes: int = Field(
        4 << 20, ge=1024, description="Largest request body the gateway reads; larger ones get 413."
    )
    gateway_heartbeat_s: float = Field(
        15.0, gt=0, description="Seconds between heartbeat comments on an idle Server-Sent Events stream."
    )
    gateway_call_timeout_s: float = Field(
        30.0, gt=0, description="Deadline of each unary gRPC call the gateway makes; past it the answer is 504."
    )
    gateway_max_ws_subscriptions: int = Field(
        100, gt=0, description="Most tasks one WebSocket connection may watch at once; more are refused (429)."
    )
    shutdown_grace_s: float = Field(5.0, ge=0, description="Grace period for open requests and streams on SIGTERM.")
    metrics_port: int = Field(9104, ge=0, le=65535, description="Port of the /metrics endpoint; 0 disables it.")

    @model_validator(mode="after")
    def _tls_files_come_together(self) -> GatewaySettings:
        if bool(self.gateway_tls_cert_file) != bool(self.gateway_tls_key_file):
            raise ValueError(
                "AIMESH_GATEWAY_TLS_CERT_FILE and AIMESH_GATEWAY_TLS_KEY_FILE are set together or not at all"
            )
        if bool(self.client_cert_file) != bool(self.client_key_file):
            raise ValueError("AIMESH_CLIENT_CERT_FILE and AIMESH_CLIENT_KEY_FILE are set together or not at all")
        return self

    @property
    def cors_origins(self) -> list[str]:
        return [o.strip() for o in self.gateway_cors_origins.split(",") if o.strip()]
