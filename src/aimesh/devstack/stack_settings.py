"""The local stack's ports and sizes (``StackSettings``, from ``AIMESH_STACK_*``), and the pick of free ports that
lets a stack run beside others."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .ports import free_port_block, free_ports

ROOT = Path(__file__).resolve().parents[3]


class StackSettings(BaseSettings):
    """Ports and sizes of the local stack (environment: ``AIMESH_STACK_`` + field name)."""

    model_config = SettingsConfigDict(env_prefix="AIMESH_STACK_", frozen=True, extra="ignore")

    run_dir: Path = Field(ROOT / ".run", description="Logs, Kafka data and the state file.")
    cache_dir: Path = Field(ROOT / ".cache", description="Kafka jars, and the weed binary in bin/ (`make tools`).")
    model_repository: Path = Field(ROOT / "models", description="Triton model repository.")
    kafka_port: int = Field(9092, description="Kafka client listener (of node 0; node i uses this port + 2i).")
    kafka_controller_port: int = Field(
        9093, description="Kafka KRaft controller listener (of node 0; node i uses this port + 2i)."
    )
    brokers: int = Field(1, description="Kafka nodes: 1, or 3 (a KRaft cluster, every topic on 3 replicas, 2 in sync).")
    triton_grpc_port: int = Field(8001, description="Triton gRPC.")
    triton_http_port: int = Field(8000, description="Triton HTTP.")
    triton_metrics_port: int = Field(8002, description="Triton Prometheus metrics.")
    triton_servers: int = Field(
        1,
        ge=1,
        description="Triton servers: the first on the Triton ports above, the others on free ports; the workers get "
        "them all as a list.",
    )
    ingest_port: int = Field(50051, description="Ingest gRPC (of the first replica).")
    notifier_port: int = Field(50052, description="Notifier gRPC (of the first replica).")
    ingest_replicas: int = Field(
        1,
        ge=1,
        description="Ingest processes: `ingest` on the ingest ports, `ingest-<i>` on free ports of its own (gRPC and "
        "metrics).",
    )
    notifier_replicas: int = Field(
        1,
        ge=1,
        description="Notifier processes, named and given ports as for ingest; several split the results and tasks "
        "partitions between them (AIMESH_NOTIFIER_PARTITIONED) and forward calls to a task's owner.",
    )
    gateway_port: int = Field(
        8080, ge=0, le=65535, description="Gateway HTTP: the web page and the HTTP API; 0: no gateway."
    )
    ingest_metrics_port: int = Field(
        9101, ge=0, le=65535, description="Ingest Prometheus metrics (of the first replica); 0: none, of any."
    )
    notifier_metrics_port: int = Field(
        9103, ge=0, le=65535, description="Notifier Prometheus metrics (of the first replica); 0: none, of any."
    )
    object_store_port: int = Field(
        8333,
        ge=0,
        le=65535,
        description="S3 API of the object store (SeaweedFS; its other servers on free ports); 0: none.",
    )
    gateway_metrics_port: int = Field(9104, ge=0, le=65535, description="Gateway Prometheus metrics; 0: none.")
    worker_metrics_port: int = Field(
        9110, ge=0, le=65535, description="Prometheus metrics of worker 0; worker i uses this port + i; 0: none."
    )
    workers: int = Field(2, ge=1, description="Worker processes.")
    tasks_partitions: int = Field(6, ge=1, description="Partitions of the tasks topic.")
    results_partitions: int = Field(6, ge=1, description="Partitions of the results topic.")
    ready_timeout_s: float = Field(180.0, description="How long to wait for each part to be healthy.")

    def kafka_ports(self) -> list[tuple[int, int]]:
        """Each Kafka node's (client, controller) port."""
        return [(self.kafka_port + 2 * i, self.kafka_controller_port + 2 * i) for i in range(self.brokers)]

    @model_validator(mode="after")
    def _ports_do_not_collide(self) -> StackSettings:
        if self.brokers not in (1, 3):
            raise ValueError(f"brokers must be 1 or 3, not {self.brokers}")
        first_worker = self.worker_metrics_port
        worker_metrics = list(range(first_worker, first_worker + self.workers)) if first_worker else []
        if worker_metrics and worker_metrics[-1] > 65535:
            raise ValueError(f"worker metrics ports {first_worker}+ run past 65535 for {self.workers} workers")
        ports = [
            *(port for node in self.kafka_ports() for port in node),
            self.triton_grpc_port,
            self.triton_http_port,
            self.triton_metrics_port,
            self.ingest_port,
            self.notifier_port,
            self.gateway_port,
            self.ingest_metrics_port,
            self.notifier_metrics_port,
            self.gateway_metrics_port,
            self.object_store_port,
            *worker_metrics,
        ]
        clashes = sorted({p for p in ports if p and ports.count(p) > 1})
        if clashes:
            raise ValueError(f"stack ports used twice: {clashes}")
        return self

    @classmethod
    def on_free_ports(cls, run_dir: Path, **overrides: object) -> StackSettings:
        """Settings for a stack in ``run_dir`` whose every port was free a moment ago, so it runs beside others
        (tests, parallel runs). ``overrides`` sets any other field (``workers``, ``tasks_partitions``, ...)."""
        workers = overrides.get("workers", cls.model_fields["workers"].default)
        brokers = overrides.get("brokers", cls.model_fields["brokers"].default)
        if not isinstance(workers, int) or not isinstance(brokers, int):
            raise TypeError(f"workers and brokers must be ints, not {workers!r} and {brokers!r}")
        ports = free_ports(12)
        names = (
            "kafka_port",
            "kafka_controller_port",
            "triton_grpc_port",
            "triton_http_port",
            "triton_metrics_port",
            "ingest_port",
            "notifier_port",
            "gateway_port",
            "ingest_metrics_port",
            "notifier_metrics_port",
            "gateway_metrics_port",
            "object_store_port",
        )
        fields: dict[str, object] = dict(zip(names, ports, strict=True))
        first_worker = free_port_block(workers, avoid=ports)
        fields["worker_metrics_port"] = first_worker  # worker i serves on this port + i
        if brokers > 1:  # Kafka node i listens on kafka_port + 2i and kafka_controller_port + 2i
            first_node = free_port_block(2 * brokers, avoid=[*ports, *range(first_worker, first_worker + workers)])
            fields.update(kafka_port=first_node, kafka_controller_port=first_node + 1)
        fields.update(run_dir=run_dir, **overrides)
        return cls.model_validate(fields)
