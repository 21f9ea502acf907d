"""Publishing results and offsets together: one Kafka transaction per publish.

A transaction here spans only publishing (produce the finished records, send the consumed offsets, commit),
never inference, so it lasts milliseconds and cannot outlive ``transaction.timeout.ms`` however slow a
model is. Error handling follows librdkafka's transactional API:

- retriable: the same call is retried;
- ``txn_requires_abort``: the transaction is aborted and ``TransactionAborted`` raised; the caller keeps its
  outcomes and publishes them again in the next transaction (aborted records are invisible to
  read_committed consumers, and the offsets did not move);
- a record refused for good (``produce()`` raising, or an error in its delivery report, which
  ``commit_transaction`` serves): the transaction is aborted too, and ``TransactionAborted.refused`` names each
  such record with its error, classified by librdkafka's error code: refused for what it is (too large,
  invalid) or because its topic takes nothing (missing, not authorized). Retrying it unchanged cannot help;
- fatal (a producer fenced by a newer instance with the same ``transactional.id``, say): ``TransactionFatal``;
  the caller must drop its state and ``recreate()`` the producer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any, Protocol

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from aimesh import kafka
from aimesh.errors import AimeshError

from .ledger import OutRecord, Refusal, RefusalScope, TopicPartitionKey

log = logging.getLogger(__name__)

# How long one transactional call may block before it is retried, and how long retriable errors are retried
# before the transaction is aborted (or, for abort and init, the producer recreated): bounded, so the lock the
# worker holds while publishing is always released, and a rebalance callback waiting for it runs.
CALL_TIMEOUT_S = 5.0
RETRY_FOR_S = 15.0
RETRY_WAIT_S = 0.2


# Errors that refuse one record for what it is: the same record is refused every time.
_SIZE_REFUSALS = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE})
_RECORD_REFUSALS = frozenset(
    {
        KafkaError.INVALID_RECORD,
        KafkaError._BAD_MSG,
        KafkaError._INVALID_ARG,
    }
)
# Errors that refuse every record of a topic: no record of it can be published until an operator acts.
_TOPIC_REFUSALS = frozenset(
    {
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError._UNKNOWN_TOPIC,
        KafkaError._UNKNOWN_PARTITION,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.TOPIC_EXCEPTION,
        KafkaError.POLICY_VIOLATION,
    }
)


def refusal_scope(error: KafkaError) -> RefusalScope | None:
    """Whether ``error`` refuses its record for good, and why (see ``Refusal``); None for an error a retry may get
    past (a timeout, a purge by an abort, a broker going away)."""
    code = error.code()
    if code in _SIZE_REFUSALS:
        return "size"
    if code in _RECORD_REFUSALS:
        return "record"
    if code in _TOPIC_REFUSALS:
        return "topic"
    return None


def refusal(index: int, error: KafkaError) -> Refusal | None:
    scope = refusal_scope(error)
    return None if scope is None else Refusal(index, scope, error.name(), error.str())


def retry_produce(producer: Producer, record: OutRecord, index: int, errors: dict[int, KafkaError]) -> None:
    """Queue ``record``, waiting while the local queue is full; its delivery error, if any, lands in
    ``errors[index]``. Raises KafkaException when the producer refuses it at once (too large, a topic known not to
    exist), also noted in ``errors``."""

    def delivered(error: KafkaError | None, _: object) -> None:
        if error is not None:
            errors.setdefault(index, error)

    while True:
        try:
            producer.produce(
                record.topic, key=record.key, value=record.value, headers=record.headers, on_delivery=delivered
            )
            return
        except BufferError:
            producer.poll(0.05)  # the local queue is full: let deliveries drain it
        except KafkaException as e:
            errors[index] = e.args[0]
            raise


class ProducerFactory(Protocol):
    """How a publisher builds its producer: ``kafka.producer``, or a test's fake at the librdkafka seam."""

    def __call__(self, config: Mapping[str, Any], *, logger: logging.Logger) -> Producer: ...


class Publisher(Protocol):
    """What the worker publishes through: ``TransactionalPublisher`` (exactly_once) or
    ``acknowledged.AcknowledgedPublisher`` (at_least_once). ``publish`` raises ``TransactionAborted`` (publish again)
    or ``TransactionFatal`` (``recreate``); ``commit`` and ``forget`` run on the consumer thread."""

    @property
    def transactional_id(self) -> str: ...

    def start(self) -> None: ...

    def fence(self, timeout_s: float) -> bool: ...

    def recreate(self) -> None: ...

    def close(self) -> None: ...

    def publish(self, records: list[OutRecord], offsets: list[TopicPartition], group_metadata: Any) -> None: ...

    def commit(self, consumer: Consumer, keys: set[TopicPartitionKey] | None = None, *, wait: bool = False) -> None: ...

    def forget(self, keys: set[TopicPartitionKey]) -> None: ...


class TransactionAborted(AimeshError):
    """The transaction was aborted; nothing of it is visible. Publish again, without or in place of the records
    ``refused`` names (empty: the abort named no record)."""

    def __init__(self, message: str, refused: tuple[Refusal, ...] = ()) -> None:
        super().__init__(message)
        self.refused = refused


class TransactionFatal(AimeshError):
    """The producer cannot go on (fenced, or a fatal idempotence error): recreate it and start over."""


def transactional_config(
    base: dict[str, Any], *, transactional_id: str, transaction_timeout_s: float, max_record_bytes: int | None = None
) -> dict[str, Any]:
    """A transactional producer's settings on top of ``base`` (an idempotent producer's). ``max_record_bytes``
    becomes librdkafka's ``message.max.bytes`` unless ``base`` sets it: the worker fits its records to that size
    (measured as librdkafka measures them, or larger), so the producer never refuses one it let through."""
    timeout_ms = max(1000, int(transaction_timeout_s * 1000))
    config = dict(base)
    if max_record_bytes is not None:
        config.setdefault("message.max.bytes", max_record_bytes)
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
    """Owns one transactional producer, built by ``producer_factory``. Not thread-safe: call it from one thread at a
    time."""

    def __init__(self, config: dict[str, Any], *, producer_factory: ProducerFactory = kafka.producer) -> None:
        self._config = config
        self._new_producer = producer_factory
        self._producer: Producer | None = None

    @property
    def transactional_id(self) -> str:
        return str(self._config["transactional.id"])

    def start(self) -> None:
        """Create the producer and register its transactional id, which fences any older instance with the
        same id and aborts whatever transaction it left open."""
        producer = self._new_producer(self._config, logger=log)
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
        producer = self._new_producer(self._config, logger=log)
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
        """Flush briefly and drop the producer. One in a fatal state refuses to flush (it raises the fatal error):
        it is dropped all the same, so that ``recreate`` can start its successor."""
        if self._producer is not None:
            producer, self._producer = self._producer, None
            try:
                producer.flush(1.0)
            except KafkaException as e:
                log.warning("producer %s dropped unflushed: %s", self.transactional_id, e.args[0].str())

    def commit(self, consumer: Consumer, keys: set[TopicPartitionKey] | None = None, *, wait: bool = False) -> None:
        """Nothing to commit: each transaction committed its offsets."""

    def forget(self, keys: set[TopicPartitionKey]) -> None:
        """Nothing held between transactions."""

    def publish(self, records: list[OutRecord], offsets: list[TopicPartition], group_metadata: Any) -> None:
        """Publish ``records`` and commit ``offsets`` for the consumer group in one transaction."""
        producer = self._producer
        if producer is None:
            raise RuntimeError("publisher is not started")
        errors: dict[int, KafkaError] = {}
        try:
            producer.begin_transaction()
            for index, record in enumerate(records):
                retry_produce(producer, record, index, errors)
            if offsets:
                self._retry(
                    lambda: producer.send_offsets_to_transaction(offsets, group_metadata, CALL_TIMEOUT_S),
                    "send_offsets_to_transaction",
                )
            self._retry(lambda: producer.commit_transaction(CALL_TIMEOUT_S), "commit_transaction")
        except KafkaException as e:
            self._handle(producer, e, errors)

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

    def _handle(self, producer: Producer, e: KafkaException, errors: dict[int, KafkaError]) -> None:
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
        producer.poll(0)  # serve the delivery reports still queued, so that every refused record is named
        refused = tuple(r for i, err in sorted(errors.items()) if (r := refusal(i, err)) is not None)
        for r in refused:
            log.warning("record %d of the aborted transaction was refused (%s): %s", r.index, r.code, r.reason)
        raise TransactionAborted(error.str(), refused) from e
