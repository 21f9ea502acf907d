"""Per-tenant quotas: a rate quota (token bucket) and a concurrency quota (tasks accepted and not yet finished).

Both are per ingest replica: with several replicas behind a load balancer each enforces its quotas on what it
accepted itself (documented in the README).

The rate quota is a token bucket of a few lines rather than a library: ``limits`` (the well-kept choice) offers
fixed and sliding windows, not a bucket with a burst, and a SubmitTasks call must take all its tasks at once
and learn exactly when enough tokens will be there, for the RetryInfo delay.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, KafkaException

from aimesh import events, kafka
from aimesh.background import BackgroundThread
from aimesh.errors import UndecodableRecord
from aimesh.kafka import fetch

log = logging.getLogger(__name__)

# Tasks hold their concurrency slot until this replica reads their terminal result, or for at most this long (a
# result this replica never sees, e.g. published while its results reader was not yet positioned).
IN_FLIGHT_TTL_S = 6 * 3600.0


@dataclass(frozen=True)
class RateLimit:
    """``rate_per_s`` tasks per second, up to ``burst`` at once; rate 0 means unlimited."""

    rate_per_s: float
    burst: int

    @classmethod
    def of(cls, rate_per_s: float, burst: int = 0) -> RateLimit:
        """Burst 0 means one second's worth of tasks (at least 1)."""
        return cls(rate_per_s, burst if burst > 0 else max(1, int(rate_per_s + 0.999999)))


class TokenBucket:
    """Holds up to ``burst`` tokens, refilled at ``rate_per_s``. Not thread-safe: used on the event loop only."""

    def __init__(self, limit: RateLimit, clock: Callable[[], float]) -> None:
        self._limit = limit
        self._clock = clock
        self._tokens = float(limit.burst)
        self._updated = clock()

    def take(self, n: int) -> float:
        """Take ``n`` tokens and return 0.0, or take none and return the seconds until they can be taken.

        A batch larger than the burst is taken once the bucket is full, leaving it in debt: it could never be
        taken otherwise, and the debt delays the tenant's next tasks by what the batch overdrew.
        """
        now = self._clock()
        self._tokens = min(float(self._limit.burst), self._tokens + (now - self._updated) * self._limit.rate_per_s)
        self._updated = now
        needed = min(n, self._limit.burst)
        if self._tokens >= needed - 1e-9:  # refills are sums of float products: forgive rounding
            self._tokens -= n
            return 0.0
        return (needed - self._tokens) / self._limit.rate_per_s


class RateQuotas:
    """One token bucket per tenant, with per-tenant overrides of the default limit."""

    def __init__(
        self,
        default: RateLimit,
        overrides: Mapping[str, RateLimit] | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._default = default
        self._overrides = dict(overrides or {})
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}  # bounded by the tenants that hold API keys

    def limit(self, tenant: str) -> RateLimit:
        return self._overrides.get(tenant, self._default)

    def take(self, tenant: str, n: int) -> float:
        """0.0 when ``tenant`` may submit ``n`` tasks now (they are counted); else seconds to wait."""
        limit = self.limit(tenant)
        if limit.rate_per_s <= 0:
            return 0.0
        bucket = self._buckets.get(tenant)
        if bucket is None:
            bucket = self._buckets[tenant] = TokenBucket(limit, self._clock)
        return bucket.take(n)


@dataclass
class Reservation:
    """Concurrency slots held for one call's tasks; each becomes a tracked task once its id is known."""

    _tasks: InFlightTasks
    tenant: str
    slots: int
    bound: list[str] = field(default_factory=list)

    def bind(self, task_id: str) -> None:
        """Track ``task_id`` in one of the reserved slots (before its record is produced, so its result, however
        fast, finds it)."""
        self._tasks._bind(self, task_id)

    def unbind(self, task_id: str) -> None:
        """The task was not accepted after all: free its slot."""
        self._tasks._unbind(self, task_id)

    def release(self) -> None:
        """Free the slots no task took (duplicates, failures). Idempotent."""
        self._tasks._release(self)


class InFlightTasks:
    """Tasks this replica accepted and has not yet seen finish, per tenant, with per-tenant limits.

    Thread-safe: the results reader calls ``finished`` from its own thread.
    """

    def __init__(
        self,
        default_limit: int,
        overrides: Mapping[str, int] | None = None,
        *,
        ttl_s: float = IN_FLIGHT_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._default = default_limit
        self._overrides = dict(overrides or {})
        self._ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._tasks: dict[str, tuple[str, float]] = {}  # task id -> (tenant, expires at), oldest first
        self._counts: dict[str, int] = {}  # tracked tasks plus unbound reservations, per tenant

    @property
    def enabled(self) -> bool:
        return self._default > 0 or any(v > 0 for v in self._overrides.values())

    def limit(self, tenant: str) -> int:
        """The tenant's limit; 0 means unlimited."""
        return self._overrides.get(tenant, self._default)

    def count(self, tenant: str) -> int:
        with self._lock:
            self._expire()
            return self._counts.get(tenant, 0)

    def reserve(self, tenant: str, n: int) -> Reservation | None:
        """Hold ``n`` slots for ``tenant``, or return None (nothing held) when that would exceed its limit."""
        with self._lock:
            self._expire()
            limit = self.limit(tenant)
            held = self._counts.get(tenant, 0)
            if limit > 0 and held + n > limit:
                return None
            self._counts[tenant] = held + n
        return Reservation(self, tenant, n)

    def finished(self, task_id: str) -> None:
        """A terminal result of ``task_id`` was read: free its slot. Unknown ids (other replicas') are ignored."""
        with self._lock:
            entry = self._tasks.pop(task_id, None)
            if entry is not None:
                self._decrement(entry[0], 1)

    def __len__(self) -> int:
        with self._lock:
            return len(self._tasks)

    def _bind(self, reservation: Reservation, task_id: str) -> None:
        with self._lock:
            if len(reservation.bound) >= reservation.slots:
                raise RuntimeError("more tasks than reserved slots")
            reservation.bound.append(task_id)
            self._tasks[task_id] = (reservation.tenant, self._clock() + self._ttl_s)

    def _unbind(self, reservation: Reservation, task_id: str) -> None:
        with self._lock:
            if task_id in reservation.bound:
                reservation.bound.remove(task_id)
                reservation.slots -= 1
                if self._tasks.pop(task_id, None) is not None:
                    self._decrement(reservation.tenant, 1)

    def _release(self, reservation: Reservation) -> None:
        with self._lock:
            unused = reservation.slots - len(reservation.bound)
            reservation.slots = len(reservation.bound)
            self._decrement(reservation.tenant, unused)

    def _decrement(self, tenant: str, n: int) -> None:
        if n <= 0:
            return
        left = self._counts.get(tenant, 0) - n
        if left > 0:
            self._counts[tenant] = left
        else:
            self._counts.pop(tenant, None)

    def _expire(self) -> None:
        now = self._clock()
        while self._tasks:
            task_id, (tenant, expires_at) = next(iter(self._tasks.items()))
            if expires_at > now:
                return
            del self._tasks[task_id]
            self._decrement(tenant, 1)


class ResultsReader(BackgroundThread):
    """Reads the results topic from its end (read_committed, no consumer group membership, no commits) on a
    thread of its own and tells ``tasks`` which tasks finished. Use as ``async with``; ``stop`` is idempotent.

    It reads from the end at start: tasks accepted before a restart are not counted by the new process.
    Partitions added to the results topic later are not read until a restart.
    """

    def __init__(self, config: Mapping[str, Any], topic: str, tasks: InFlightTasks) -> None:
        super().__init__("results-reader")
        self._config = {
            **kafka.reader_config(config, group_id=f"aimesh-ingest-results-{uuid.uuid4()}"),
            "isolation.level": "read_committed",
        }
        self._topic = topic
        self._tasks = tasks

    def run(self) -> None:
        consumer = kafka.consumer(self._config, logger=log)
        try:
            while not self.stopping.is_set() and not self._assign(consumer):
                self.stopping.wait(1.0)
            while not self.stopping.is_set():
                for message in fetch(consumer, 500, 0.5):
                    error = message.error()
                    if error is not None:
                        if not error.retriable():
                            log.warning("reading %s: %s", self._topic, error)
                        continue
                    try:
                        event = events.decode_result(message.value())
                    except UndecodableRecord:
                        continue  # not ours to judge: the notifier and the worker report such records
                    if events.is_terminal(event.status):
                        self._tasks.finished(event.task_id)
        finally:
            consumer.close()

    def _assign(self, consumer: Consumer) -> bool:
        try:
            assigned = kafka.assign_topic(consumer, self._topic, since_ms=None, timeout_s=5)
        except KafkaException as e:
            log.warning("cannot list %s, retrying: %s", self._topic, e)
            return False
        if not assigned:
            log.warning("topic %s not found, retrying", self._topic)
        return assigned > 0
