"""Admission control: turn tasks away while the workers' backlog would keep them waiting too long.

A monitor thread measures, for each tasks topic (one per priority class), the worker group's backlog (end
offsets minus the group's committed offsets) and how fast the group's committed offsets advance, and turns
both into an estimated wait. The gRPC handlers only read the latest estimate: they never wait for Kafka.

The estimate is per priority class, not per model: every model's tasks share a tasks topic, so a slow
model's backlog delays (and is charged to) the fast ones too. It counts what this deployment's worker group
has not committed, whichever ingest replica published it.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from confluent_kafka import KafkaException

from aimesh import finished_offsets, kafka
from aimesh.background import BackgroundThread
from aimesh.errors import AimeshError
from aimesh.metrics import IngestMetrics

log = logging.getLogger(__name__)

# A request to the broker that takes longer than this fails the measurement (and admission fails open).
MEASURE_TIMEOUT_S = 5.0
# When the drain rate is unknown, a rejected client is told to come back after this long.
UNKNOWN_RATE_RETRY_S = 5.0


class LagUnavailable(AimeshError):
    """The backlog could not be measured (broker unreachable, a request timed out)."""


@dataclass(frozen=True)
class BacklogSample:
    """One measurement of a tasks topic, summed over its partitions.

    ``backlog``: records the worker group has not committed (end offset minus committed offset; where the group
    has committed nothing, minus the log start offset). ``position``: the group's committed offsets (or log start
    offsets), whose growth is the drain rate.
    """

    backlog: int
    position: int


class LagSource(Protocol):
    """Measures the worker group's backlog of some topics; raises LagUnavailable. Topics it cannot find are
    left out of the answer."""

    def measure(self, topics: Sequence[str]) -> dict[str, BacklogSample]: ...

    def close(self) -> None:
        """Release the source's clients (called by the monitor's thread as it ends)."""


@dataclass(frozen=True)
class Estimate:
    """How long a task published to ``topic`` now would wait before a worker finishes it.

    ``rate_per_s`` is the drain rate used (None: never observed); ``wait_s`` may be ``inf`` (no drain rate and a
    backlog over the stalled bound). ``measured_at`` is on the monitor's monotonic clock.
    """

    topic: str
    backlog: int
    rate_per_s: float | None
    wait_s: float
    measured_at: float


class DrainEstimator:
    """Turns successive samples of one topic into an estimated wait.

    The drain rate is the committed position's growth over the last ``window_s``, taken only from stretches in
    which the workers always had work (a backlog at every sample): while they idle, what they drain is the
    arrival rate, not what they could do. Workers commit in transactions, so the position moves in steps: the
    window smooths them. When no rate is fresh, the last one is used; and the estimate is never below how long
    the backlog has gone without any progress, so with every worker gone it grows until admission rejects.
    Before any rate was ever seen, a backlog above ``stalled_backlog`` counts as an infinite wait.
    """

    def __init__(self, topic: str, *, window_s: float = 10.0, stalled_backlog: int = 10_000) -> None:
        self.topic = topic
        self._window_s = window_s
        self._stalled_backlog = stalled_backlog
        self._samples: deque[tuple[float, int]] = deque()  # (time, position) of the current busy stretch
        self._last_position: int | None = None
        self._rate: float | None = None
        self._stalled_since: float | None = None

    @property
    def rate_per_s(self) -> float | None:
        return self._rate

    def observe(self, now: float, sample: BacklogSample) -> Estimate:
        last = self._last_position
        self._last_position = sample.position
        if last is not None and sample.position < last:
            # The group's offsets went back (reset, topic recreated): earlier samples say nothing any more.
            self._samples.clear()
            last = None
        progressed = last is not None and sample.position > last
        if sample.backlog == 0:
            self._samples.clear()  # idle: what drains now is the arrival rate; the next busy sample anchors anew
        else:
            self._samples.append((now, sample.position))
            while len(self._samples) > 2 and self._samples[1][0] <= now - self._window_s:
                self._samples.popleft()
            first_at, first_position = self._samples[0]
            if now > first_at and sample.position > first_position:
                self._rate = (sample.position - first_position) / (now - first_at)
        if sample.backlog == 0 or progressed:
            self._stalled_since = None
        elif self._stalled_since is None:
            self._stalled_since = now

        stalled_for = now - self._stalled_since if self._stalled_since is not None else 0.0
        if sample.backlog == 0:
            wait = 0.0
        elif self._rate is not None:
            wait = max(sample.backlog / self._rate, stalled_for)
        elif sample.backlog > self._stalled_backlog:
            wait = math.inf
        else:
            wait = stalled_for
        return Estimate(self.topic, sample.backlog, self._rate, wait, now)


@dataclass(frozen=True)
class Rejection:
    """Why a task is turned away, and when the client should try again."""

    topic: str
    backlog: int
    wait_s: float
    retry_after_s: float
    message: str


class Admission:
    """The admission decision, from the latest estimate of each topic.

    ``max_wait_s`` 0 turns admission control off. An estimate older than ``stale_after_s`` (the monitor cannot
    reach the broker) is not used: admission fails open rather than reject on stale data.
    """

    def __init__(self, max_wait_s: float, *, stale_after_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_wait_s = max_wait_s
        self._stale_after_s = stale_after_s
        self._clock = clock
        self._estimates: dict[str, Estimate] = {}

    @property
    def enabled(self) -> bool:
        return self.max_wait_s > 0

    def update(self, estimate: Estimate) -> None:
        """Called by the monitor thread: one assignment of an immutable value, safe to read from the loop."""
        self._estimates = {**self._estimates, estimate.topic: estimate}

    def current(self, topic: str) -> Estimate | None:
        """The topic's estimate, or None when there is none yet or it is stale."""
        estimate = self._estimates.get(topic)
        if estimate is None or self._clock() - estimate.measured_at > self._stale_after_s:
            return None
        return estimate

    def check(self, topic: str, *, seconds_to_deadline: float | None = None) -> Rejection | None:
        """None to admit a task for ``topic``; a Rejection when its estimated wait exceeds ``max_wait_s`` or the
        time left before the task's deadline."""
        if not self.enabled:
            return None
        estimate = self.current(topic)
        if estimate is None or estimate.backlog == 0:
            return None
        wait = estimate.wait_s
        if wait > self.max_wait_s:
            if math.isinf(wait):
                retry = UNKNOWN_RATE_RETRY_S
                why = f"{estimate.backlog} tasks wait on {topic} and no worker has been seen draining it"
            else:
                retry = wait - self.max_wait_s  # until the backlog is back within the allowed wait
                why = f"{estimate.backlog} tasks wait on {topic}: about {wait:.1f} s, over the limit of " + (
                    f"{self.max_wait_s:g} s"
                )
            return Rejection(topic, estimate.backlog, wait, _at_least_1s(retry), f"backlog too long: {why}")
        if seconds_to_deadline is not None and wait > seconds_to_deadline:
            # Waiting does not help a fixed deadline much (it comes closer as the backlog drains): the retry delay
            # is the shortfall, and the message says to give the task more time.
            return Rejection(
                topic,
                estimate.backlog,
                wait,
                _at_least_1s(wait - seconds_to_deadline),
                f"backlog too long: the task would wait about {wait:.0f} s on {topic}, past its deadline in "
                f"{seconds_to_deadline:.0f} s; retry later or with a later deadline",
            )
        return None


def _at_least_1s(seconds: float) -> float:
    return max(1.0, float(math.ceil(seconds)))


class AdmissionMonitor(BackgroundThread):
    """Measures ``topics`` every ``interval_s`` on a thread of its own and feeds ``admission``.

    A failed measurement is logged (once per outage) and counted; the estimates then go stale and admission
    fails open. Use as ``async with``; ``stop`` is idempotent.
    """

    def __init__(
        self,
        source: LagSource,
        admission: Admission,
        topics: Sequence[str],
        *,
        interval_s: float,
        stalled_backlog: int,
        metrics: IngestMetrics | None = None,
        window_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__("admission-monitor")
        self._source = source
        self._admission = admission
        self._topics = list(dict.fromkeys(topics))
        self._interval_s = interval_s
        self._metrics = metrics
        self._clock = clock
        self._estimators = {
            t: DrainEstimator(t, window_s=max(window_s, 2 * interval_s), stalled_backlog=stalled_backlog)
            for t in self._topics
        }
        self._failing = False

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                self.measure_once()
                self.stopping.wait(self._interval_s)
        finally:
            self._source.close()

    def measure_once(self) -> None:
        """One measurement of every topic (the thread's loop body; tests call it directly)."""
        try:
            samples = self._source.measure(self._topics)
        except LagUnavailable as e:
            if self._metrics is not None:
                self._metrics.admission_monitor_errors.inc()
            if not self._failing:
                log.warning("cannot measure the worker backlog, admitting every task until it can: %s", e)
            self._failing = True
            return
        if self._failing:
            log.info("measuring the worker backlog again")
            self._failing = False
        now = self._clock()
        for topic, sample in samples.items():
            estimate = self._estimators[topic].observe(now, sample)
            self._admission.update(estimate)
            if self._metrics is not None:
                self._metrics.backlog_records.labels(topic).set(estimate.backlog)
                self._metrics.estimated_wait_seconds.labels(topic).set(estimate.wait_s)


class KafkaLagSource:
    """Measures a consumer group's backlog with a consumer that never joins the group: ``committed`` (an
    OffsetFetch to the group coordinator) and the partitions' watermarks.

    Not the admin API's ``list_consumer_group_offsets``: with it the ingest process died of SIGSEGV twice in
    development, each time just after the call had failed with COORDINATOR_LOAD_IN_PROGRESS on a new broker (not
    reproduced on purpose; upstream reports the same call crashing on error paths,
    confluentinc/confluent-kafka-python#1982). A consumer's ``committed`` is the long-used path.
    """

    def __init__(self, config: Mapping[str, Any], group: str) -> None:
        # The group's id only to read its committed offsets: never subscribes, joins or commits.
        self._consumer = kafka.consumer(kafka.reader_config(config, group_id=group), logger=log)

    def measure(self, topics: Sequence[str]) -> dict[str, BacklogSample]:
        try:
            return self._measure(topics)
        except KafkaException as e:
            raise LagUnavailable(str(e)) from e

    def close(self) -> None:
        self._consumer.close()

    def _measure(self, topics: Sequence[str]) -> dict[str, BacklogSample]:
        metadata = self._consumer.list_topics(timeout=MEASURE_TIMEOUT_S)
        partitions = [(topic, p) for topic in topics for p in kafka.partitions_in(metadata, topic)]
        backlog: dict[str, int] = {}
        position: dict[str, int] = {}
        for (topic, _), lag in kafka.group_lag(self._consumer, partitions, MEASURE_TIMEOUT_S).items():
            done_ahead = _published_ahead(lag.committed, lag.metadata)
            backlog[topic] = backlog.get(topic, 0) + max(0, lag.records - done_ahead)
            position[topic] = position.get(topic, 0) + lag.position + done_ahead
        return {topic: BacklogSample(backlog[topic], position[topic]) for topic in backlog}


def _published_ahead(committed: int, metadata: str) -> int:
    """How many tasks above the committed offset have their results published already (a slow task below them
    still runs): the workers record them in the commit's metadata. Unreadable metadata counts none."""
    if committed < 0:
        return 0
    try:
        return len(finished_offsets.decode(committed, metadata))
    except ValueError:
        log.warning("unreadable finished-offsets metadata at committed offset %d", committed)
        return 0
