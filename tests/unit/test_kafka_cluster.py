"""The local stack's Kafka as one node or a three-node cluster: each node's configuration, how storage is
formatted, which node coordinates what, and the stack settings that pick one or the other. No JVM runs here."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest
from confluent_kafka.admin._metadata import ClusterMetadata, PartitionMetadata, TopicMetadata

from aimesh.devstack import stack as stack_module
from aimesh.devstack.kafka import (
    KafkaBroker,
    KafkaBrokerError,
    KafkaCluster,
    coordinator_partition,
    replication_for,
)
from aimesh.devstack.kafka_cluster import _partitions_out_of_sync
from aimesh.devstack.stack import Stack, StackSettings, StackState, stop_from_state, write_state

THREE_NODES = [(19092, 19093), (19094, 19095), (19096, 19097)]


def cluster(tmp_path: Path, ports: Sequence[tuple[int, int]]) -> KafkaCluster:
    return KafkaCluster(data_dir=tmp_path / "data", ports=ports, lib_dir=tmp_path / "lib", log_dir=tmp_path / "logs")


def properties(node: KafkaBroker) -> dict[str, str]:
    lines = node._server_properties().splitlines()
    return dict(line.split("=", 1) for line in lines)


def test_a_single_node_keeps_the_quick_start_settings(tmp_path: Path) -> None:
    (node,) = cluster(tmp_path, [(19092, 19093)]).nodes
    settings = properties(node)

    assert settings["node.id"] == "1"
    assert settings["controller.quorum.bootstrap.servers"] == "127.0.0.1:19093"
    assert "controller.quorum.voters" not in settings
    assert settings["log.dirs"] == str((tmp_path / "data" / "kraft-logs").resolve())
    # The single-node workaround stays: its controlled shutdown would leave partitions leaderless mid-commit.
    assert settings["controlled.shutdown.enable"] == "false"
    for key in (
        "offsets.topic.replication.factor",
        "transaction.state.log.replication.factor",
        "transaction.state.log.min.isr",
        "offsets.topic.num.partitions",
        "transaction.state.log.num.partitions",
    ):
        assert settings[key] == "1", key
    assert "min.insync.replicas" not in settings
    assert "default.replication.factor" not in settings


def test_three_nodes_form_one_quorum_and_keep_every_topic_on_three_replicas(tmp_path: Path) -> None:
    nodes = cluster(tmp_path, THREE_NODES).nodes
    settings = [properties(node) for node in nodes]

    assert [s["node.id"] for s in settings] == ["1", "2", "3"]
    voters = "1@127.0.0.1:19093,2@127.0.0.1:19095,3@127.0.0.1:19097"
    assert all(s["controller.quorum.voters"] == voters for s in settings)
    assert all("controller.quorum.bootstrap.servers" not in s for s in settings)
    assert [s["listeners"] for s in settings] == [
        f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}" for port, controller in THREE_NODES
    ]
    assert len({s["log.dirs"] for s in settings}) == 3
    for s in settings:
        assert s["default.replication.factor"] == "3"
        assert s["min.insync.replicas"] == "2"
        assert s["offsets.topic.replication.factor"] == "3"
        assert s["transaction.state.log.replication.factor"] == "3"
        assert s["transaction.state.log.min.isr"] == "2"
        assert s["controlled.shutdown.enable"] == "true"


def test_a_cluster_lists_every_node_to_its_clients(tmp_path: Path) -> None:
    kafka = cluster(tmp_path, THREE_NODES)

    assert kafka.bootstrap == "127.0.0.1:19092,127.0.0.1:19094,127.0.0.1:19096"
    assert kafka.pids() == {}


class FormatCommands:
    """Stands in for ``subprocess.run`` of the storage tool: records each command, formats nothing."""

    def __init__(self) -> None:
        self.commands: list[list[str]] = []

    def __call__(self, command: list[str], **_: object) -> subprocess.CompletedProcess[bytes]:
        self.commands.append(command)
        return subprocess.CompletedProcess(command, 0, b"")

    def cluster_ids(self) -> list[str]:
        return [command[command.index("-t") + 1] for command in self.commands]


def format_every_node(kafka: KafkaCluster, monkeypatch: pytest.MonkeyPatch) -> FormatCommands:
    commands = FormatCommands()
    monkeypatch.setattr(subprocess, "run", commands)
    for node in kafka.nodes:
        node._format_storage(Path("server.properties"))
    return commands


def test_every_node_of_a_cluster_is_formatted_with_one_cluster_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    commands = format_every_node(cluster(tmp_path, THREE_NODES), monkeypatch)

    assert len(set(commands.cluster_ids())) == 1
    # Static voters: --standalone would start a quorum of one on each node.
    assert not any("--standalone" in command for command in commands.commands)


def test_a_lone_node_formats_a_quorum_of_its_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    commands = format_every_node(cluster(tmp_path, [(19092, 19093)]), monkeypatch)

    assert "--standalone" in commands.commands[0]


def write_meta(data_dir: Path, cluster_id: str) -> None:
    (data_dir / "kraft-logs").mkdir(parents=True)
    (data_dir / "kraft-logs" / "meta.properties").write_text(f"version=1\ncluster.id={cluster_id}\nnode.id=2\n")


def test_a_node_formatted_later_joins_the_cluster_of_those_formatted_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_meta(tmp_path / "data" / "node-1", "MkU3OEVBNTcwNTJENDM2Qg")

    commands = format_every_node(cluster(tmp_path, THREE_NODES), monkeypatch)

    assert set(commands.cluster_ids()) == {"MkU3OEVBNTcwNTJENDM2Qg"}


def test_node_folders_of_two_clusters_are_refused(tmp_path: Path) -> None:
    write_meta(tmp_path / "data" / "node-0", "MkU3OEVBNTcwNTJENDM2Qg")
    write_meta(tmp_path / "data" / "node-2", "a2fJ3kLmQ0uY7xTzR1s9vA")

    with pytest.raises(KafkaBrokerError, match="different clusters"):
        cluster(tmp_path, THREE_NODES)


@pytest.mark.parametrize(
    ("key", "partitions", "expected"),
    [
        # Expected values from Java: Utils.abs(key.hashCode()) % partitions, run on a JDK.
        ("hello", 50, 22),
        ("aimesh-worker-worker-0", 3, 2),
        ("aimesh-worker-worker-1", 3, 0),
        ("aimesh-workers", 50, 39),
        ("zzzzzzzzzz", 50, 36),  # a negative hash
        ("polygenelubricants", 3, 0),  # hashes to Integer.MIN_VALUE, which Utils.abs maps to 0
        ("Ωmega-\U0001f600-txn", 50, 4),  # outside the BMP: a surrogate pair in Java's UTF-16
    ],
)
def test_coordinator_partition_is_the_one_kafka_picks(key: str, partitions: int, expected: int) -> None:
    assert coordinator_partition(key, partitions) == expected


def test_three_replicas_two_in_sync_once_there_are_three_nodes() -> None:
    assert replication_for(1) == (1, 1)
    assert replication_for(3) == (3, 2)
    assert replication_for(5) == (3, 2)


def metadata(partitions: dict[int, tuple[int, list[int], list[int]]]) -> ClusterMetadata:
    """Cluster metadata of one topic ``t``: partition to (leader, replicas, in-sync replicas)."""
    topic = TopicMetadata()
    topic.topic = "t"
    for number, (leader, replicas, isrs) in partitions.items():
        partition = PartitionMetadata()
        partition.id, partition.leader, partition.replicas, partition.isrs = number, leader, replicas, isrs
        topic.partitions[number] = partition
    described = ClusterMetadata()
    described.topics = {"t": topic}
    return described


def test_a_partition_is_in_sync_only_with_a_leader_and_every_replica_caught_up() -> None:
    described = metadata(
        {
            0: (1, [1, 2, 3], [3, 1, 2]),
            1: (2, [1, 2, 3], [2, 3]),  # node 1 still catching up
            2: (-1, [1, 2, 3], [1, 2, 3]),  # no leader
        }
    )

    assert _partitions_out_of_sync(described) == ["t/1", "t/2"]


def test_the_stack_runs_one_broker_unless_told_three(monkeypatch: pytest.MonkeyPatch) -> None:
    assert StackSettings().kafka_ports() == [(9092, 9093)]

    monkeypatch.setenv("AIMESH_STACK_BROKERS", "3")

    assert StackSettings().kafka_ports() == [(9092, 9093), (9094, 9095), (9096, 9097)]


def test_the_stack_refuses_a_cluster_size_it_does_not_run() -> None:
    with pytest.raises(ValueError, match="brokers must be 1 or 3"):
        StackSettings(brokers=2)


def test_a_cluster_node_port_that_another_part_uses_is_refused() -> None:
    with pytest.raises(ValueError, match=r"used twice: \[9096\]"):
        StackSettings(brokers=3, triton_grpc_port=9096)


def test_a_stack_on_free_ports_gives_each_node_its_own(tmp_path: Path) -> None:
    settings = StackSettings.on_free_ports(tmp_path, brokers=3)
    kafka_ports = [port for node in settings.kafka_ports() for port in node]
    others = [settings.triton_grpc_port, settings.ingest_port, settings.notifier_port, settings.worker_metrics_port]

    assert len(set(kafka_ports)) == 6
    assert not set(kafka_ports) & set(others)


def test_the_services_get_every_node_as_their_bootstrap(tmp_path: Path) -> None:
    stack = Stack(StackSettings(brokers=3, run_dir=tmp_path))

    assert stack.service_env()["AIMESH_KAFKA_BOOTSTRAP"] == "127.0.0.1:9092,127.0.0.1:9094,127.0.0.1:9096"


def test_make_down_stops_every_kafka_node_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Each node's stop returns only once all three were asked to stop, as the last node's controlled shutdown
    # waits for a controller quorum: stopped one by one, the barrier breaks.
    all_asked = threading.Barrier(3, timeout=5)
    stopped: list[str] = []

    def stop_pid(pid: int, timeout_s: float = 30.0) -> bool:
        if pid >= 100:  # a Kafka node
            all_asked.wait()
        stopped.append(str(pid))
        return True

    monkeypatch.setattr(stack_module, "stop_pid", stop_pid)
    write_state(tmp_path, StackState(pids={"ingest": 1, "kafka-0": 100, "kafka-1": 101, "kafka-2": 102}))

    assert stop_from_state(tmp_path, say=lambda _: None)
    assert stopped[0] == "1"  # ingest first, as before
    assert sorted(stopped[1:]) == ["100", "101", "102"]
