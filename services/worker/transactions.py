"""Publishing results and offsets together: one Kafka transaction per publish.

A transaction here spans only publishing (produce the finished records, send the consumed offsets, commit),
never inference, so it lasts milliseconds and cannot outlive ``transaction.timeout.ms`` however slow a
model is. Error handling follows librdkafka's transactional API:

- retriable: the same call is retried;
- ``txn_requires_abort``: the transaction is aborted and ``TransactionAborted`` raised; the caller keeps its
  outcomes and publishes them again in the next transaction (aborted records are invisible to
  read_committed consumers, and the offsets did not move);
- fatal (a producer fenced by a newer instance with the same ``transactional.id``, say): ``TransactionFatal``;
  the caller must drop its state and ``recreate()`` the producer.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer, TopicPartition

from .ledger import OutRecord

log = logging.getLogger(__name__)

# How long one transactional call may block before it is retried, and how long retriable errors are retried
# before the transaction is aborted (or, for abort and init, the producer recreated): bounded, so the lock the
# worker holds while publishing is always released, and a rebalance callback waiting for it runs.
CALL_TIMEOUT_S = 5.0
RETRY_FOR_S = 15.0
RETRY_WAIT_S = 0.2


class TransactionAborted(Exception):
    """The transaction was aborted; nothing of it is visible. Publish again."""


class TransactionFatal(Exception):
    """The producer cannot go on (fenced, or a fatal idempotence error): recreate it and start over."""


def transactional_config(
    base: dict[str, Any], *, transactional_id: str, transaction_timeout_s: float
) -> dict[str, Any]:
    """A transactional producer's settings on top of ``base`` (an idempotent producer's)."""
    timeout_ms = max(1000, int(transaction_timeout_s * 1000))
    config = dict(base)
    config.update(
        {
            "transactional.id": transactional_id,
            "transaction.timeout.ms": timeout_ms,
            # librdkafka requires message.timeout.ms <= transaction.timeout.ms.
            "message.timeout.ms": min(int(config.get("message.timeout.ms", timeout_ms)), timeout_ms),
            # Records are flushed by commit_transaction; lingering would only delay it.
            "linger.ms": 0,
            # Right after a commit the coordinator is still writing its markers and answers the next transaction's
            # first request CONCURRENT_TRANSACTIONS; librdkafka's default 100 ms backoff would add that much to
            # every back-to-back transaction.
            "retry.backoff.ms": 5,
            "retry.backoff.max.ms": 500,
        }
    )
    return config


class TransactionalPublisher:
    """Owns one transactional producer. Not thread-safe: call it from one thread at a time."""

    def __init__(self, config: dict[str, Any]) -> None:
        self._config = config
        self._producer: Producer | None = None

    @property
    def transactional_id(self) -> str:
        return str(self._config["transactional.id"])

    def start(self) -> None:
        """Create the producer and register its transactional id, which fences any older instance with the
        same id and aborts whatever transaction it left open."""
        producer = Producer(self._config, logger=log)
        # Retried for as long as the broker is away: there is nothing else this worker could do meanwhile.
        self._retry(
            lambda: producer.init_transactions(CALL_TIMEOUT_S), "init_transactions", abortable=False, retry_for_s=None
        )
        self._producer = producer

    def fence(self, timeout_s: float) -> bool:
        """Register the transactional id anew with a throwaway producer while this publisher's own producer is stuck
        in a call (from another thread: the stuck producer is not touched). The broker answers only once the
        transaction the stuck producer left open is resolved, committed if its commit had reached the coordinator,
        else aborted, and fences the stuck producer. True if that happened within ``timeout_s``."""
        producer = Producer(self._config, logger=log)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                producer.init_transactions(max(0.1, deadline - time.monotonic()))
                return True
            except KafkaException as e:
                error: KafkaError = e.args[0]
                if not error.retriable() or time.monotonic() >= deadline:
                    log.error("could not fence transactional id %s: %s", self.transactional_id, error.str())
                    return False
                time.sleep(RETRY_WAIT_S)

    def recreate(self) -> None:
        self.close()
        self.start()

    def close(self) -> None:
        if self._producer is not None:
            producer, self._producer = self._producer, None
            producer.flush(1.0)

    def publish(self, records: list[OutRecord], offsets: list[TopicPartition], group_metadata: Any) -> None:
        """Publish ``records`` and commit ``offsets`` for the consumer group in one transaction."""
        producer = self._producer
        if producer is None:
            raise RuntimeError("publisher is not started")
        try:
            producer.begin_transaction()
            for record in records:
                self._produce(producer, record)
            if offsets:
                self._retry(
                    lambda: producer.send_offsets_to_transaction(offsets, group_metadata, CALL_TIMEOUT_S),
                    "send_offsets_to_transaction",
                )
            self._retry(lambda: producer.commit_transaction(CALL_TIMEOUT_S), "commit_transaction")
        except KafkaException as e:
            self._handle(producer, e)

    @staticmethod
    def _produce(producer: Producer, record: OutRecord) -> None:
        while True:
            try:
                producer.produce(record.topic, key=record.key, value=record.value, headers=record.headers)
                return
            except BufferError:
                producer.poll(0.05)  # the local queue is full: let deliveries drain it

    def _retry(self, call: Any, name: str, *, abortable: bool = True, retry_for_s: float | None = RETRY_FOR_S) -> None:
        """Run a transactional call, retrying it for up to ``retry_for_s`` (None: forever) while librdkafka says the
        error is retriable; then the error is raised (and handled as an abort)."""
        give_up = float("inf") if retry_for_s is None else time.monotonic() + retry_for_s
        while True:
            try:
                call()
                return
            except KafkaException as e:
                error: KafkaError = e.args[0]
                retriable = error.retriable() and not error.fatal() and not (abortable and error.txn_requires_abort())
                if retriable and time.monotonic() < give_up:
                    log.warning("%s failed, retrying: %s", name, error.str())
                    time.sleep(RETRY_WAIT_S)
                    continue
                raise

    def _handle(self, producer: Producer, e: KafkaException) -> None:
        error: KafkaError = e.args[0]
        if error.fatal():
            log.error("transactional producer %s hit a fatal error: %s", self.transactional_id, error.str())
            raise TransactionFatal(error.str()) from e
        if error.txn_requires_abort():
            log.warning("aborting transaction: %s", error.str())
        else:
            log.warning("transaction failed, aborting: %s", error.str())
        try:
            self._retry(lambda: producer.abort_transaction(CALL_TIMEOUT_S), "abort_transaction", abortable=False)
        except KafkaException as abort_error:
            raise TransactionFatal(f"abort failed: {abort_error.args[0].str()}") from abort_error
        raise TransactionAborted(error.str()) from e
