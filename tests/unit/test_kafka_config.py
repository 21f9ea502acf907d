"""Kafka security settings (SASL, SSL) pass through AIMESH_KAFKA_CONFIG into every Kafka client config."""

from __future__ import annotations

import json

import pytest

from aimesh.ingest.__main__ import MESSAGE_TIMEOUT_S, ingest_producer_config
from aimesh.kafka import consumer_config, producer_config
from aimesh.settings import IngestSettings, KafkaSettings, NotifierSettings, WorkerSettings

SASL_SSL = {
    "security.protocol": "SASL_SSL",
    "sasl.mechanisms": "SCRAM-SHA-512",
    "sasl.username": "aimesh",
    "sasl.password": "s3cret-password",
    "ssl.ca.location": "/etc/kafka/ca.pem",
}


def test_extra_properties_reach_producers_and_consumers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIMESH_KAFKA_CONFIG", json.dumps(SASL_SSL))
    extra = NotifierSettings().kafka_client_config()
    producer = producer_config("b:9092", client_id="p", delivery_timeout_s=5, extra=extra)
    consumer = consumer_config("b:9092", group_id="g", client_id="c", extra=extra)
    for config in (producer, consumer):
        assert SASL_SSL.items() <= config.items()
    assert producer["enable.idempotence"] is True and consumer["enable.auto.commit"] is False
    assert KafkaSettings().kafka_client_config() == SASL_SSL  # every service's settings carry it


def test_secrets_stay_out_of_reprs_and_errors() -> None:
    settings = KafkaSettings(kafka_config=json.dumps(SASL_SSL))
    assert "s3cret" not in repr(settings)
    broken = KafkaSettings(kafka_config='{"sasl.password": "s3cret-password",')
    with pytest.raises(ValueError, match="not JSON") as info:
        broken.kafka_client_config()
    assert "s3cret" not in str(info.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('["security.protocol"]', "JSON object"),
        ('{"acks": "1", "enable.idempotence": false}', "acks, enable.idempotence"),
        ('{"group.id": "mine"}', "group.id"),
        ('{"ssl.keystore": {"nested": true}}', "strings, numbers or booleans"),
    ],
)
def test_properties_aimesh_depends_on_are_refused(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        KafkaSettings(kafka_config=text).kafka_client_config()


def test_unset_means_no_extra_properties() -> None:
    assert KafkaSettings(kafka_config="").kafka_client_config() == {}
    assert producer_config("b:9092", client_id="p", delivery_timeout_s=5)["bootstrap.servers"] == "b:9092"


def test_worker_group_protocols() -> None:
    """The consumer protocol leaves assignment and session timing to the broker (librdkafka refuses the classic
    settings with it); classic keeps the client-side cooperative-sticky assignor."""
    consumer = consumer_config("b:9092", group_id="g", client_id="c", group_protocol="consumer")
    assert consumer["group.protocol"] == "consumer" and consumer["group.remote.assignor"] == "range"
    assert not {"partition.assignment.strategy", "session.timeout.ms", "heartbeat.interval.ms"} & consumer.keys()
    classic = consumer_config("b:9092", group_id="g", client_id="c", group_protocol="classic")
    assert classic["partition.assignment.strategy"] == "cooperative-sticky" and "group.protocol" not in classic


def test_a_consumer_follows_the_worker_groups_protocol_unless_told_otherwise() -> None:
    default = consumer_config("b:9092", group_id="g", client_id="c")
    assert default.get("group.protocol", "classic") == WorkerSettings.model_fields["worker_group_protocol"].default


def test_the_assignment_protocol_cannot_be_overridden() -> None:
    with pytest.raises(ValueError, match="group.protocol"):
        KafkaSettings(kafka_config='{"group.protocol": "classic"}').kafka_client_config()


def test_ingest_keeps_delivering_long_after_it_answers_the_client() -> None:
    # A record that times out in flight makes the idempotent producer bump its epoch and resend the others in
    # flight as new records: duplicate tasks (tests/fault/test_broker_cluster.py). The client's answer comes after
    # AIMESH_PUBLISH_TIMEOUT_S; librdkafka keeps trying for a minute.
    config = ingest_producer_config(IngestSettings(publish_timeout_s=2.0))
    assert config["message.timeout.ms"] == MESSAGE_TIMEOUT_S * 1000 >= 60_000
    assert config["enable.idempotence"] is True and config["acks"] == "all"
    longer = ingest_producer_config(IngestSettings(publish_timeout_s=90.0))
    assert longer["message.timeout.ms"] == 90_000
    # A key in doubt outlives its record's last chance to land.
    short_keys = ingest_producer_config(IngestSettings(publish_timeout_s=2.0, idempotency_ttl_s=30.0))
    assert short_keys["message.timeout.ms"] == 15_000
