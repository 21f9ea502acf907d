"""A real Apache Kafka (KRaft) for tests and the dev stack: one node, or a cluster of several on one machine.

The broker runs from Maven Central jars (``deploy/kafka/pom.xml``), no Docker and no tarball: `ensure_kafka_jars`
fetches the classpath once into a cache folder, `KafkaBroker` formats storage and runs ``kafka.Kafka`` on it.
Storage is formatted only once per data folder, so a broker stopped or killed and started again keeps its records.

`KafkaCluster` runs one such node (the quick start's single broker, unchanged) or several. Every node of a cluster
is both a broker and a controller (combined mode), and the controllers are a static quorum of all the nodes
(``controller.quorum.voters``): three JVMs rather than the six of a production layout with dedicated controllers
(Strimzi's ``kafka-persistent`` example), on a machine of two cores. What that changes: a node lost is a broker and a
voter lost, so with two of three nodes down there is no controller either, and a write waits (then times out)
instead of failing at once with NOT_ENOUGH_REPLICAS as it would where controllers run apart and fence the dead
brokers. With three nodes every topic, the internal ones included, has three replicas, two of which must hold a
record before it is acknowledged (``acks=all``), as users run Kafka.
"""

from __future__ import annotations

import base64
import concurrent.futures
import fcntl
import hashlib
import shutil
import signal
import subprocess
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from pathlib import Path

from confluent_kafka import ElectionType, KafkaError, KafkaException
from confluent_kafka.admin import AdminClient
from confluent_kafka.admin._metadata import ClusterMetadata
from confluent_kafka.cimpl import NewTopic

from .process import Launched

# The dev stack runs from a checkout: the POM and log4j config live in the repository, not in the package.
_DEPLOY_DIR = Path(__file__).resolve().parents[3] / "deploy" / "kafka"
DEFAULT_POM = _DEPLOY_DIR / "pom.xml"
DEFAULT_LOG4J_CONFIG = _DEPLOY_DIR / "log4j2.properties"

_TAIL_BYTES = 4000
_SEGMENTS = "kraft-logs"
_TRANSACTION_STATE_TOPIC = "__transaction_state"


class KafkaBrokerError(RuntimeError):
    """The development broker, or fetching or preparing what it runs on, failed."""


def ensure_kafka_jars(cache_dir: Path, *, pom: Path = DEFAULT_POM, timeout_s: float = 600.0) -> Path:
    """Return a folder holding the broker's classpath jars, fetching them with Maven only on the first call.

    The folder is keyed by the pinned Kafka version and a digest of the POM, so editing the POM fetches afresh.
    A marker file written after Maven succeeds makes later calls a few file checks; an interrupted fetch leaves
    no marker and is redone. Concurrent callers (several test processes) serialise on a lock file.

    Raises:
        KafkaBrokerError: Maven is missing, failed (the message ends with its output) or ran past ``timeout_s``.
    """
    pom_bytes = pom.read_bytes()
    digest = hashlib.sha256(pom_bytes).hexdigest()[:12]
    version_dir = cache_dir / f"kafka-{_pinned_kafka_version(pom_bytes)}-{digest}"
    lib_dir = version_dir / "lib"
    marker = version_dir / ".complete"
    if marker.exists():
        return lib_dir
    version_dir.mkdir(parents=True, exist_ok=True)
    with (version_dir / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists():
            return lib_dir
        # A fetch killed half-way leaves truncated jars that copy-dependencies would keep.
        shutil.rmtree(lib_dir, ignore_errors=True)
        command = [
            "mvn", "-q", "-B", "-f", str(pom), "dependency:copy-dependencies", f"-DoutputDirectory={lib_dir}",
        ]  # fmt: skip
        try:
            result = subprocess.run(
                command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout_s, check=False
            )
        except FileNotFoundError as e:
            raise KafkaBrokerError("mvn is not on PATH; it fetches the Kafka broker jars") from e
        except subprocess.TimeoutExpired as e:
            raise KafkaBrokerError(
                f"mvn ran past {timeout_s:.0f} s fetching the Kafka jars:\n{_tail_text(e.stdout)}"
            ) from e
        if result.returncode != 0:
            raise KafkaBrokerError(
                f"mvn exited with {result.returncode} fetching the Kafka jars:\n{_tail_text(result.stdout)}"
            )
        marker.write_text(" ".join(command) + "\n")
    return lib_dir


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
        return self._data_dir / _SEGMENTS

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
        admin = AdminClient(
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
        cluster_id = self._cluster_id or _random_cluster_id()
        command = [
            *self._java_command(),
            "kafka.tools.StorageTool", "format", *quorum, "-t", cluster_id, "-c", str(config),
        ]  # fmt: skip
        result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False)
        if result.returncode != 0:
            raise KafkaBrokerError(
                f"formatting {self._segments_dir} failed ({result.returncode}):\n{_tail_text(result.stdout)}"
            )

    def _log_tail(self) -> str:
        parts = []
        for path in (self._log_dir / "kafka.out", self._log_dir / "server.log"):
            if path.exists():
                parts.append(f"--- tail of {path} ---\n{_tail_text(_read_tail(path))}")
        return "\n".join(parts) or f"(no log files in {self._log_dir})"


class KafkaCluster(Launched):
    """Kafka nodes on 127.0.0.1, each a broker and a KRaft controller; with one node, exactly the single `KafkaBroker`.

    ``ports`` gives each node's (client, controller) port; node ``i`` (an index from 0) has node id ``i + 1``. One
    node keeps its data and logs straight in ``data_dir`` and ``log_dir``; several keep node ``i``'s in ``node-<i>``
    under each. Every node's storage is formatted on its first start, all with one cluster id (that of a node
    formatted before, if any), so the cluster keeps its records across stops, kills and restarts of any node. The
    nodes are in ``nodes``: stop, kill and start one there (`KafkaBroker.stop`, `kill`, `start`, `wait_ready`).
    """

    def __init__(
        self,
        *,
        data_dir: Path,
        ports: Sequence[tuple[int, int]],
        lib_dir: Path,
        log_dir: Path,
        heap_mb: int = 512,
        log4j_config: Path = DEFAULT_LOG4J_CONFIG,
    ) -> None:
        if not ports:
            raise ValueError("a Kafka cluster needs at least one node")
        # The ``with`` form waits for the nodes one after another.
        self.ready_timeout_s = KafkaBroker.ready_timeout_s * len(ports)
        if len(ports) == 1:
            ((port, controller_port),) = ports
            self.nodes = [
                KafkaBroker(
                    data_dir=data_dir, port=port, controller_port=controller_port, lib_dir=lib_dir,
                    log_dir=log_dir, heap_mb=heap_mb, log4j_config=log4j_config,
                )
            ]  # fmt: skip
            return
        voters = {index + 1: controller_port for index, (_, controller_port) in enumerate(ports)}
        data_dirs = [data_dir / f"node-{index}" for index in range(len(ports))]
        cluster_id = _formatted_cluster_id(data_dirs) or _random_cluster_id()
        self.nodes = [
            KafkaBroker(
                data_dir=node_dir, port=port, controller_port=controller_port, lib_dir=lib_dir,
                log_dir=log_dir / f"node-{index}", heap_mb=heap_mb, log4j_config=log4j_config,
                node_id=index + 1, voters=voters, cluster_id=cluster_id,
            )
            for index, (node_dir, (port, controller_port)) in enumerate(zip(data_dirs, ports, strict=True))
        ]  # fmt: skip

    @property
    def bootstrap(self) -> str:
        """``bootstrap.servers`` value listing every node, for clients of the cluster."""
        return ",".join(node.bootstrap for node in self.nodes)

    @property
    def pid(self) -> int | None:
        """Process id of the first node's JVM (the only one's, on one node); None while it is down."""
        return self.nodes[0].pid

    def pids(self) -> dict[str, int]:
        """The running nodes' JVM pids by name: ``kafka`` for a single node, ``kafka-<i>`` for node i of several."""
        if len(self.nodes) == 1:
            return {"kafka": pid} if (pid := self.nodes[0].pid) else {}
        return {f"kafka-{index}": node.pid for index, node in enumerate(self.nodes) if node.pid}

    def start(self) -> None:
        """Start every node that is not running, without waiting for any (see `wait_ready`)."""
        for node in self.nodes:
            if not node.running:
                node.start()

    def wait_ready(self, timeout_s: float) -> None:
        """Block until every node is registered, unfenced and answering metadata requests.

        Raises:
            KafkaBrokerError: a node is not started or exited, or ``timeout_s`` passed.
        """
        deadline = time.monotonic() + timeout_s
        for node in self.nodes:
            node.wait_ready(max(0.1, deadline - time.monotonic()))

    def stop(self, timeout_s: float = 30.0) -> None:
        """Shut every node down cleanly, all at once, each SIGKILLed after ``timeout_s``. Idempotent.

        Stopped one after another, the last node's controlled shutdown would wait for a controller long gone: the
        quorum ends with the second-last node.
        """
        with concurrent.futures.ThreadPoolExecutor(len(self.nodes)) as pool:
            for stopped in [pool.submit(node.stop, timeout_s) for node in self.nodes]:
                stopped.result()

    def kill(self) -> None:
        """SIGKILL every node."""
        for node in self.nodes:
            node.kill()

    def leader(self, topic: str, partition: int) -> int:
        """The index in ``nodes`` of the node leading ``partition`` of ``topic``.

        Raises:
            KafkaBrokerError: the topic or partition is unknown or has no leader now.
        """
        return self._node_index(self._leader_id(self._metadata(topic), topic, partition))

    def group_coordinator(self, group: str) -> int:
        """The index in ``nodes`` of consumer group ``group``'s coordinator."""
        admin = self._admin()  # held until the answer: a client destroyed earlier fails its futures
        future = admin.describe_consumer_groups([group], request_timeout=10)[group]
        # exception() rather than result(): see create_topics.
        error = future.exception(timeout=15)
        if error is not None:
            raise KafkaBrokerError(f"describing group {group!r} failed: {error}")
        return self._node_index(future.result().coordinator.id)

    def transaction_coordinator(self, transactional_id: str) -> int:
        """The index in ``nodes`` of ``transactional_id``'s transaction coordinator: the leader of the partition of
        ``__transaction_state`` that Kafka assigns it (the topic exists once a transactional producer started)."""
        metadata = self._metadata(_TRANSACTION_STATE_TOPIC)
        count = len(metadata.topics[_TRANSACTION_STATE_TOPIC].partitions)
        partition = coordinator_partition(transactional_id, count)
        return self._node_index(self._leader_id(metadata, _TRANSACTION_STATE_TOPIC, partition))

    def wait_in_sync(self, timeout_s: float) -> None:
        """Block until every partition of every topic, the internal ones included, has a leader and every one of
        its replicas in sync: the cluster could lose any one node again without losing a write.

        Raises:
            KafkaBrokerError: partitions still without a leader or short of replicas after ``timeout_s``.
        """
        admin = self._admin()
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                lagging = _partitions_out_of_sync(admin.list_topics(timeout=5))
            except KafkaException as e:
                lagging = [f"(no metadata: {e.args[0]})"]
            if not lagging:
                return
            if time.monotonic() > deadline:
                raise KafkaBrokerError(f"not in sync after {timeout_s:.0f} s: {lagging[:10]}")
            time.sleep(0.2)

    def elect_preferred_leaders(self, timeout_s: float = 30.0) -> None:
        """Hand every partition's leadership back to its preferred replica (the first listed), as the broker's own
        rebalancing does after ``leader.imbalance.check.interval.seconds`` (5 min): a node restarted leads nothing
        until then.

        Raises:
            KafkaBrokerError: the election failed for a partition whose preferred replica is not leading.
        """
        admin = self._admin()  # held until the answer: a client destroyed earlier fails its futures
        # No timeout arguments: confluent-kafka 2.16 raises SystemError on any keyword argument to elect_leaders.
        future = admin.elect_leaders(ElectionType.PREFERRED, None)
        error = future.exception(timeout=timeout_s)  # see create_topics
        if error is not None:
            raise KafkaBrokerError(f"preferred leader election failed: {error}")
        failed = {
            f"{tp.topic}/{tp.partition}": e
            for tp, e in future.result().items()
            if e is not None and e.args[0].code() != KafkaError.ELECTION_NOT_NEEDED
        }
        if failed:
            raise KafkaBrokerError(f"preferred leader election failed for {failed}")

    def _admin(self) -> AdminClient:
        # Nodes a fault test stopped refuse connections; the client tries the others.
        return AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 0})

    def _metadata(self, topic: str) -> ClusterMetadata:
        try:
            return self._admin().list_topics(topic, timeout=10)
        except KafkaException as e:
            raise KafkaBrokerError(f"no metadata for {topic!r} from {self.bootstrap}: {e.args[0]}") from e

    @staticmethod
    def _leader_id(metadata: ClusterMetadata, topic: str, partition: int) -> int:
        described = metadata.topics.get(topic)
        if described is None or described.error is not None or partition not in described.partitions:
            raise KafkaBrokerError(f"no partition {partition} of topic {topic!r} in the cluster's metadata")
        leader = int(described.partitions[partition].leader)
        if leader < 0:
            raise KafkaBrokerError(f"partition {partition} of {topic!r} has no leader now")
        return leader

    def _node_index(self, node_id: int) -> int:
        for index, node in enumerate(self.nodes):
            if node.node_id == node_id:
                return index
        raise KafkaBrokerError(f"node id {node_id} is not one of this cluster's nodes")


def coordinator_partition(key: str, partitions: int) -> int:
    """The partition of ``__consumer_offsets`` or ``__transaction_state`` that holds ``key`` (a group id or a
    transactional id), as Kafka computes it: ``Utils.abs(key.hashCode()) % partitions``, with Java's String hash."""
    utf16 = key.encode("utf-16-be")  # Java hashes UTF-16 code units, surrogate pairs as two
    hashed = 0
    for i in range(0, len(utf16), 2):
        hashed = (31 * hashed + int.from_bytes(utf16[i : i + 2], "big")) & 0xFFFFFFFF
    signed = hashed - (1 << 32) if hashed >= 1 << 31 else hashed
    # Utils.abs maps Integer.MIN_VALUE, whose Math.abs is itself, to 0.
    return (0 if signed == -(1 << 31) else abs(signed)) % partitions


def _formatted_cluster_id(data_dirs: Sequence[Path]) -> str | None:
    """The cluster id of the node folders already formatted, None if none is.

    Raises:
        KafkaBrokerError: folders formatted for different clusters (a node of each could never join the other).
    """
    found: dict[str, Path] = {}
    for data_dir in data_dirs:
        meta = data_dir / _SEGMENTS / "meta.properties"
        if not meta.exists():
            continue
        for line in meta.read_text().splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "cluster.id":
                found[value.strip()] = data_dir
    if len(found) > 1:
        raise KafkaBrokerError(f"node folders formatted for different clusters: {found}; remove them to start afresh")
    return next(iter(found), None)


def _partitions_out_of_sync(metadata: ClusterMetadata) -> list[str]:
    return [
        f"{name}/{number}"
        for name, topic in sorted(metadata.topics.items())
        for number, partition in sorted(topic.partitions.items())
        if partition.leader < 0 or set(partition.isrs) != set(partition.replicas)
    ]


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


def create_topics(
    bootstrap: str,
    topics: dict[str, int],
    timeout_s: float = 30.0,
    *,
    replication_factor: int = 1,
    min_insync_replicas: int | None = None,
) -> None:
    """Create ``topics`` (name to partition count) with ``replication_factor`` replicas and, if given, their
    ``min.insync.replicas``; wait until every partition has a leader.

    A topic that already exists with the requested partition count is accepted as it is.

    Raises:
        KafkaBrokerError: creation failed, a topic exists with another partition count, or ``timeout_s`` passed.
    """
    deadline = time.monotonic() + timeout_s
    admin = AdminClient({"bootstrap.servers": bootstrap})
    config = {} if min_insync_replicas is None else {"min.insync.replicas": str(min_insync_replicas)}
    futures = admin.create_topics(
        [
            NewTopic(name, num_partitions=count, replication_factor=replication_factor, config=config)
            for name, count in topics.items()
        ],
        operation_timeout=timeout_s,
        request_timeout=timeout_s,
    )
    for name, future in futures.items():
        # exception() rather than result(): a raised and caught error would tie this frame, and so the client
        # and its broker connections, into a reference cycle that outlives the call.
        try:
            error = future.exception(timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError as e:
            raise KafkaBrokerError(f"no answer creating topic {name!r} within {timeout_s:.0f} s") from e
        if error is None or (
            isinstance(error, KafkaException) and error.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS
        ):
            continue
        raise KafkaBrokerError(f"creating topic {name!r} failed: {error}") from error
    pending = dict(topics)
    while pending:
        remaining_s = deadline - time.monotonic()
        if remaining_s <= 0:
            raise KafkaBrokerError(f"topics {sorted(pending)} not usable after {timeout_s:.0f} s")
        try:
            metadata = admin.list_topics(timeout=remaining_s)
        except KafkaException as e:
            raise KafkaBrokerError(f"broker at {bootstrap} did not answer: {e.args[0]}") from e
        for name, count in list(pending.items()):
            topic = metadata.topics.get(name)
            if topic is None or topic.error is not None:
                continue
            if len(topic.partitions) != count:
                raise KafkaBrokerError(f"topic {name!r} exists with {len(topic.partitions)} partitions, not {count}")
            if all(p.leader >= 0 and p.error is None for p in topic.partitions.values()):
                del pending[name]
        if pending:
            time.sleep(0.05)


def _pinned_kafka_version(pom_bytes: bytes) -> str:
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    version = ET.fromstring(pom_bytes).findtext("m:properties/m:kafka.version", namespaces=ns)
    if not version:
        raise KafkaBrokerError("the Kafka POM has no <kafka.version> property")
    return version.strip()


def _random_cluster_id() -> str:
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


def _tail_text(output: bytes | None) -> str:
    return (output or b"")[-_TAIL_BYTES:].decode(errors="replace")
