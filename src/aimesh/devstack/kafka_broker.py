"""One Kafka 4.x node (``KafkaBroker``): its configuration alone or as a node of a cluster, the formatting of its
storage, and its JVM's start, readiness and stop. See ``kafka`` for how the dev stack runs Kafka."""

from __future__ import annotations

import base64
import signal
import subprocess
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

from confluent_kafka import KafkaException

from aimesh import kafka as kafka_adapter
from aimesh.errors import AimeshError

from .process import Launched

# The dev stack runs from a checkout: the POM and log4j config live in the repository, not in the package.
DEPLOY_DIR = Path(__file__).resolve().parents[3] / "deploy" / "kafka"
DEFAULT_LOG4J_CONFIG = DEPLOY_DIR / "log4j2.properties"

_TAIL_BYTES = 4000
SEGMENTS = "kraft-logs"


class KafkaBrokerError(AimeshError, RuntimeError):
    """The development broker, or fetching or preparing what it runs on, failed."""


class KafkaBroker(Launched):
    """One Kafka 4.x node acting as broker and controller, listening on 127.0.0.1.

    ``data_dir`` holds ``server.properties`` and the log segments; it survives `stop` and `kill`, so starting
    again on the same folder brings the same topics and records back. ``log_dir`` gets ``server.log``
    (log4j) and ``kafka.out`` (the JVM's stdout and stderr, where start-up failures land).

    Alone (no ``voters``) the node is a cluster of its own, every internal topic on its one replica. With
    ``voters`` (node id to controller port, every node of the cluster, this one included) it is node ``node_id``
    of a cluster whose storage is formatted with ``cluster_id``; `KafkaCluster` builds those.
    """

    #: How long the ``with`` form waits for the broker to answer metadata requests.
    ready_timeout_s: float = 60.0

    def __init__(
        self,
        *,
        data_dir: Path,
        port: int,
        controller_port: int,
        lib_dir: Path,
        log_dir: Path,
        heap_mb: int = 512,
        log4j_config: Path = DEFAULT_LOG4J_CONFIG,
        node_id: int = 1,
        voters: Mapping[int, int] | None = None,
        cluster_id: str | None = None,
    ) -> None:
        if voters is not None and (node_id not in voters or cluster_id is None):
            raise ValueError(f"node {node_id} of a cluster must be one of its voters {sorted(voters)} and have its id")
        self._node_id = node_id
        self._voters = dict(voters) if voters is not None else None
        self._cluster_id = cluster_id
        self._data_dir = data_dir.resolve()
        self._port = port
        self._controller_port = controller_port
        self._lib_dir = lib_dir.resolve()
        self._log_dir = log_dir.resolve()
        self._heap_mb = heap_mb
        self._log4j_config = log4j_config.resolve()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        """``bootstrap.servers`` value for clients of this broker."""
        return f"127.0.0.1:{self._port}"

    @property
    def node_id(self) -> int:
        return self._node_id

    @property
    def pid(self) -> int | None:
        """Process id of the running broker JVM; None before `start` and after `stop` or `kill`."""
        return self._process.pid if self._process is not None else None

    @property
    def server_log(self) -> Path:
        """The broker's own log (log4j's ``server.log``)."""
        return self._log_dir / "server.log"

    @property
    def running(self) -> bool:
        """Whether the JVM started here is still alive (False once it exited, even on its own)."""
        return self._process is not None and self._process.poll() is None

    @property
    def _segments_dir(self) -> Path:
        return self._data_dir / SEGMENTS

    def start(self) -> None:
        """Write the configuration, format storage on first use, and launch the JVM without waiting for it.

        Raises:
            KafkaBrokerError: already started, or formatting storage failed.
        """
        if self._process is not None and self._process.poll() is None:
            raise KafkaBrokerError(f"broker already running as pid {self._process.pid}")
        self._data_dir.mkdir(parents=True, exist_ok=True)
        self._log_dir.mkdir(parents=True, exist_ok=True)
        config = self._data_dir / "server.properties"
        config.write_text(self._server_properties())
        if not (self._segments_dir / "meta.properties").exists():
            self._format_storage(config)
        with (self._log_dir / "kafka.out").open("ab") as out:
            self._process = subprocess.Popen(
                [*self._java_command(), "kafka.Kafka", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                # Its own session keeps a Ctrl+C meant for the test runner from reaching the broker mid-test.
                start_new_session=True,
            )

    def wait_ready(self, timeout_s: float) -> None:
        """Block until the broker is registered, unfenced and answering metadata requests.

        Raises:
            KafkaBrokerError: not started, the JVM exited, or ``timeout_s`` passed (the message ends with the log tail).
        """
        if self._process is None:
            raise KafkaBrokerError("wait_ready() called before start()")
        admin = kafka_adapter.admin(
            {
                "bootstrap.servers": self.bootstrap,
                "reconnect.backoff.ms": 50,
                "reconnect.backoff.max.ms": 200,
                # Refused connections are expected until the broker listens; librdkafka would print each one to
                # stderr. A broker that never comes up is reported below with its own log instead.
                "log_level": 0,
            }
        )
        deadline = time.monotonic() + timeout_s
        while True:
            returncode = self._process.poll()
            if returncode is not None:
                raise KafkaBrokerError(f"broker exited with {returncode} during start-up\n{self._log_tail()}")
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                raise KafkaBrokerError(f"broker not ready after {timeout_s:.0f} s\n{self._log_tail()}")
            try:
                metadata = admin.list_topics(timeout=min(1.0, remaining_s))
            except KafkaException:
                metadata = None  # Not listening yet.
            # A fenced broker answers metadata requests but lists no brokers and cannot host partitions.
            if metadata is not None and self._node_id in metadata.brokers:
                return
            time.sleep(0.1)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Shut the broker down cleanly (SIGTERM), or SIGKILL it after ``timeout_s``; waits for the exit.

        Idempotent, and a no-op on a broker never started.
        """
        process = self._process
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        self._process = None

    def kill(self) -> None:
        """SIGKILL the broker, as a crash would, and reap it.

        Acknowledged records survive: the broker does not fsync per record, but what it wrote sits in the OS page
        cache, which outlives the process (only a machine crash could lose it).
        """
        process = self._process
        if process is None:
            return
        process.send_signal(signal.SIGKILL)
        process.wait()
        self._process = None

    def _server_properties(self) -> str:
        controller = f"127.0.0.1:{self._controller_port}"
        listeners = f"PLAINTEXT://{self.bootstrap},CONTROLLER://{controller}"
        if self._voters is None:
            quorum = {"controller.quorum.bootstrap.servers": controller}
            replication = _single_node_settings()
        else:
            voters = ",".join(f"{node}@127.0.0.1:{port}" for node, port in sorted(self._voters.items()))
            quorum = {"controller.quorum.voters": voters}
            replication = _cluster_node_settings(len(self._voters))
        settings = {
            "process.roles": "broker,controller",
            "node.id": self._node_id,
            **quorum,
            "listeners": listeners,
            "advertised.listeners": listeners,
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": self._segments_dir,
            "num.partitions": 1,
            "auto.create.topics.enable": "false",
            "group.initial.rebalance.delay.ms": 0,
            # The workers' group uses the consumer rebalance protocol (KIP-848), whose timing the broker sets. The
            # defaults (45 s session, 5 s heartbeat) make a crashed worker's partitions wait 45 s for a new owner and
            # a joining worker wait several heartbeats for its share; these match the classic settings aimesh used.
            "group.consumer.min.session.timeout.ms": 6000,
            "group.consumer.session.timeout.ms": 10000,
            "group.consumer.min.heartbeat.interval.ms": 500,
            "group.consumer.heartbeat.interval.ms": 1000,
            **replication,
            # After a kill the restarted node's registration is refused (DUPLICATE_BROKER_REGISTRATION) until its
            # previous session expires, so the session timeout is the restart delay in fault tests (default 9 s).
            # It stays well above the heartbeat so a busy machine does not fence the only broker.
            "broker.heartbeat.interval.ms": 500,
            "broker.session.timeout.ms": 4000,
        }
        return "".join(f"{key}={value}\n" for key, value in settings.items())

    def _java_command(self) -> list[str]:
        return [
            "java",
            # The whole heap from the start, touched at once, as Kafka's operations guide runs brokers (-Xms equal
            # to -Xmx): a heap that grows in steps reads as a leak in the soak's memory samples (docs/soak.md).
            f"-Xms{self._heap_mb}m",
            f"-Xmx{self._heap_mb}m",
            "-XX:+AlwaysPreTouch",
            # The client compiler only: a dev or test broker lives minutes, and on a 2-core machine C2's compiler
            # thread took a third of a core for all of a benchmark round (measured after 15,000 tasks), more
            # than the broker's C1-compiled code loses in speed.
            "-XX:TieredStopAtLevel=1",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self._log4j_config}",
            f"-Dkafka.logs.dir={self._log_dir}",
            "-cp",
            f"{self._lib_dir}/*",
        ]

    def _format_storage(self, config: Path) -> None:
        # A lone node starts a dynamic quorum of itself; a cluster's static voters need no flag.
        quorum = ["--standalone"] if self._voters is None else []
        cluster_id = self._cluster_id or random_cluster_id()
        command = [
            *self._java_command(),
            "kafka.tools.StorageTool", "format", *quorum, "-t", cluster_id, "-c", str(config),
        ]  # fmt: skip
        result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False)
        if result.returncode != 0:
            raise KafkaBrokerError(
                f"formatting {self._segments_dir} failed ({result.returncode}):\n{tail_text(result.stdout)}"
            )

    def _log_tail(self) -> str:
        parts = []
        for path in (self._log_dir / "kafka.out", self._log_dir / "server.log"):
            if path.exists():
                parts.append(f"--- tail of {path} ---\n{tail_text(_read_tail(path))}")
        return "\n".join(parts) or f"(no log files in {self._log_dir})"


def replication_for(nodes: int) -> tuple[int, int]:
    """Replication factor and ``min.insync.replicas`` of every topic on a cluster of ``nodes``: from three nodes on,
    three replicas of which two must hold a record before ``acks=all`` acknowledges it, as users run Kafka (one node
    may fail or restart without an outage or a loss); below that, a replica on every node, one of them enough."""
    factor = min(3, nodes)
    return factor, 2 if factor == 3 else 1


def _single_node_settings() -> dict[str, object]:
    return {
        # One node: every internal topic must fit on one replica.
        "offsets.topic.replication.factor": 1,
        "transaction.state.log.replication.factor": 1,
        "transaction.state.log.min.isr": 1,
        "share.coordinator.state.topic.replication.factor": 1,
        "share.coordinator.state.topic.min.isr": 1,
        # The defaults (50 each) make the first consumer group and the first transactional producer wait for 50
        # partitions to be created and loaded, and every restart reload them; one is plenty on one node.
        "offsets.topic.num.partitions": 1,
        "transaction.state.log.num.partitions": 1,
        # A controlled shutdown moves partition leadership to other replicas first; one node has none, so its
        # partitions go leaderless while it still runs, and the transaction coordinator then skips the COMMIT
        # markers it is writing for transactions whose commit it has already acknowledged ("Couldn't find leader
        # endpoint ... likely deleted"). Those records hang until the producer's next marker, and are lost if
        # that one is an abort (seen in the broker-outage fault test). Without it, an unfinished commit is
        # finished on restart from the transaction log.
        "controlled.shutdown.enable": "false",
    }


def _cluster_node_settings(nodes: int) -> dict[str, object]:
    factor, min_isr = replication_for(nodes)
    return {
        "default.replication.factor": factor,
        "min.insync.replicas": min_isr,
        "offsets.topic.replication.factor": factor,
        "transaction.state.log.replication.factor": factor,
        "transaction.state.log.min.isr": min_isr,
        "share.coordinator.state.topic.replication.factor": factor,
        "share.coordinator.state.topic.min.isr": min_isr,
        # One partition per node instead of 50 (slow to create and to load on every restart): the groups' and
        # the transactions' coordinators still spread over the nodes, as they do on a production cluster.
        "offsets.topic.num.partitions": nodes,
        "transaction.state.log.num.partitions": nodes,
        # A node stopping cleanly first hands its partitions' leadership to in-sync replicas on other nodes, so a
        # rolling restart costs clients a leader change rather than an outage, and the transaction coordinator's
        # markers always find a leader.
        "controlled.shutdown.enable": "true",
    }


def random_cluster_id() -> str:
    # Same shape as Kafka's Uuid.randomUuid(): 16 random bytes, URL-safe base64 without padding; Kafka also
    # rejects ids starting with "-" because its command-line tools would read them as options.
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):
            return cluster_id


def _read_tail(path: Path) -> bytes:
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - _TAIL_BYTES))
        return f.read()


def tail_text(output: bytes | None) -> str:
    return (output or b"")[-_TAIL_BYTES:].decode(errors="replace")
