"""The whole mesh on loopback: Kafka, Triton, topics, then ingest, workers, notifier and the HTTP gateway.

Used by ``aimesh-stack up/down/demo`` (``make up``, ``make down``, ``make demo``) and by the integration
tests, which start one stack per test session on free ports.
"""

from __future__ import annotations

import concurrent.futures
import logging
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aimesh import kafka as kafka_adapter

from .kafka import KafkaCluster, create_topics, ensure_kafka_jars, replication_for
from .process import ManagedProcess, stop_pid
from .seaweedfs import ObjectStoreParts, WeedServer
from .stack_layout import StackLayout, replica_name
from .stack_settings import ROOT, StackSettings
from .stack_state import STATE_FILE, StackState, read_state, write_state
from .triton import TritonServer

__all__ = [
    "NOTIFIER_GROUP",
    "REPLICATED",
    "ROOT",
    "STATE_FILE",
    "Stack",
    "StackSettings",
    "StackState",
    "read_state",
    "replica_name",
    "stop_from_state",
    "write_state",
]

log = logging.getLogger(__name__)

_Part = TypeVar("_Part", KafkaCluster, TritonServer)

# The services that run as replicas, each a gRPC server: the module it runs and the variable of its bind address.
REPLICATED = {
    "ingest": ("aimesh.ingest", "AIMESH_INGEST_ADDRESS"),
    "notifier": ("aimesh.notifier", "AIMESH_NOTIFIER_ADDRESS"),
}

# The consumer group in which several notifier replicas split the results and tasks partitions.
NOTIFIER_GROUP = "aimesh-notifiers"


class Stack(ObjectStoreParts, StackLayout):
    """Starts the parts in dependency order and waits for each to be healthy; ``stop`` reverses it."""

    def __init__(self, settings: StackSettings, *, extra_env: dict[str, str] | None = None) -> None:
        super().__init__(settings, extra_env=extra_env)
        self.log_dir = settings.run_dir / "logs"
        self.kafka: KafkaCluster | None = None
        self.triton: TritonServer | None = None  # the first of ``tritons``
        self.tritons: list[TritonServer] = []
        self.services: dict[str, ManagedProcess] = {}
        self.object_store: WeedServer | None = None

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
        self._launch_object_store(say)
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
        self._object_store_ready()
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
        admin = kafka_adapter.admin({"bootstrap.servers": self.kafka_bootstrap})
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
        if self.object_store is not None and self.object_store.pid:
            pids["objectstore"] = self.object_store.pid
        return StackState(
            pids=pids,
            kafka_bootstrap=self.kafka_bootstrap,
            triton_url=self.triton_url,
            ingest_address=self.ingest_address,
            notifier_address=self.notifier_address,
            ingest_addresses=self.ingest_addresses,
            notifier_addresses=self.notifier_addresses,
            gateway_url=self.gateway_url if self.settings.gateway_port else "",
            object_store_url=self.object_store_url,
            metrics_urls={name: self.metrics_url(name) for name in self.services if self.metrics_port(name)},
        )

    def stop(self) -> None:
        """The gateway, ingest, workers, notifier (each drains into Kafka), then Triton, Kafka, the object store.
        Idempotent."""
        for name in sorted(self.services, key=_stop_rank):
            process = self.services[name]
            if process.alive():
                process.stop(timeout_s=40)
        for triton in self.tritons:
            triton.stop()
        if self.kafka is not None:
            self.kafka.stop()
        self.stop_object_store()

    def __enter__(self) -> Stack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _stop_rank(name: str) -> int:
    """Stop order: what produces work first, what serves everyone last."""
    for rank, prefix in enumerate(("gateway", "ingest", "worker", "notifier", "triton", "kafka", "objectstore")):
        if name.startswith(prefix):
            return rank
    return 0


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
