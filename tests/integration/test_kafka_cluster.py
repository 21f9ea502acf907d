"""The three-node KRaft cluster the local stack runs with AIMESH_STACK_BROKERS=3, from the same jars as the single
broker: every topic, the internal ones included, on three replicas of which two must be in sync; a write
acknowledged (acks=all) with one node down and refused with two; nothing acknowledged lost."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource, ResourceType

from aimesh.devstack.kafka import (
    KafkaBrokerError,
    KafkaCluster,
    coordinator_partition,
    create_topics,
    ensure_kafka_jars,
)
from aimesh.devstack.ports import free_port_block
from aimesh.devstack.stack import StackSettings

pytestmark = pytest.mark.integration

TOPIC = "cluster-smoke"
PARTITIONS = 3
TRANSACTIONAL_ID = "cluster-probe"
GROUP = "cluster-probe-group"


# A port found free can be taken before the node binds it (by an outgoing connection's ephemeral port: the ranges
# overlap). A CI run lost the cluster that way once; a start that fails so is tried again on other ports.
PORT_TRIES = 3


@pytest.fixture(scope="module")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaCluster]:
    """One cluster for the module: the first test reads it, the second kills nodes and restarts them."""
    cluster = started_cluster(tmp_path_factory)
    try:
        create_topics(cluster.bootstrap, {TOPIC: PARTITIONS}, replication_factor=3, min_insync_replicas=2)
        yield cluster
    finally:
        cluster.stop()


def started_cluster(tmp_path_factory: pytest.TempPathFactory) -> KafkaCluster:
    lib_dir = ensure_kafka_jars(StackSettings().cache_dir / "kafka")
    for attempt in range(1, PORT_TRIES + 1):
        first = free_port_block(6)
        ports = [(first + 2 * i, first + 2 * i + 1) for i in range(3)]
        folder = tmp_path_factory.mktemp("cluster")
        cluster = KafkaCluster(data_dir=folder / "data", ports=ports, lib_dir=lib_dir, log_dir=folder / "logs")
        try:
            return cluster.__enter__()  # stops what it started if the start fails
        except KafkaBrokerError:
            logs = (log.read_text(errors="replace") for log in (folder / "logs").glob("node-*/server.log"))
            if attempt == PORT_TRIES or not any("Address already in use" in text for text in logs):
                raise
    raise AssertionError("unreachable")


def produce(bootstrap: str, count: int, **config: object) -> tuple[list[bytes], list[KafkaError]]:
    """``count`` records, one partition after another, with acks=all; the values acknowledged, and the errors."""
    acknowledged: list[bytes] = []
    errors: list[KafkaError] = []

    def on_delivery(err: KafkaError | None, msg: Message) -> None:
        if err is None:
            acknowledged.append(msg.value() or b"")
        else:
            errors.append(err)

    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "log_level": 0, **config})
    for i in range(count):
        producer.produce(TOPIC, value=uuid.uuid4().bytes, partition=i % PARTITIONS, on_delivery=on_delivery)
    assert producer.flush(60) == 0
    return acknowledged, errors


def create_internal_topics(bootstrap: str) -> None:
    """A committed transaction and a group's offset commit: the first of each creates its internal topic."""
    producer = Producer({"bootstrap.servers": bootstrap, "transactional.id": TRANSACTIONAL_ID})
    producer.init_transactions(60)
    producer.begin_transaction()
    producer.produce(TOPIC, value=b"in a transaction", partition=0)
    producer.commit_transaction(60)
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": GROUP, "enable.auto.commit": False})
    try:
        consumer.commit(offsets=[TopicPartition(TOPIC, 0, 1)], asynchronous=False)
    finally:
        consumer.close()


def read_all(bootstrap: str, expected: int) -> set[bytes]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{uuid.uuid4()}", "log_level": 0})
    consumer.assign([TopicPartition(TOPIC, p, 0) for p in range(PARTITIONS)])
    values: set[bytes] = set()
    try:
        for _ in range(60):
            values.update(m.value() or b"" for m in consumer.consume(1000, 1.0) if m.error() is None)
            if len(values) >= expected:
                break
    finally:
        consumer.close()
    return values


def test_every_topic_keeps_three_replicas_two_of_them_in_sync(kafka: KafkaCluster) -> None:
    create_internal_topics(kafka.bootstrap)
    admin = AdminClient({"bootstrap.servers": kafka.bootstrap})
    topics = (TOPIC, "__consumer_offsets", "__transaction_state")

    metadata = admin.list_topics(timeout=10)
    resources = [ConfigResource(ResourceType.TOPIC, name) for name in topics]
    configs = {r.name: f.result(timeout=10) for r, f in admin.describe_configs(resources, request_timeout=10).items()}

    for name in topics:
        assert {len(p.replicas) for p in metadata.topics[name].partitions.values()} == {3}, name
        assert configs[name]["min.insync.replicas"].value == "2", name
    # Which node coordinates a transactional id: the one whose log says it took that id on.
    coordinator = kafka.transaction_coordinator(TRANSACTIONAL_ID)
    partition = coordinator_partition(TRANSACTIONAL_ID, len(metadata.topics["__transaction_state"].partitions))
    line = f"Initialized transactionalId {TRANSACTIONAL_ID} with producerId"
    logs = [node.server_log.read_text() for node in kafka.nodes]
    assert [i for i, log in enumerate(logs) if line in log] == [coordinator]
    assert f"on partition __transaction_state-{partition}" in logs[coordinator]


def test_writes_go_on_with_one_node_down_and_stop_with_two(kafka: KafkaCluster) -> None:
    first = kafka.leader(TOPIC, 0)
    second = (first + 1) % 3

    kafka.nodes[first].kill()
    one_down, errors = produce(kafka.bootstrap, 30, **{"enable.idempotence": True})
    assert errors == [] and len(one_down) == 30

    kafka.nodes[second].kill()
    two_down, errors = produce(kafka.bootstrap, 3, **{"message.timeout.ms": 6000})
    # One node is short of min.insync.replicas and, its quorum gone too, cannot even drop the dead from the ISR:
    # the write waits until it times out (with controllers apart it would be NOT_ENOUGH_REPLICAS at once).
    assert two_down == [] and len(errors) == 3, errors
    print(f"with two nodes down: {sorted({e.name() for e in errors})}")

    for index in (first, second):
        kafka.nodes[index].start()  # each refused until its killed predecessor's session (4 s) expired
    kafka.wait_ready(120)
    kafka.wait_in_sync(120)
    assert set(one_down) <= read_all(kafka.bootstrap, len(one_down))
