"""The development broker is a real Kafka: records survive a restart, and a kill, on the same data folder."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaError, Message, Producer

from aimesh.devstack.kafka import KafkaBroker, create_topics, ensure_kafka_jars
from aimesh.devstack.ports import free_ports

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
TOPIC = "broker-smoke"
RECORDS = {f"key-{i}".encode(): f"value-{i}".encode() for i in range(10)}


def _produce(bootstrap: str) -> None:
    errors: list[KafkaError] = []

    def on_delivery(err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            errors.append(err)

    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    for key, value in RECORDS.items():
        producer.produce(TOPIC, key=key, value=value, on_delivery=on_delivery)
    assert producer.flush(30) == 0
    assert errors == []


def _consume_all(bootstrap: str, timeout_s: float = 30.0) -> dict[bytes, bytes]:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"smoke-{uuid.uuid4()}",
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([TOPIC])
    seen: dict[bytes, bytes] = {}
    partitions: set[int] = set()
    deadline = time.monotonic() + timeout_s
    try:
        while len(seen) < len(RECORDS) and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            seen[msg.key()] = msg.value()
            partitions.add(msg.partition())
    finally:
        consumer.close()
    # Ten keys hash to more than one of three partitions; this shows the topic really has several.
    assert len(partitions) > 1
    return seen


def test_records_survive_restart_and_kill(tmp_path: Path) -> None:
    lib_dir = ensure_kafka_jars(REPO_ROOT / ".cache")
    port, controller_port = free_ports(2)
    broker = KafkaBroker(
        data_dir=tmp_path / "data",
        port=port,
        controller_port=controller_port,
        lib_dir=lib_dir,
        log_dir=tmp_path / "logs",
    )

    with broker:
        assert broker.pid is not None
        create_topics(broker.bootstrap, {TOPIC: 3})
        _produce(broker.bootstrap)
        assert _consume_all(broker.bootstrap) == RECORDS
    assert broker.pid is None

    with broker:
        # Already there after the restart: accepted as it is, not recreated.
        create_topics(broker.bootstrap, {TOPIC: 3})
        assert _consume_all(broker.bootstrap) == RECORDS
        broker.kill()
        assert broker.pid is None

    with broker:
        assert _consume_all(broker.bootstrap) == RECORDS

    broker.stop()
    broker.stop()
    assert broker.pid is None
    assert (tmp_path / "logs" / "server.log").stat().st_size > 0


def test_stop_is_safe_on_a_broker_never_started(tmp_path: Path) -> None:
    broker = KafkaBroker(
        data_dir=tmp_path / "data", port=1, controller_port=2, lib_dir=tmp_path / "lib", log_dir=tmp_path / "logs"
    )
    broker.stop()
    broker.kill()
    assert broker.pid is None
