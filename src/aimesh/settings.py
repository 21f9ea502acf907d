"""Typed settings for every service, read once from the environment in ``main``.

Precedence: explicit constructor argument, then environment variable (``AIMESH_`` + field name,
upper case), then the default here. The README's configuration table lists every variable.
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

_CONFIG = SettingsConfigDict(env_prefix="AIMESH_", frozen=True, extra="ignore")


class KafkaSettings(BaseSettings):
    """Where the broker is and which topics carry tasks and results."""

    model_config = _CONFIG

    kafka_bootstrap: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers, comma separated.")
    tasks_topic: str = Field("aimesh.tasks", description="Topic that carries AITaskEvent records.")
    results_topic: str = Field("aimesh.results", description="Topic that carries AIResultEvent records.")
    dead_letter_topic: str = Field(
        "aimesh.tasks.dlq", description="Topic that receives task records the worker cannot process, with the reason."
    )
    log_level: str = Field("INFO", description="Python log level for the service.")
    log_format: str = Field(
        "auto", pattern="^(auto|json|text)$", description="json, text, or auto (text on a terminal, else JSON)."
    )
    metrics_host: str = Field(
        "127.0.0.1", description="Address the Prometheus metrics endpoint binds (0.0.0.0: every interface)."
    )


class IngestSettings(KafkaSettings):
    """Settings of the ingest gRPC service."""

    ingest_address: str = Field("127.0.0.1:50051", description="host:port the ingest gRPC server binds.")
    models: str = Field(
        "summarize,sentiment,embed,sleep",
        description="Comma-separated model names that ingest accepts; others get NOT_FOUND.",
    )
    max_text_bytes: int = Field(1_000_000, gt=0, description="Largest accepted input text, UTF-8 bytes.")
    max_batch_tasks: int = Field(1000, gt=0, description="Most tasks in one SubmitTasks call.")
    publish_timeout_s: float = Field(
        5.0, gt=0, description="How long SubmitTask waits for the broker before answering UNAVAILABLE."
    )
    idempotency_ttl_s: float = Field(
        3600.0, gt=0, description="How long an idempotency key maps to its first task id (in memory)."
    )
    shutdown_grace_s: float = Field(10.0, ge=0, description="Grace period for in-flight calls on SIGTERM.")
    metrics_port: int = Field(9101, ge=0, le=65535, description="Port of the /metrics endpoint; 0 disables it.")

    @property
    def model_names(self) -> frozenset[str]:
        return frozenset(m.strip() for m in self.models.split(",") if m.strip())


class WorkerSettings(KafkaSettings):
    """Settings of the inference worker."""

    triton_url: str = Field("127.0.0.1:8001", description="Triton gRPC endpoint host:port.")
    worker_group: str = Field("aimesh-workers", description="Kafka consumer group of the workers.")
    worker_id: str = Field("", description="Stable worker name; defaults to hostname-pid.")
    transactional_id: str = Field(
        "", description="Kafka transactional.id; stable and unique per worker instance. Default: aimesh-worker-<worker_id>."
    )
    max_in_flight: int = Field(256, gt=0, description="Most tasks one worker holds at once; beyond it, fetching pauses.")
    max_batch_size: int = Field(64, gt=0, description="Most tasks the worker sends to Triton in one request.")
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
    metrics_port: int = Field(9102, ge=0, le=65535, description="Port of the /metrics endpoint; 0 disables it.")


class NotifierSettings(KafkaSettings):
    """Settings of the notifier gRPC service."""

    notifier_address: str = Field("127.0.0.1:50052", description="host:port the notifier gRPC server binds.")
    notifier_group: str = Field(
        "", description="Consumer group id of the notifier; empty means a unique one per process."
    )
    retention_s: float = Field(
        3600.0, gt=0, description="How long a terminal result stays available to late subscribers."
    )
    shutdown_grace_s: float = Field(5.0, ge=0, description="Grace period for open streams on SIGTERM.")
    metrics_port: int = Field(9103, ge=0, le=65535, description="Port of the /metrics endpoint; 0 disables it.")
