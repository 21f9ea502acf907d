"""Where each part of a local stack listens: the ports beyond the settings' (extra Triton servers and replicas),
every address and metrics URL, and the environment every service process gets."""

from __future__ import annotations

import os
from collections.abc import Iterator

from aimesh.client.targets import grpc_target
from aimesh.settings import KafkaSettings

from .ports import free_ports
from .seaweedfs import INTERNAL_PORTS, object_store_env
from .stack_settings import StackSettings


def replica_name(service: str, index: int) -> str:
    """The process name of replica ``index`` of ``service``: the first keeps the service's own name (``ingest``, as
    every caller of a one-replica stack knows it), the others are ``ingest-1``, ``ingest-2``, ..."""
    return f"{service}-{index}" if index else service


class StackLayout:
    """The addresses of a stack with ``settings``; ``extra_env`` goes on top of every service's environment."""

    def __init__(self, settings: StackSettings, *, extra_env: dict[str, str] | None = None) -> None:
        self.settings = settings
        # Topic names come from the same AIMESH_TASKS_TOPIC / AIMESH_RESULTS_TOPIC the services read.
        self.topics = KafkaSettings()
        self._extra_env = extra_env or {}
        # One pick for every port beyond the settings', so no two parts get the same one.
        extra_replicas = settings.ingest_replicas + settings.notifier_replicas - 2
        store_ports = INTERNAL_PORTS if settings.object_store_port else 0
        free = iter(
            self._free_ports_beside_settings(3 * (settings.triton_servers - 1) + 2 * extra_replicas + store_ports)
        )
        self._object_store_ports = [next(free) for _ in range(store_ports)]
        self._extra_triton_ports = [(next(free), next(free), next(free)) for _ in range(settings.triton_servers - 1)]
        self._replica_ports = {
            "ingest": _replica_ports(
                (settings.ingest_port, settings.ingest_metrics_port), settings.ingest_replicas, free
            ),
            "notifier": _replica_ports(
                (settings.notifier_port, settings.notifier_metrics_port), settings.notifier_replicas, free
            ),
        }

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
                # Ingest reads the models' declared inputs from the first server (they all serve one repository).
                "AIMESH_MODEL_METADATA_URL": self.triton_urls[0],
                "AIMESH_INGEST_ADDRESS": self.ingest_address,
                "AIMESH_NOTIFIER_ADDRESS": self.notifier_address,
                "AIMESH_METRICS_HOST": "127.0.0.1",
                "PYTHONUNBUFFERED": "1",
            }
        )
        if self.settings.object_store_port:
            env.update(object_store_env(self.settings.object_store_port))
        env.update(self._extra_env)
        return env

    def _free_ports_beside_settings(self, count: int) -> list[int]:
        """``count`` ports for the parts beyond the settings' ports: free a moment ago, none of the settings'."""
        taken = {port for port in self.settings.model_dump().values() if isinstance(port, int)}
        return [p for p in free_ports(count + len(taken)) if p not in taken][:count]


def _replica_ports(first: tuple[int, int], replicas: int, free: Iterator[int]) -> list[tuple[int, int]]:
    """(gRPC, metrics) ports of each replica of a service: the first's from the settings, the others' ``free`` ones
    (and no metrics where the first serves none)."""
    metrics_port = first[1]
    return [first, *((next(free), next(free) if metrics_port else 0) for _ in range(1, replicas))]
