"""Thin asyncio adapters over confluent-kafka: everything in aimesh talks to Kafka through here.

librdkafka's calls block and its delivery callbacks only run inside ``poll()``/``flush()``, so each
adapter owns one thread that polls; the event loop only ever awaits futures the thread resolves.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer

from aimesh.errors import BrokerUnavailable

log = logging.getLogger(__name__)

Headers = list[tuple[str, str | bytes | None]]


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


class AsyncProducer:
    """An idempotent producer whose ``produce`` coroutine returns once the broker acknowledged the record.

    Use as ``async with AsyncProducer(config) as producer``. ``stop`` flushes what is queued and is safe to
    call twice.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self._config = config
        self._producer: Producer | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    async def __aenter__(self) -> AsyncProducer:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def start(self) -> None:
        if self._producer is not None:
            return
        self._producer = Producer(self._config, logger=log)
        self._thread = threading.Thread(target=self._poll_loop, name="kafka-producer-poll", daemon=True)
        self._thread.start()

    def _poll_loop(self) -> None:
        assert self._producer is not None
        while not self._stopping.is_set():
            self._producer.poll(0.05)

    async def produce(self, topic: str, *, key: str, value: bytes, headers: Headers | None = None) -> Message:
        """Publish one record and wait for its delivery report.

        Raises ``BrokerUnavailable`` when the broker did not acknowledge it (the record is then not
        durable, though it may still have been written).
        """
        return await self.produce_nowait(topic, key=key, value=value, headers=headers)

    def produce_nowait(
        self, topic: str, *, key: str, value: bytes, headers: Headers | None = None
    ) -> asyncio.Future[Message]:
        """Queue one record; the returned future resolves with its delivery report."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Message] = loop.create_future()

        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            # Runs on the poll thread: hand the outcome to the loop that is waiting for it.
            loop.call_soon_threadsafe(_settle, future, err, msg)

        self._queue(topic, key, value, headers, on_delivery)
        return future

    def produce_detached(self, topic: str, *, key: str, value: bytes, headers: Headers | None = None) -> None:
        """Queue one record that nobody waits for (a best-effort progress update): no future and no hop back to
        the event loop, which cost more than the record itself on a busy worker. A failed delivery is logged."""
        self._queue(topic, key, value, headers, _log_undelivered)

    def _queue(
        self,
        topic: str,
        key: str,
        value: bytes,
        headers: Headers | None,
        on_delivery: Callable[[KafkaError | None, Message], None],
    ) -> None:
        if self._producer is None:
            raise RuntimeError("producer is not started")
        try:
            self._producer.produce(topic, key=key, value=value, headers=headers, on_delivery=on_delivery)
        except BufferError as e:
            raise BrokerUnavailable("the producer queue is full: the broker is not keeping up") from e
        except KafkaException as e:
            raise BrokerUnavailable(f"cannot queue the record: {e.args[0]}") from e

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Flush queued records (up to ``timeout_s``), then stop the poll thread. Idempotent."""
        if self._producer is None or self._stopping.is_set():
            return
        producer = self._producer
        remaining = await asyncio.to_thread(producer.flush, timeout_s)
        if remaining:
            log.warning("producer stopped with %d records not delivered", remaining)
        self._stopping.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)


def _log_undelivered(err: KafkaError | None, msg: Message) -> None:
    if err is not None:
        log.debug("record for %s[%s] not delivered: %s", msg.topic(), msg.key(), err.str())


def _settle(future: asyncio.Future[Message], err: KafkaError | None, msg: Message) -> None:
    if future.done():
        return
    if err is not None:
        future.set_exception(BrokerUnavailable(f"delivery failed: {err.str()}", kafka_error=err))
    else:
        future.set_result(msg)


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
    group_protocol: Literal["classic", "consumer"] = "classic",
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Settings for a consumer that commits only what it says is done.

    Auto-commit and the automatic offset store are off: offsets are committed explicitly after a task's
    result is durable. Either rebalance protocol moves only the partitions that must move:

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
