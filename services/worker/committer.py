"""Publishes what the ledger says is ready and commits its partitions' offsets: the publisher thread's loop, and the
steps the consumer thread's revoke callback runs under the same lock.

Exactly once: a task's terminal result (and, for a record it cannot process, its dead-letter record) is published in
the same Kafka transaction that commits its partition's offsets (``transactions``); under at_least_once the records
are acknowledged first and the offsets committed after (``acknowledged``). A transaction Kafka aborts leaves its
outcomes in the ledger, each whose record Kafka refused for good replaced by a smaller one; aborts that name no
record, or a topic that refuses every record, are handled as ``aborts`` says. A fatal producer error drops every
unpublished outcome, recreates the producer, and has the consumer fetch again from the committed offsets.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import TopicPartition

from aimesh.background import BackgroundThread
from aimesh.errors import AimeshError
from aimesh.lifecycle import OnDeath
from aimesh.metrics import (
    REFUSAL_BLOCKED,
    REFUSAL_DROPPED,
    REFUSAL_REPLACED,
    REFUSED_DEAD_LETTER,
    REFUSED_RESULT,
    TRANSACTION_ABORTED,
    TRANSACTION_COMMITTED,
    TRANSACTION_FATAL,
    WorkerMetrics,
)

from .aborts import AbortPolicy
from .ledger import Ledger, Ready, Refusal, TopicPartitionKey
from .transactions import Publisher, TransactionAborted, TransactionFatal

log = logging.getLogger(__name__)

# The publisher thread wakes at least this often (after an aborted transaction it waits as ``aborts`` says).
PUBLISH_IDLE_S = 0.5
MAX_ABORTS_AFTER_STOP = 20
# A producer fenced this often in this window means another live process uses the same transactional.id.
MAX_FENCES, FENCE_WINDOW_S = 3, 60.0
# A transactional call blocked this long is wedged: librdkafka's send_offsets_to_transaction can ignore its timeout
# and hang for good after the group coordinator went away (librdkafka issues #5456, #5511). The worker then gives
# up this producer and consumer and starts over (see ProducerWedged); nothing was committed, so nothing is lost.
PUBLISH_WEDGED_S = 45.0


class ProducerWedged(AimeshError, RuntimeError):
    """A transactional call never returned. The Worker that raised it is done; build a new one (a new producer
    with the same transactional.id fences the wedged one and aborts its transaction)."""


class Committer(BackgroundThread):
    """Publishes ``ledger``'s ready outcomes through ``publisher``. ``run`` is the publisher thread
    ``kafka-publisher``, from ``start`` until ``stop`` (if it dies, ``on_death`` is told); ``lock`` guards the
    publisher and the ledger's publish-then-commit steps, which the revoke callback runs too (``publish_ready``).
    After a fatal producer error (under the lock) ``drop_unpublished`` forgets every owned partition's work, the
    producer is recreated, and ``refetch`` has the consumer fetch again from the committed offsets."""

    def __init__(
        self,
        publisher: Publisher,
        ledger: Ledger,
        metrics: WorkerMetrics,
        *,
        results_topic: str,
        drop_unpublished: Callable[[], None],
        refetch: Callable[[], None],
        on_death: OnDeath | None = None,
    ) -> None:
        super().__init__("kafka-publisher", on_death=on_death)
        self.publisher = publisher
        self._ledger = ledger
        self._metrics = metrics
        self._results_topic = results_topic
        self._drop_unpublished, self._refetch = drop_unpublished, refetch
        self.lock = threading.Lock()
        self.work_ready = threading.Event()
        self.wedged = threading.Event()
        # Set while a topic refuses every record (see aborts): fetching pauses meanwhile.
        self.blocked = threading.Event()
        self._aborts = AbortPolicy(self._on_blocked)
        self._publishing_since: float | None = None
        self._fences: list[float] = []
        # The consumer's group metadata (generation, member id) for send_offsets_to_transaction, set by the consumer
        # thread: Consumer.consumer_group_metadata() blocks while another thread is inside consume().
        self.group_metadata: Any = None

    def run(self) -> None:
        """Publish whenever work is ready, until `stop` and then everything finished is published (or given up)."""
        failures_after_stop = 0
        while not self.wedged.is_set():
            self.work_ready.wait(PUBLISH_IDLE_S)
            self.work_ready.clear()
            with self.lock:
                published = self.publish_ready()
                wait_s = self._aborts.wait_s()
            if published and self.stopping.is_set():
                return
            if not published:
                if self.stopping.is_set():
                    failures_after_stop += 1
                    if failures_after_stop >= MAX_ABORTS_AFTER_STOP:
                        log.error("giving up publishing at shutdown; unpublished tasks will run again")
                        return
                time.sleep(wait_s)
                self.work_ready.set()

    async def stop(self) -> None:
        """Publish everything finished (or give up, see ``run``) and end. A wedged publisher is told to stop but not
        waited for: its thread may never return."""
        if self.wedged.is_set():
            self._tell_to_stop()
        else:
            await super().stop()

    def _wake(self) -> None:
        self.work_ready.set()

    @property
    def isolating(self) -> bool:
        """Whether partitions are published one transaction each (after aborts that named no record)."""
        return self._aborts.isolate

    def backoff_s(self) -> float:
        """How long the publisher thread waits before it tries again after an aborted transaction."""
        return self._aborts.wait_s()

    def check_wedged(self) -> None:
        """Raise ProducerWedged if a publish has been blocked for longer than ``PUBLISH_WEDGED_S``."""
        since = self._publishing_since
        if since is not None and time.monotonic() - since > PUBLISH_WEDGED_S:
            self.wedged.set()
            raise ProducerWedged(f"a publish has been blocked for {time.monotonic() - since:.0f}s")

    def publish_ready(self, keys: set[TopicPartitionKey] | None = None) -> bool:
        """Publish what has finished in every owned partition (or in ``keys``) and commit their offsets in one
        transaction, or one transaction per partition after aborts that named no record (see ``aborts``). Call with
        ``lock`` held. False if a transaction was aborted (publish again)."""
        ready = self._ledger.ready(keys)
        if not ready:
            return True
        if not self._aborts.isolate:
            published = self._publish(ready)
        else:
            published = all([self._publish([r]) for r in ready])  # a list: every partition gets its try
        if published:
            self._aborts.committed(everything=True)
        return published

    def _publish(self, ready: list[Ready]) -> bool:
        """Publish ``ready`` in one transaction. False if it was aborted: what it carried is left in the ledger, each
        outcome whose record Kafka refused for good replaced by a smaller one."""
        # For each record: the Ready holding it, its outcome's index there, and its index in that outcome.
        owners = [(r, i, j) for r in ready for i, outcome in enumerate(r.outcomes) for j in range(len(outcome.records))]
        records = [record for r in ready for outcome in r.outcomes for record in outcome.records]
        offsets = [TopicPartition(r.partition.key[0], r.partition.key[1], r.next_offset, r.metadata) for r in ready]
        self._publishing_since = time.monotonic()
        try:
            self.publisher.publish(records, offsets, self.group_metadata)
        except TransactionAborted as e:
            self._metrics.transactions.labels(TRANSACTION_ABORTED).inc()
            if self.wedged.is_set():
                return True  # a given-up worker stops publishing
            self._after_abort(owners, e.refused)
            return False
        except TransactionFatal:
            if self.wedged.is_set():
                return True  # given up while the call hung: a newer producer owns the id now, touch nothing
            self._metrics.transactions.labels(TRANSACTION_FATAL).inc()
            self._recover_from_fatal()
            return True
        finally:
            self._publishing_since = None
        if self.wedged.is_set():
            return True
        self._metrics.transactions.labels(TRANSACTION_COMMITTED).inc()
        self._aborts.committed(everything=False)
        self._ledger.committed(ready)
        for r in ready:
            for outcome in r.outcomes:
                if outcome.on_committed is not None:
                    outcome.on_committed()
        return True

    def _after_abort(self, owners: list[tuple[Ready, int, int]], refused: tuple[Refusal, ...]) -> None:
        """Replace each outcome that owns a refused record by its smaller form (for its first refused record: the
        next transaction tells whether another record of it is refused too)."""
        changed, blocked = False, False
        seen: set[tuple[int, int]] = set()
        for refusal in refused:
            ready, i, j = owners[refusal.index]
            if (id(ready), i) in seen:
                continue
            seen.add((id(ready), i))
            if self._replace_refused(ready, i, dataclasses.replace(refusal, index=j)):
                changed = True
            else:
                blocked = True
        self._aborts.aborted(named=bool(refused), changed=changed, blocked=blocked)

    def _replace_refused(self, ready: Ready, i: int, refusal: Refusal) -> bool:
        """Put the smaller form of ``ready.outcomes[i]`` in the ledger. False if there is none: the refused record's
        topic takes no record at all (blocked)."""
        outcome = ready.outcomes[i]
        record = outcome.records[refusal.index]
        kind = REFUSED_RESULT if record.topic == self._results_topic else REFUSED_DEAD_LETTER
        replacement = outcome.smaller(refusal) if outcome.smaller is not None else None
        where = f"{ready.partition.key[0]}[{ready.partition.key[1]}]@{ready.offsets[i]}"
        if replacement is None:
            self._metrics.refused_records.labels(kind, REFUSAL_BLOCKED).inc()
            log.error("%s refuses every record (%s: %s): publishing waits", record.topic, refusal.code, refusal.reason)
            return False
        action = REFUSAL_DROPPED if len(replacement.records) < len(outcome.records) else REFUSAL_REPLACED
        self._metrics.refused_records.labels(kind, action).inc()
        log.error(
            "the %s record of %s was refused for good (%s: %s): %s",
            kind,
            where,
            refusal.code,
            refusal.reason,
            "dropped" if action == REFUSAL_DROPPED else "publishing a smaller outcome instead",
        )
        self._ledger.replace(ready.partition, ready.offsets[i], replacement)
        return True

    def _on_blocked(self, blocked: bool) -> None:
        self._metrics.publish_blocked.set(1 if blocked else 0)
        if blocked:
            self.blocked.set()
            log.error("a topic refuses every record; nothing is published or fetched until it takes them again")
        else:
            self.blocked.clear()
            log.warning("publishing again")

    def _recover_from_fatal(self) -> None:
        """The producer cannot go on (most likely fenced by a newer instance with our transactional.id): drop
        every unpublished outcome, recreate the producer, and fetch again from the committed offsets."""
        now = time.monotonic()
        self._fences = [t for t in self._fences if now - t < FENCE_WINDOW_S] + [now]
        if len(self._fences) > MAX_FENCES:
            raise RuntimeError(
                f"transactional producer {self.publisher.transactional_id} failed fatally {len(self._fences)} times "
                f"in {FENCE_WINDOW_S:.0f}s: is another live worker using the same AIMESH_WORKER_ID?"
            )
        self._drop_unpublished()
        self.publisher.recreate()
        self._refetch()
