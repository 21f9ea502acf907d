"""Thin adapters over confluent-kafka: every client of the services and of the local stack is built here.

The clients (``consumer``, ``producer``, ``admin``; ``kafka_producer.AsyncProducer`` wraps one for asyncio) and
their settings (``producer_config``, ``consumer_config``, ``reader_config``, ``client_id_for``) are built here, and
the jobs several parts share are done here: reading a topic from a time or its end (``assign_topic``,
``offsets_at``), a consumer group's committed offsets (``committed``) and its lag (``group_lag``).

Outside the services and the local stack, the benchmarks build bare confluent-kafka clients on purpose, to measure
Kafka without aimesh, and tests may, to ask the broker directly.
"""

from __future__ import annotations

import logging
import threading
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from confluent_kafka import OFFSET_END, Consumer, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, ClusterMetadata  # type: ignore[attr-defined]  # no __all__ there

from aimesh.settings import WorkerSettings

log = logging.getLogger(__name__)

Headers = list[tuple[str, str | bytes | None]]
TopicPartitionKey = tuple[str, int]
GroupProtocol = Literal["classic", "consumer"]
# AIMESH_WORKER_GROUP_PROTOCOL's default, read from the settings rather than written twice.
DEFAULT_GROUP_PROTOCOL: GroupProtocol = WorkerSettings.model_fields["worker_group_protocol"].default


def consumer(config: Mapping[str, Any], *, logger: logging.Logger = log) -> Consumer:
    """A Consumer with ``config``; librdkafka's log lines go to ``logger`` (the caller's module logger)."""
    return Consumer(dict(config), logger=logger)


def producer(config: Mapping[str, Any], *, logger: logging.Logger = log) -> Producer:
    """A Producer with ``config``; librdkafka's log lines go to ``logger`` (the caller's module logger)."""
    return Producer(dict(config), logger=logger)


def admin(config: Mapping[str, Any], *, logger: logging.Logger | None = None) -> AdminClient:
    """An AdminClient with ``config``. librdkafka writes its log lines to stderr itself (``log_level`` in ``config``
    quiets them), unless ``logger`` is given: then they wait in the client's queue until its ``poll()`` hands them
    to ``logger``, and an AdminClient's own calls never poll it."""
    return AdminClient(dict(config), logger=logger)


def client_id_for(config: Mapping[str, Any], part: str, *, default: str) -> str:
    """The ``client.id`` of a client a part builds beside the main one whose settings are ``config``: that one's
    (``default`` where it has none) with ``-part`` added, so that the broker's logs and quotas tell them apart."""
    return f"{config.get('client.id', default)}-{part}"


def producer_config(
    bootstrap: str,
    *,
    client_id: str,
    delivery_timeout_s: float,
    message_timeout_s: float | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Settings for a producer whose delivery report means "durable".

    ``enable.idempotence`` implies ``acks=all`` and ordered, duplicate-free retries; a record that is not
    acknowledged within ``message_timeout_s`` (default ``delivery_timeout_s``) fails its delivery report instead of
    waiting forever. ``extra`` (``KafkaSettings.kafka_client_config()``: security.protocol, sasl.*, ssl.*) is merged
    last.
    """
    config: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "client.id": client_id,
        "enable.idempotence": True,
        "acks": "all",
        # Latency first: a record goes out at once, and records that queue up while requests are in flight (under
        # load) still share a batch. Measured on the local broker, one 200-byte record until its acknowledgement:
        # p50 5.8 ms with linger.ms=2 and lz4, 2.2 ms with linger.ms=0, 0.8 ms with no compression as well (the
        # broker decompresses every batch to validate it). Task records are small; AIMESH_KAFKA_CONFIG may set
        # compression.type where bandwidth matters more.
        "linger.ms": 0,
        "compression.type": "none",
        # Small records: Nagle's algorithm would hold them back for the peer's delayed ACK.
        "socket.nagle.disable": True,
        # One produce request at a time: a lone record still goes at once, and records that arrive while it is
        # in flight go out together in the next one. With librdkafka's default of 5, a burst (the progress updates
        # of the tens of tasks a finished Triton batch lets start) went out as many small requests, each one
        # broker work: at concurrency 128 on the 2-core benchmark machine, mesh / direct 0.81-0.85 with 5, 0.92-0.95
        # with 1.
        "max.in.flight.requests.per.connection": 1,
        "message.timeout.ms": max(1, int((message_timeout_s or delivery_timeout_s) * 1000)),
        "socket.connection.setup.timeout.ms": max(1000, int(delivery_timeout_s * 1000)),
    }
    config.update(extra or {})
    return config


@dataclass(frozen=True)
class Record:
    """A consumed record with the optional parts of librdkafka's Message pinned down."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers

    @classmethod
    def of(cls, message: Message) -> Record:
        topic, partition, offset = message.topic(), message.partition(), message.offset()
        if topic is None or partition is None or offset is None:
            raise ValueError("not a consumed record")
        key = message.key()
        headers = message.headers()
        return cls(
            topic=topic,
            partition=partition,
            offset=offset,
            key=key.encode() if isinstance(key, str) else key,
            value=message.value() if isinstance(message.value(), bytes | None) else None,
            headers=list(headers.items()) if isinstance(headers, dict) else list(headers or []),
        )

    def where(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}"


def partition_of(key: bytes, partitions: int) -> int:
    """The partition librdkafka's default partitioner (``consistent_random``: CRC-32 of the key) picks for a
    keyed record; every aimesh producer uses it."""
    return zlib.crc32(key) % partitions


def fetch(consumer: Consumer, max_messages: int, timeout_s: float) -> list[Message]:
    """Up to ``max_messages`` records, returning as soon as one is there (or after ``timeout_s``).

    ``Consumer.consume(n, timeout)`` waits for all ``n`` records or the whole timeout, which adds the
    timeout to every record's latency at light load; ``poll`` returns on the first record, and a
    non-blocking ``consume`` then takes whatever else is already fetched.
    """
    messages = consumer.consume(max_messages, 0)
    if messages or max_messages <= 0:
        return messages
    first = consumer.poll(timeout_s)
    if first is None:
        return []
    return [first, *consumer.consume(max_messages - 1, 0)] if max_messages > 1 else [first]


# What consumer_config adds for a group member's rebalance protocol: left out of a client that reads a group's
# committed offsets without joining it.
GROUP_MEMBER_PROPERTIES = ("group.protocol", "group.remote.assignor", "partition.assignment.strategy")


def consumer_config(
    bootstrap: str,
    *,
    group_id: str,
    client_id: str,
    group_protocol: GroupProtocol = DEFAULT_GROUP_PROTOCOL,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Settings for a consumer that commits only what it says is done.

    Auto-commit and the automatic offset store are off: offsets are committed explicitly after a task's
    result is durable. Either rebalance protocol moves only the partitions that must move (the default is
    ``AIMESH_WORKER_GROUP_PROTOCOL``'s):

    - ``classic``: the client-side cooperative-sticky assignor; the session timeout is the client's (10 s).
    - ``consumer`` (KIP-848, Kafka 4): the broker assigns, with its ``range`` assignor, which spreads *each topic*
      over the members. (cooperative-sticky and the broker's ``uniform`` assignor balance partition counts over
      all topics together, so with two tasks topics one member can end up owning all of one topic.) Session and
      heartbeat timing are the broker's ``group.consumer.*`` settings.

    ``extra`` (overrides, and ``KafkaSettings.kafka_client_config()``: security.protocol, sasl.*, ssl.*) is merged last.
    """
    config: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "group.id": group_id,
        "client.id": client_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "isolation.level": "read_committed",
        "max.poll.interval.ms": 300_000,
        "socket.nagle.disable": True,
    }
    if group_protocol == "consumer":
        config.update({"group.protocol": "consumer", "group.remote.assignor": "range"})
    else:
        config.update(
            {
                "partition.assignment.strategy": "cooperative-sticky",
                "session.timeout.ms": 10_000,
                "heartbeat.interval.ms": 1_000,
            }
        )
    config.update(extra or {})
    return config


def reader_config(config: Mapping[str, Any], *, group_id: str | None = None) -> dict[str, Any]:
    """Settings for a consumer that reads partitions it assigns itself and never joins its group or commits:
    ``config`` without the rebalance protocol's properties, auto-commit and the automatic offset store off.
    ``group_id`` replaces the config's: librdkafka wants one even so (the group whose committed offsets it reads,
    or a name never joined)."""
    reader = {k: v for k, v in config.items() if k not in GROUP_MEMBER_PROPERTIES}
    reader.update({"enable.auto.commit": False, "enable.auto.offset.store": False})
    if group_id is not None:
        reader["group.id"] = group_id
    return reader


def partitions_in(metadata: ClusterMetadata, topic: str) -> list[int]:
    """The partitions of ``topic`` in ``metadata`` (a ``list_topics`` answer), sorted; none while the topic does
    not exist."""
    found = metadata.topics.get(topic)
    if found is None or found.error is not None:
        return []
    return sorted(found.partitions)


def topic_partitions(client: Consumer, topic: str, timeout_s: float) -> list[int]:
    """The partitions of ``topic``, sorted; none while it does not exist. Raises KafkaException."""
    return partitions_in(client.list_topics(topic, timeout=timeout_s), topic)


def offsets_at(
    consumer: Consumer, partitions: Iterable[TopicPartitionKey], since_ms: int, timeout_s: float
) -> dict[TopicPartitionKey, int]:
    """The offset of the first record with a timestamp at or after ``since_ms`` in each of ``partitions``;
    OFFSET_END where there is none (nothing of the partition is that recent). Raises KafkaException."""
    wanted = [TopicPartition(topic, partition, since_ms) for topic, partition in partitions]
    found = consumer.offsets_for_times(wanted, timeout=timeout_s) if wanted else []
    return {(tp.topic, tp.partition): tp.offset if tp.offset >= 0 else OFFSET_END for tp in found}


def assign_topic(consumer: Consumer, topic: str, *, since_ms: int | None, timeout_s: float) -> int:
    """Assign every partition of ``topic``, each from its first record at or after ``since_ms`` (0: from its
    start; None: from its end). Returns how many partitions it assigned: 0, assigning nothing, while the topic
    does not exist. Raises KafkaException."""
    keys = [(topic, partition) for partition in topic_partitions(consumer, topic, timeout_s)]
    if not keys:
        return 0
    starts = dict.fromkeys(keys, OFFSET_END) if since_ms is None else offsets_at(consumer, keys, since_ms, timeout_s)
    consumer.assign([TopicPartition(t, p, offset) for (t, p), offset in starts.items()])
    return len(starts)


def committed(
    consumer: Consumer, partitions: Iterable[TopicPartitionKey], timeout_s: float
) -> dict[TopicPartitionKey, tuple[int, str]]:
    """The committed offset and that commit's metadata ("" for none) of the group ``consumer`` names (``group.id``;
    it need not join, see ``reader_config``) in each of ``partitions`` where it committed one: one OffsetFetch to
    the group's coordinator, none when no partition is asked for. Raises KafkaException."""
    asked = [TopicPartition(topic, partition) for topic, partition in partitions]
    found = consumer.committed(asked, timeout=timeout_s) if asked else []
    return {
        (tp.topic, tp.partition): (tp.offset, tp.metadata or "") for tp in found if tp.error is None and tp.offset >= 0
    }


@dataclass(frozen=True)
class PartitionLag:
    """Where a consumer group stands in one partition: its committed offset (-1: none) and that commit's metadata,
    and the partition's low and high watermarks."""

    committed: int
    metadata: str
    low: int
    high: int

    @property
    def position(self) -> int:
        """Where the group reads from: its committed offset, or the log start where it committed none (aimesh's
        consumers start from the earliest record)."""
        return self.committed if self.committed >= 0 else self.low

    @property
    def records(self) -> int:
        """Records from the group's position to the end of the partition."""
        return max(0, self.high - self.position)


def group_lag(
    consumer: Consumer,
    partitions: Iterable[TopicPartitionKey],
    timeout_s: float,
    *,
    known: Mapping[TopicPartitionKey, int] | None = None,
    stop: threading.Event | None = None,
) -> dict[TopicPartitionKey, PartitionLag]:
    """The lag of the group ``consumer`` names (``group.id``; it need not join, see ``reader_config``) in each of
    ``partitions``: the group's committed offsets (one OffsetFetch to its coordinator, not asked for the partitions
    whose offset ``known`` gives) and each partition's watermarks, asked of the broker (a paused partition is not
    fetched, so its cached watermarks go stale). Once ``stop`` is set it returns what it has. Raises
    KafkaException."""
    keys = list(partitions)
    found = {key: (offset, "") for key, offset in (known or {}).items()}
    found.update(committed(consumer, [key for key in keys if key not in found], timeout_s))
    lags: dict[TopicPartitionKey, PartitionLag] = {}
    for topic, partition in keys:
        if stop is not None and stop.is_set():
            break
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=timeout_s, cached=False)
        offset, metadata = found.get((topic, partition), (-1, ""))
        lags[(topic, partition)] = PartitionLag(offset, metadata, low, high)
    return lags
