"""Several Kafka nodes on one machine as one cluster (``KafkaCluster``), and which node leads or coordinates what."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Sequence
from pathlib import Path

from confluent_kafka import ElectionType, KafkaError, KafkaException
from confluent_kafka.admin import AdminClient
from confluent_kafka.admin._metadata import ClusterMetadata

from aimesh import kafka as kafka_adapter

from .kafka_broker import DEFAULT_LOG4J_CONFIG, SEGMENTS, KafkaBroker, KafkaBrokerError, random_cluster_id
from .process import Launched

_TRANSACTION_STATE_TOPIC = "__transaction_state"


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
        cluster_id = _formatted_cluster_id(data_dirs) or random_cluster_id()
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
        return kafka_adapter.admin({"bootstrap.servers": self.bootstrap, "log_level": 0})

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
        meta = data_dir / SEGMENTS / "meta.properties"
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
