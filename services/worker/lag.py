"""The worker's consumer lag gauges: every ``LAG_REFRESH_INTERVAL_S``, each owned partition's high watermark minus the
group's committed offset, from a thread and a client of its own.

Lag queries take a round trip per partition: on the consumer thread they held back the records already fetched (a
newly assigned worker's first 1.3 s, measured), and the consumer's calls from another thread wait for its consume()
to return."""

from __future__ import annotations

import logging
import threading
from typing import Any

from confluent_kafka import Consumer, KafkaException

from aimesh import kafka
from aimesh.background import BackgroundThread
from aimesh.lifecycle import OnDeath
from aimesh.metrics import WorkerMetrics

from .ledger import Ledger, TopicPartitionKey

log = logging.getLogger(__name__)

LAG_REFRESH_INTERVAL_S = 5.0
# Bounds each broker query of a lag refresh (and so how long stopping waits for the lag thread).
LAG_QUERY_TIMEOUT_S = 1.0


class LagReporter(BackgroundThread):
    """Sets ``metrics.consumer_lag_records`` for the partitions ``ledger`` owns, on the thread ``kafka-lag`` (the
    consumer thread starts and stops it: ``start_sync``, ``stop_sync``); ``forget`` from any thread when partitions
    move. If it dies, ``on_death`` is told."""

    def __init__(
        self,
        consumer_config: dict[str, Any],
        ledger: Ledger,
        metrics: WorkerMetrics,
        *,
        on_death: OnDeath | None = None,
    ) -> None:
        super().__init__("kafka-lag", on_death=on_death)
        # Same group id, for its committed offsets; it never subscribes, so it never joins the group.
        config = kafka.reader_config(consumer_config)
        self._config = {**config, "client.id": kafka.client_id_for(config, "lag", default="aimesh-worker")}
        self._ledger = ledger
        self._metrics = metrics
        # Partitions with a lag gauge: refreshes set them, rebalances drop them.
        self._series: set[TopicPartitionKey] = set()
        self._lock = threading.Lock()

    def run(self) -> None:
        probe = kafka.consumer(self._config, logger=log)
        try:
            while not self.stopping.wait(LAG_REFRESH_INTERVAL_S):
                try:
                    self._refresh(probe)
                except Exception:  # telemetry: never the reason a worker stops
                    log.exception("consumer lag not refreshed")
        finally:
            probe.close()

    def forget(self, keys: set[TopicPartitionKey]) -> None:
        """Drop the lag series of partitions this worker no longer owns (their new owner reports them)."""
        with self._lock:
            for topic, partition in keys & self._series:
                self._metrics.consumer_lag_records.remove(topic, str(partition))
            self._series -= keys

    def _refresh(self, probe: Consumer) -> None:
        """Set the lag gauge of every owned partition: its high watermark minus the group's committed offset
        (the low watermark when the group has committed none: the consumer starts from the earliest)."""
        committed = self._ledger.committed_offsets()
        # Partitions this worker has committed nothing for yet: the group coordinator is asked.
        known = {key: offset for key, offset in committed.items() if offset is not None}
        try:
            lags = kafka.group_lag(probe, committed, LAG_QUERY_TIMEOUT_S, known=known, stop=self.stopping)
        except KafkaException as e:
            # Telemetry only: the gauges keep their last values until the broker answers again.
            log.debug("consumer lag not refreshed: %s", e)
            return
        if self.stopping.is_set():
            return
        with self._lock:
            owned = self._ledger.committed_offsets().keys()  # not those released while the queries ran
            for (topic, partition), lag in lags.items():
                if (topic, partition) in owned:
                    self._metrics.consumer_lag_records.labels(topic, str(partition)).set(lag.records)
                    self._series.add((topic, partition))
            stale = self._series - owned
        self.forget(stale)
