"""``AsyncProducer``: the adapter between asyncio and a confluent-kafka Producer (built by ``aimesh.kafka``).

librdkafka's calls block and its delivery callbacks only run inside ``poll()``/``flush()``, so the adapter owns one
thread that polls; the event loop only ever awaits futures the thread resolves.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from aimesh import kafka
from aimesh.errors import BrokerUnavailable
from aimesh.kafka import Headers

log = logging.getLogger(__name__)


class AsyncProducer:
    """An idempotent producer whose ``produce`` coroutine returns once the broker acknowledged the record.

    A ``lifecycle.Part`` (or ``async with AsyncProducer(config) as producer``). ``stop`` flushes what is queued
    and is safe to call twice.
    """

    def __init__(self, config: dict[str, Any], *, name: str = "kafka-producer") -> None:
        self.name = name
        self._config = config
        self._producer: Producer | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    async def __aenter__(self) -> AsyncProducer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        if self._producer is not None:
            return
        self._producer = kafka.producer(self._config, logger=log)
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
