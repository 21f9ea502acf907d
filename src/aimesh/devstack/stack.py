"""The whole mesh on loopback: Kafka, Triton, topics, then ingest, workers, notifier and the HTTP gateway.

Used by ``aimesh-stack up/down/demo`` (``make up``, ``make down``, ``make demo``) and by the integration
tests, which start one stack per test session on free ports.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
from confluent_kafka.admin import AdminClient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from aimesh.client.targets import grpc_target
from aimesh.settings import KafkaSettings

from .kafka import KafkaCluster, create_topics, ensure_kafka_jars, replication_for
from .ports import free_port_block, free_ports
from .process import ManagedProcess, stop_pid
from .triton import TritonServer

log = logging.getLogger(__name__)

_Part = TypeVar("_Part", KafkaCluster, TritonServer)

# The services that run as replicas, each a gRPC server: the module it runs and the variable of its bind address.
REPLICATED = {
    "ingest": ("aimesh.ingest", "AIMESH_INGEST_ADDRESS"),
    "notifier": ("aimesh.notifier", "AIMESH_NOTIFIER_ADDRESS"),
}

ROOT = Path(__file__).resolve().parents[3]

# The consumer group in which several notifier replicas split the results and tasks partitions.
NOTIFIER_GROUP = "aimesh-notifiers"


class StackSettings(BaseSettings):
    """Ports and sizes of the local stack (environment: ``AIMESH_STACK_`` + field name)."""

    model_config = SettingsConfigDict(env_prefix="AIMESH_STACK_", frozen=True, extra="ignore")

    run_dir: Path = Field(ROOT / ".run", description="Logs, Kafka data and the state file.")
    cache_dir: Path = Field(ROOT / ".cache", description="Kafka jars.")
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
        ports = free_ports(11)
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
        )
        fields: dict[str, object] = dict(zip(names, ports, strict=True))
        first_worker = free_port_block(workers, avoid=ports)
        fields["worker_metrics_port"] = first_worker  # worker i serves on this port + i
        if brokers > 1:  # Kafka node i listens on kafka_port + 2i and kafka_controller_port + 2i
            first_node = free_port_block(2 * brokers, avoid=[*ports, *range(first_worker, first_worker + workers)])
            fields.update(kafka_port=first_node, kafka_controller_port=first_node + 1)
        fields.update(run_dir=run_dir, **overrides)
        return cls.model_validate(fields)


@dataclass
class StackState:
    """What ``down`` needs to stop a stack that another process started."""

    pids: dict[str, int] = field(default_factory=dict)
    kafka_bootstrap: str = ""
    triton_url: str = ""
    ingest_address: str = ""  # the first replica's
    notifier_address: str = ""
    ingest_addresses: list[str] = field(default_factory=list)  # every replica's, the first one's first
    notifier_addresses: list[str] = field(default_factory=list)
    gateway_url: str = ""  # empty: the stack runs no gateway
    metrics_urls: dict[str, str] = field(default_factory=dict)


def replica_name(service: str, index: int) -> str:
    """The process name of replica ``index`` of ``service``: the first keeps the service's own name (``ingest``, as
    every caller of a one-replica stack knows it), the others are ``ingest-1``, ``ingest-2``, ..."""
    return f"{service}-{index}" if index else service


class Stack:
    """Starts the parts in dependency order and waits for each to be healthy; ``stop`` reverses it."""

    def __init__(self, settings: StackSettings, *, extra_env: dict[str, str] | None = None) -> None:
        self.settings = settings
        # Topic names come from the same AIMESH_TASKS_TOPIC / AIMESH_RESULTS_TOPIC the services read.
        self.topics = KafkaSettings()
        self.log_dir = settings.run_dir / "logs"
        self._extra_env = extra_env or {}
        self.kafka: KafkaCluster | None = None
        self.triton: TritonServer | None = None  # the first of ``tritons``
        self.tritons: list[TritonServer] = []
        # One pick for every port beyond the settings', so no two parts get the same one.
        extra_replicas = settings.ingest_replicas + settings.notifier_replicas - 2
        free = iter(self._free_ports_beside_settings(3 * (settings.triton_servers - 1) + 2 * extra_replicas))
        self._extra_triton_ports = [(next(free), next(free), next(free)) for _ in range(settings.triton_servers - 1)]
        self._replica_ports = {
            "ingest": _replica_ports(
                (settings.ingest_port, settings.ingest_metrics_port), settings.ingest_replicas, free
            ),
            "notifier": _replica_ports(
                (settings.notifier_port, settings.notifier_metrics_port), settings.notifier_replicas, free
            ),
        }
        self.services: dict[str, ManagedProcess] = {}

    # --- addresses --------------------------------------------------------------------------------------
    @property
    def kafka_bootstrap(self) -> str:
        """Every Kafka node's client listener, comma separated (``bootstrap.servers``)."""
        return ",".join(f"127.0.0.1:{port}" for port, _ in self.settings.kafka_ports())

    @property
    def triton_url(self) -> str:
        """The first Triton server's gRPC address."""
        return f"127.0.0.1:{self.settings.triton_grpc_port}"

    @property
    def triton_urls(self) -> list[str]:
        """Every Triton server's gRPC address, the first one's first."""
        return [self.triton_url, *(f"127.0.0.1:{grpc_port}" for grpc_port, _, _ in self._extra_triton_ports)]

    @property
    def ingest_address(self) -> str:
        """The first ingest replica's gRPC address."""
        return f"127.0.0.1:{self.settings.ingest_port}"

    @property
    def notifier_address(self) -> str:
        """The first notifier replica's gRPC address."""
        return f"127.0.0.1:{self.settings.notifier_port}"

    @property
    def ingest_addresses(self) -> list[str]:
        """Every ingest replica's gRPC address, the first one's first."""
        return self.replica_addresses("ingest")

    @property
    def notifier_addresses(self) -> list[str]:
        """Every notifier replica's gRPC address, the first one's first."""
        return self.replica_addresses("notifier")

    @property
    def ingest_target(self) -> str:
        """A gRPC target of every ingest replica; a channel to it with the ``round_robin`` policy
        (``aimesh.client.targets.ROUND_ROBIN``, as the client library uses) spreads calls over them."""
        return grpc_target(self.ingest_addresses)

    @property
    def notifier_target(self) -> str:
        """A gRPC target of every notifier replica, as ``ingest_target``."""
        return grpc_target(self.notifier_addresses)

    def replica_addresses(self, service: str) -> list[str]:
        """Every replica's gRPC address of ``service`` (``ingest`` or ``notifier``)."""
        return [f"127.0.0.1:{grpc_port}" for grpc_port, _ in self._replica_ports[service]]

    replica_name = staticmethod(replica_name)

    @property
    def gateway_url(self) -> str:
        """The gateway's base URL: the web page at ``/``, the HTTP API under ``/v1``."""
        if not self.settings.gateway_port:
            raise RuntimeError("this stack runs no gateway (gateway_port is 0)")
        return f"http://127.0.0.1:{self.settings.gateway_port}"

    def metrics_port(self, name: str) -> int:
        """The metrics port of service process ``name`` (``ingest``, ``ingest-<i>``, ``notifier``, ``notifier-<i>``,
        ``gateway``, ``worker-<i>``); 0 (none) for any other, such as an extra process a test starts beside them."""
        s = self.settings
        replicas = {
            self.replica_name(service, index): metrics_port
            for service, ports in self._replica_ports.items()
            for index, (_, metrics_port) in enumerate(ports)
        }
        if name in replicas:
            return replicas[name]
        if name == "gateway":
            return s.gateway_metrics_port
        worker = name.removeprefix("worker-")
        if worker != name and worker.isdigit() and s.worker_metrics_port:
            return s.worker_metrics_port + int(worker)
        return 0

    def metrics_url(self, name: str) -> str:
        """Where service process ``name`` serves its Prometheus metrics."""
        port = self.metrics_port(name)
        if not port:
            raise KeyError(f"{name} serves no metrics in this stack")
        return f"http://127.0.0.1:{port}/metrics"

    def service_env(self) -> dict[str, str]:
        """The environment every service process gets: the documented AIMESH_* variables."""
        env = dict(os.environ)
        # A loopback development stack: no API keys unless the caller's environment (or extra_env) asks for them.
        env.setdefault("AIMESH_AUTH", "off")
        env.update(
            {
                "AIMESH_KAFKA_BOOTSTRAP": self.kafka_bootstrap,
                "AIMESH_TASKS_TOPIC": self.topics.tasks_topic,
                "AIMESH_BATCH_TASKS_TOPIC": self.topics.batch_tasks_topic,
                "AIMESH_CANCEL_TOPIC": self.topics.cancel_topic,
                "AIMESH_RESULTS_TOPIC": self.topics.results_topic,
                "AIMESH_DEAD_LETTER_TOPIC": self.topics.dead_letter_topic,
                "AIMESH_TRITON_URL": ",".join(self.triton_urls),
                "AIMESH_INGEST_ADDRESS": self.ingest_address,
                "AIMESH_NOTIFIER_ADDRESS": self.notifier_address,
                "AIMESH_METRICS_HOST": "127.0.0.1",
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self._extra_env)
        return env

    # --- lifecycle --------------------------------------------------------------------------------------
    def start(self, *, say: Callable[[str], None] = lambda _: None) -> None:
        s = self.settings
        self.log_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        say("fetching Kafka jars (cached after the first run)")
        lib_dir = ensure_kafka_jars(s.cache_dir / "kafka")
        say(f"starting Kafka on {self.kafka_bootstrap}")
        self.kafka = KafkaCluster(
            data_dir=s.run_dir / "kafka",
            ports=s.kafka_ports(),
            lib_dir=lib_dir,
            log_dir=self.log_dir / "kafka",
        )
        self.kafka.start()
        say(f"starting Triton on {','.join(self.triton_urls)} with {s.model_repository}")
        self.tritons = [self._triton_server(i) for i in range(s.triton_servers)]
        self.triton = self.tritons[0]
        for triton in self.tritons:
            triton.start()
        self.kafka.wait_ready(s.ready_timeout_s)
        say("Kafka ready; creating topics")
        replicas, min_in_sync = replication_for(s.brokers)
        create_topics(
            self.kafka_bootstrap,
            {
                self.topics.tasks_topic: s.tasks_partitions,
                self.topics.batch_tasks_topic: s.tasks_partitions,
                self.topics.cancel_topic: 1,
                self.topics.results_topic: s.results_partitions,
                self.topics.dead_letter_topic: 1,
            },
            replication_factor=replicas,
            min_insync_replicas=min_in_sync if s.brokers > 1 else None,
        )
        for index in range(s.notifier_replicas):
            self.start_replica("notifier", index)
        for index in range(s.ingest_replicas):
            self.start_replica("ingest", index)
        for triton in self.tritons:
            triton.wait_ready(s.ready_timeout_s)
        say("Triton ready; starting workers")
        for i in range(s.workers):
            self.start_worker(i)
        for service in REPLICATED:
            for index, address in enumerate(self.replica_addresses(service)):
                self.wait_grpc_healthy(address, self.replica_name(service, index))
        if s.gateway_port:
            self.start_gateway()
        self.wait_workers(s.workers)
        if s.gateway_port:
            self.wait_http_healthy(f"{self.gateway_url}/healthz", "gateway")
            say(f"gateway ready at {self.gateway_url}")
        say(f"mesh ready in {time.monotonic() - t0:.1f}s (logs in {self.log_dir})")

    def start_service(self, name: str, module: str, extra_env: dict[str, str] | None = None) -> ManagedProcess:
        env = self.service_env()
        env["AIMESH_METRICS_PORT"] = str(self.metrics_port(name))
        env.update(extra_env or {})
        process = ManagedProcess(name, [sys.executable, "-m", module], env=env, log_path=self.log_dir / f"{name}.log")
        process.start()
        self.services[name] = process
        return process

    def start_replica(self, service: str, index: int) -> ManagedProcess:
        """Start replica ``index`` of ``service`` (``ingest`` or ``notifier``) on its own ports; does not wait."""
        module, address_variable = REPLICATED[service]
        address = self.replica_addresses(service)[index]
        name = self.replica_name(service, index)
        env = {address_variable: address}
        if service == "notifier":
            env.update(self.notifier_env(name))
        return self.start_service(name, module, env)

    def notifier_env(self, name: str) -> dict[str, str]:
        """What notifier replica ``name`` runs with besides its address: its own state directory (kept with the
        Kafka data, so a restart resumes), and with several replicas the group they split the partitions in."""
        env = {"AIMESH_NOTIFIER_STATE_DIR": str(self.settings.run_dir / "notifier-state" / name)}
        if self.settings.notifier_replicas > 1:
            env.update({"AIMESH_NOTIFIER_PARTITIONED": "true", "AIMESH_NOTIFIER_GROUP": NOTIFIER_GROUP})
        return env

    def start_worker(self, index: int, extra_env: dict[str, str] | None = None) -> ManagedProcess:
        """Start ``worker-<index>``; ``extra_env`` on top of the stack's environment (a processing guarantee, say)."""
        env = {"AIMESH_WORKER_ID": f"worker-{index}", **(extra_env or {})}
        return self.start_service(f"worker-{index}", "aimesh.worker", env)

    def start_gateway(self) -> ManagedProcess:
        """The HTTP gateway, a client of ingest and the notifier (their addresses come with ``service_env``)."""
        address = f"127.0.0.1:{self.settings.gateway_port}"
        return self.start_service("gateway", "aimesh.gateway", {"AIMESH_GATEWAY_ADDRESS": address})

    def wait_http_healthy(self, url: str, name: str) -> None:
        """Wait until a GET of ``url`` (service ``name``'s health endpoint) answers 200."""

        def healthy() -> bool:
            try:
                with urllib.request.urlopen(url, timeout=1.0) as response:
                    return bool(response.status == 200)
            except (urllib.error.URLError, OSError):
                return False  # not listening yet, or answering an error status while it starts

        self._wait_healthy(name, url, healthy)

    def wait_grpc_healthy(self, address: str, name: str, *, credentials: grpc.ChannelCredentials | None = None) -> None:
        """Wait until service ``name`` at ``address`` answers its health check SERVING (over TLS with
        ``credentials``)."""
        channel_cm = (
            grpc.insecure_channel(address) if credentials is None else grpc.secure_channel(address, credentials)
        )
        with channel_cm as channel:
            stub = health_pb2_grpc.HealthStub(channel)

            def healthy() -> bool:
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                except grpc.RpcError:
                    return False
                return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

            self._wait_healthy(name, address, healthy)

    def _wait_healthy(self, name: str, where: str, healthy: Callable[[], bool]) -> None:
        """Poll ``healthy`` until it holds, failing at once if service ``name``'s process has exited and after the
        stack's ready timeout otherwise."""
        deadline = time.monotonic() + self.settings.ready_timeout_s
        process = self.services.get(name)
        while True:
            if process is not None and not process.alive():
                raise RuntimeError(f"{name} exited with {process.returncode()}:\n{process.log_tail()}")
            if healthy():
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} at {where} not healthy in time")
            time.sleep(0.2)

    def wait_workers(self, count: int, group: str = "aimesh-workers", *, timeout_s: float | None = None) -> None:
        """Wait until ``count`` members of the worker group hold assignments and the group is stable (at most
        ``timeout_s``, default the stack's ready timeout)."""
        admin = AdminClient({"bootstrap.servers": self.kafka_bootstrap})
        deadline = time.monotonic() + (self.settings.ready_timeout_s if timeout_s is None else timeout_s)
        while True:
            for name, process in self.services.items():
                if name.startswith("worker") and not process.alive():
                    raise RuntimeError(f"{name} exited with {process.returncode()}:\n{process.log_tail()}")
            described = admin.describe_consumer_groups([group])[group].result(timeout=10)
            members = [m for m in described.members if m.assignment.topic_partitions]
            if len(members) >= count and str(described.state).endswith("STABLE"):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker group has {len(members)} of {count} members with partitions")
            time.sleep(0.5)

    # --- faults: stop and start single parts of a running stack (the fault tests) ----------------------------
    def kill_service(self, name: str) -> None:
        """SIGKILL service process ``name`` (``ingest``, ``ingest-<i>``, ``notifier``, ``worker-<i>``, ...), as a crash
        would: no drain, no commit, no goodbye to the consumer group. A no-op if it is not running."""
        self.services[name].kill()

    def kill_worker(self, index: int) -> None:
        """SIGKILL ``worker-<index>``; its partitions move once its group session times out."""
        self.kill_service(f"worker-{index}")

    def restart_worker(self, index: int, extra_env: dict[str, str] | None = None) -> ManagedProcess:
        """Start ``worker-<index>`` again with the same ``AIMESH_WORKER_ID`` (hence the same transactional id, which
        fences a zombie of the previous instance), stopping it gracefully first if it still runs. Does not wait for
        the group: a killed instance's membership lasts until its session times out."""
        name = f"worker-{index}"
        if name in self.services:
            self.services[name].stop(timeout_s=40)
        return self.start_worker(index, extra_env)

    def kill_replica(self, service: str, index: int) -> None:
        """SIGKILL replica ``index`` of ``service`` (``ingest`` or ``notifier``), as a crash would."""
        self.kill_service(self.replica_name(service, index))

    def stop_replica(self, service: str, index: int) -> None:
        """SIGTERM replica ``index`` of ``service`` and wait until it has drained and exited (SIGKILL after 40 s)."""
        self.services[self.replica_name(service, index)].stop(timeout_s=40)

    def restart_replica(self, service: str, index: int, *, wait: bool = True) -> ManagedProcess:
        """Start replica ``index`` of ``service`` again on the same ports, stopping it gracefully first if it still
        runs; with ``wait``, return once it answers SERVING."""
        self.stop_replica(service, index)
        process = self.start_replica(service, index)
        if wait:
            self.wait_grpc_healthy(self.replica_addresses(service)[index], process.name)
        return process

    def stop_triton(self, *, kill: bool = False, index: int = 0) -> None:
        """Stop Triton server ``index``: gracefully (SIGTERM, in-flight requests finish), or with ``kill`` as a crash
        (SIGKILL)."""
        triton = self._require(self.tritons[index] if index < len(self.tritons) else None, f"Triton {index}")
        if kill:
            triton.kill()
        else:
            triton.stop()

    def start_triton(self, *, wait: bool = True, index: int = 0) -> None:
        """Start Triton server ``index`` again on the same ports and repository; with ``wait``, return once every
        model is ready."""
        triton = self._require(self.tritons[index] if index < len(self.tritons) else None, f"Triton {index}")
        triton.start()
        if wait:
            triton.wait_ready(self.settings.ready_timeout_s)

    def stop_kafka(self, *, kill: bool = False) -> None:
        """Stop the broker (every node of a cluster; ``kafka.nodes`` stops one): a clean shutdown, or with ``kill`` a
        crash (SIGKILL). Its data folder stays, and a restarted node is refused (DUPLICATE_BROKER_REGISTRATION) until
        the killed one's broker session expires."""
        kafka = self._require(self.kafka, "Kafka")
        if kill:
            kafka.kill()
        else:
            kafka.stop()

    def start_kafka(self, *, wait: bool = True) -> None:
        """Start the broker (every node of a cluster not running) again on the same data folder and ports: same
        topics, records and committed offsets. With ``wait``, return once it is registered and answering metadata
        requests."""
        kafka = self._require(self.kafka, "Kafka")
        kafka.start()
        if wait:
            kafka.wait_ready(self.settings.ready_timeout_s)

    def _triton_server(self, index: int) -> TritonServer:
        """Triton server ``index``: the first on the settings' ports and logging to ``log_dir``, the others on the
        free ports picked for them, each logging to ``log_dir/triton-<index>``."""
        s = self.settings
        grpc_port, http_port, metrics_port = (
            (s.triton_grpc_port, s.triton_http_port, s.triton_metrics_port)
            if index == 0
            else self._extra_triton_ports[index - 1]
        )
        return TritonServer(
            model_repository=s.model_repository,
            grpc_port=grpc_port,
            http_port=http_port,
            metrics_port=metrics_port,
            log_dir=self.log_dir / f"triton-{index}" if index else self.log_dir,
        )

    def _free_ports_beside_settings(self, count: int) -> list[int]:
        """``count`` ports for the parts beyond the settings' ports: free a moment ago, none of the settings'."""
        taken = {port for port in self.settings.model_dump().values() if isinstance(port, int)}
        return [p for p in free_ports(count + len(taken)) if p not in taken][:count]

    @staticmethod
    def _require(part: _Part | None, name: str) -> _Part:
        if part is None:
            raise RuntimeError(f"{name} is not part of this stack yet: call start() first")
        return part

    def state(self) -> StackState:
        pids = {name: p.pid for name, p in self.services.items() if p.pid}
        for index, triton in enumerate(self.tritons):
            if triton.pid:
                pids[f"triton-{index}" if index else "triton"] = triton.pid
        if self.kafka:
            pids.update(self.kafka.pids())
        return StackState(
            pids=pids,
            kafka_bootstrap=self.kafka_bootstrap,
            triton_url=self.triton_url,
            ingest_address=self.ingest_address,
            notifier_address=self.notifier_address,
            ingest_addresses=self.ingest_addresses,
            notifier_addresses=self.notifier_addresses,
            gateway_url=self.gateway_url if self.settings.gateway_port else "",
            metrics_urls={name: self.metrics_url(name) for name in self.services if self.metrics_port(name)},
        )

    def stop(self) -> None:
        """The gateway, ingest, workers, notifier (each drains into Kafka), then Triton, then Kafka. Idempotent."""
        for name in sorted(self.services, key=_stop_rank):
            process = self.services[name]
            if process.alive():
                process.stop(timeout_s=40)
        for triton in self.tritons:
            triton.stop()
        if self.kafka is not None:
            self.kafka.stop()

    def __enter__(self) -> Stack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _replica_ports(first: tuple[int, int], replicas: int, free: Iterator[int]) -> list[tuple[int, int]]:
    """(gRPC, metrics) ports of each replica of a service: the first's from the settings, the others' ``free`` ones
    (and no metrics where the first serves none)."""
    metrics_port = first[1]
    return [first, *((next(free), next(free) if metrics_port else 0) for _ in range(1, replicas))]


def _stop_rank(name: str) -> int:
    """Stop order: what produces work first, what serves everyone last."""
    for rank, prefix in enumerate(("gateway", "ingest", "worker", "notifier", "triton", "kafka")):
        if name.startswith(prefix):
            return rank
    return 0


STATE_FILE = "stack.json"


def write_state(run_dir: Path, state: StackState) -> None:
    (run_dir / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))


def read_state(run_dir: Path) -> StackState | None:
    try:
        return StackState(**json.loads((run_dir / STATE_FILE).read_text()))
    except FileNotFoundError:
        return None


def stop_from_state(run_dir: Path, say: Callable[[str], None] = print) -> bool:
    """Stop a stack started by another process (``make down``). Return False if none was recorded."""
    state = read_state(run_dir)
    if state is None:
        return False

    def stop(name: str) -> None:
        pid = state.pids[name]
        say(f"stopping {name} (pid {pid})" if stop_pid(pid, timeout_s=40) else f"{name} was not running")

    order = sorted(state.pids, key=_stop_rank)
    kafka_nodes = [name for name in order if name.startswith("kafka")]
    for name in order:
        if name not in kafka_nodes:
            stop(name)
    # Every Kafka node at once: one after another, the last one's controlled shutdown would wait for a controller
    # quorum that ended with the second-last.
    with concurrent.futures.ThreadPoolExecutor(max(1, len(kafka_nodes))) as pool:
        list(pool.map(stop, kafka_nodes))
    (run_dir / STATE_FILE).unlink()
    return True
