"""Cancellations: every worker reads the whole cancellations topic and remembers which tasks were cancelled.

The topic carries AICancelEvent records (key: task id) that the notifier writes when a tenant asks to cancel a
task. Each worker reads every partition with no consumer group (nothing is committed), starting from the records
of the last ``window_s`` seconds, so a worker that starts knows of the recent cancellations too; a cancellation
older than the window is forgotten (its task is long queued or done by then in any sane deployment).

The reader runs in its own thread with its own Consumer: the task consumer's poll loop never waits on it.
Undecodable records are logged and skipped: they are not tasks, no result or dead letter is owed for them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer, KafkaException

from aimesh import events, kafka
from aimesh.background import BackgroundThread
from aimesh.errors import UndecodableRecord
from aimesh.kafka import fetch

log = logging.getLogger(__name__)

POLL_TIMEOUT_S = 0.2
# While the topic is missing or the broker does not answer, the reader tries again this often.
SETUP_RETRY_S = 2.0
SETUP_TIMEOUT_S = 5.0


class Cancellations:
    """The task ids cancelled in the last ``window_s`` seconds, with the tenants that asked. Thread-safe."""

    def __init__(self, window_s: float, *, clock: Callable[[], float] = time.time) -> None:
        self._window_s = window_s
        self._clock = clock
        self._lock = threading.Lock()
        # task id -> (tenants that asked, when the first one was learned); insertion order is learning order.
        self._cancelled: OrderedDict[str, tuple[frozenset[str], float]] = OrderedDict()

    def add(self, task_id: str, tenant: str) -> None:
        with self._lock:
            tenants, since = self._cancelled.get(task_id, (frozenset(), self._clock()))
            self._cancelled[task_id] = (tenants | {tenant}, since)
            self._prune()

    def is_cancelled(self, task_id: str, tenant: str) -> bool:
        """Whether ``tenant`` (the task's own) asked to cancel the task. A record from another tenant is ignored:
        the notifier checks ownership before writing one, this is defence in depth."""
        with self._lock:
            entry = self._cancelled.get(task_id)
            return entry is not None and tenant in entry[0]

    def __len__(self) -> int:
        with self._lock:
            return len(self._cancelled)

    def _prune(self) -> None:
        oldest = self._clock() - self._window_s
        while self._cancelled:
            task_id, (_, since) = next(iter(self._cancelled.items()))
            if since >= oldest:
                break
            del self._cancelled[task_id]


class CancellationReader(BackgroundThread):
    """Reads ``topic`` into ``cancellations`` on a thread of its own (a ``lifecycle.Part``) until stopped;
    ``on_cancel(task_id, tenant)`` is called (on the reader's thread) for each record read. It outlives broker
    trouble; anything else that ends it is reported to ``on_death``."""

    def __init__(
        self,
        consumer_config: dict[str, Any],
        topic: str,
        cancellations: Cancellations,
        *,
        window_s: float,
        on_cancel: Callable[[str, str], None] = lambda task_id, tenant: None,
        on_undecodable: Callable[[str], None] = lambda reason: None,
    ) -> None:
        super().__init__("kafka-cancels")
        self._config = kafka.reader_config(consumer_config)  # assigns every partition itself: never joins
        self._topic = topic
        self._cancellations = cancellations
        self._window_s = window_s
        self._on_cancel = on_cancel
        self._on_undecodable = on_undecodable
        self.assigned = threading.Event()  # set once the reader reads every partition

    def run(self) -> None:
        stop = self.stopping
        consumer = kafka.consumer(self._config, logger=log)
        try:
            while not stop.is_set() and not self._assign(consumer):
                stop.wait(SETUP_RETRY_S)
            while not stop.is_set():
                try:
                    messages = fetch(consumer, 100, POLL_TIMEOUT_S)  # returns on the first record
                except KafkaException as e:  # the reader must outlive broker trouble: try again
                    log.warning("cancellations consumer failed, retrying: %s", e)
                    stop.wait(SETUP_RETRY_S)
                    continue
                for message in messages:
                    if message.error():
                        log.warning("cancellations consumer error: %s", message.error())
                        continue
                    self.handle(message.key(), message.value())
        finally:
            consumer.close()

    def _assign(self, consumer: Consumer) -> bool:
        """Read every partition from the first record of the window (from the end where the window has none). False
        (try again) while that cannot be set up."""
        try:
            since_ms = int((time.time() - self._window_s) * 1000)
            assigned = kafka.assign_topic(consumer, self._topic, since_ms=since_ms, timeout_s=SETUP_TIMEOUT_S)
        except KafkaException as e:
            log.warning("cannot set up the cancellations reader yet: %s", e)
            return False
        if not assigned:
            log.warning("cancellations topic %s is not available yet", self._topic)
            return False
        log.info("reading cancellations from %d partitions of %s", assigned, self._topic)
        self.assigned.set()
        return True

    def handle(self, key: bytes | None, value: bytes | None) -> None:
        """Take one record of the topic (the reader's loop calls this for each): a cancellation is remembered and
        passed to ``on_cancel``; an undecodable record is logged, passed to ``on_undecodable`` by its reason and
        skipped."""
        try:
            event = events.decode_cancel(value)
        except UndecodableRecord as e:
            log.error("skipping an undecodable cancellation record (key %r): %s", key, e)
            self._on_undecodable(e.reason)
            return
        self._cancellations.add(event.task_id, event.tenant)
        self._on_cancel(event.task_id, event.tenant)
