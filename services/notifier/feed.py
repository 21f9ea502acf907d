"""Reads the tasks topics (interactive and batch) and the results topic into the TaskStore.

The notifier keeps no state of its own: at start it reads every partition of these topics from
``retention_s`` ago (``offsets_for_times``), so a restarted notifier rebuilds what late subscribers need.
It uses no consumer-group offsets; every notifier replica reads everything. One thread does all the
Kafka calls; decoded events reach the event loop in batches.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import OFFSET_END, Consumer, KafkaException, Message, TopicPartition
from opentelemetry.trace import SpanContext

from aimesh import events, tracing
from aimesh.background import BackgroundThread, OnDeath
from aimesh.errors import UndecodableRecord
from aimesh.kafka import Record, fetch
from aimesh.v1 import result_pb2, task_pb2

log = logging.getLogger(__name__)

Event = task_pb2.AITaskEvent | result_pb2.AIResultEvent


@dataclass(frozen=True)
class Decoded:
    """A record read from Kafka; ``trace`` is the context of the span that processed a result record."""

    event: Event
    trace: SpanContext | None = None


CATCH_UP_LIMIT_S = 60.0


class Feed(BackgroundThread):
    """Streams decoded events of ``topics`` to ``deliver`` on ``loop``; ``caught_up`` is set once the
    history present at start was read (or after CATCH_UP_LIMIT_S, so an open transaction cannot hold
    the notifier unready). If its thread dies, ``on_death`` is told (see ``BackgroundThread``)."""

    def __init__(
        self,
        consumer_config: dict[str, Any],
        *,
        tasks_topics: tuple[str, ...],
        results_topic: str,
        history_s: float,
        deliver: Callable[[list[Decoded]], None],
        loop: asyncio.AbstractEventLoop,
        on_death: OnDeath | None = None,
    ) -> None:
        super().__init__("notifier-feed", on_death=on_death)
        self._config = consumer_config
        self._group = str(consumer_config["group.id"])
        self._tasks_topics = frozenset(tasks_topics)
        self._topics = (*dict.fromkeys(tasks_topics), results_topic)  # each once, in order
        self._history_s = history_s
        self._deliver = deliver
        self._loop = loop
        self.caught_up = asyncio.Event()

    def run(self) -> None:
        consumer = Consumer(self._config, logger=log)
        try:
            partitions = self._start_positions(consumer)
            consumer.assign(partitions)
            targets: dict[tuple[str, int], int] | None = self._targets(consumer, partitions)
            started = time.monotonic()
            log.info("reading %d partitions from %.0fs of history", len(partitions), self._history_s)
            while not self.stopping.is_set():
                batch = fetch(consumer, 500, 0.1)
                decoded = [e for e in map(self._decode, batch) if e is not None]
                if decoded:
                    self._loop.call_soon_threadsafe(self._deliver, decoded)
                if targets is not None and (
                    self._reached(consumer, targets) or time.monotonic() - started > CATCH_UP_LIMIT_S
                ):
                    targets = None
                    log.info("history read in %.2fs", time.monotonic() - started)
                    self._loop.call_soon_threadsafe(self.caught_up.set)
        finally:
            consumer.close()

    def _start_positions(self, consumer: Consumer) -> list[TopicPartition]:
        since_ms = int((time.time() - self._history_s) * 1000)
        wanted: list[TopicPartition] = []
        for topic in self._topics:
            while not self.stopping.is_set():
                metadata = consumer.list_topics(topic, timeout=10).topics.get(topic)
                if metadata is not None and metadata.error is None and metadata.partitions:
                    wanted.extend(TopicPartition(topic, p, since_ms) for p in metadata.partitions)
                    break
                log.warning("topic %s is not available yet; waiting", topic)
                time.sleep(1.0)
        found = consumer.offsets_for_times(wanted, timeout=30) if wanted else []
        # No record at or after the time: start at the end (nothing of interest is older).
        return [TopicPartition(p.topic, p.partition, p.offset if p.offset >= 0 else OFFSET_END) for p in found]

    @staticmethod
    def _targets(consumer: Consumer, partitions: list[TopicPartition]) -> dict[tuple[str, int], int]:
        targets: dict[tuple[str, int], int] = {}
        for p in partitions:
            low, high = consumer.get_watermark_offsets(p, timeout=10, cached=False)
            start = p.offset if p.offset >= 0 else high
            if start < high:
                targets[(p.topic, p.partition)] = high
        return targets

    @staticmethod
    def _reached(consumer: Consumer, targets: dict[tuple[str, int], int]) -> bool:
        try:
            positions = consumer.position([TopicPartition(t, p) for t, p in targets])
        except KafkaException as e:
            log.debug("position unavailable: %s", e)
            return False
        return all(p.offset >= targets[(p.topic, p.partition)] for p in positions)

    def _decode(self, message: Message) -> Decoded | None:
        if message.error():
            log.warning("feed consumer error: %s", message.error())
            return None
        record = Record.of(message)
        try:
            if record.topic in self._tasks_topics:
                return Decoded(events.decode_task(record.value))
            with tracing.process_span(
                record.topic,
                key=(record.key or b"").decode("utf-8", "replace"),
                partition=record.partition,
                offset=record.offset,
                group=self._group,
                headers=record.headers,
            ):
                return Decoded(events.decode_result(record.value), tracing.current_span_context())
        except UndecodableRecord as e:
            log.warning("skipping undecodable record %s: %s", record.where(), e)
            return None
