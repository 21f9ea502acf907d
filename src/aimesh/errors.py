"""Domain errors. Adapters translate transport errors into these (``raise ... from e``); the gRPC edge
turns them into status codes. Whether a retry can help is a property of the error."""

from __future__ import annotations

from typing import Any


class AimeshError(Exception):
    """Root of every aimesh error."""

    retryable: bool = False


class BrokerUnavailable(AimeshError):
    """Kafka did not acknowledge a record in time: it is not known to be durable."""

    retryable = True

    def __init__(self, message: str, *, kafka_error: Any = None) -> None:
        super().__init__(message)
        self.kafka_error = kafka_error


class PublishInDoubt(BrokerUnavailable):
    """Kafka did not acknowledge a record that may still have been written (a delivery timeout): whoever
    retries it must first learn whether it landed, or risk a second copy. ``record`` is what was sent."""

    def __init__(self, message: str, *, record: Any, kafka_error: Any = None) -> None:
        super().__init__(message, kafka_error=kafka_error)
        self.record = record


class RecordTooLarge(AimeshError):
    """A record is larger than the producer may send (``AIMESH_MAX_RECORD_BYTES``, librdkafka's
    message.max.bytes or the broker's max.message.bytes): no retry makes it fit."""

    def __init__(self, message: str, *, record_bytes: int | None = None, limit_bytes: int | None = None) -> None:
        super().__init__(message)
        self.record_bytes = record_bytes
        self.limit_bytes = limit_bytes


class InvalidTask(AimeshError):
    """A task request breaks the contract. ``violations`` maps field paths to what is wrong."""

    def __init__(self, violations: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{field}: {why}" for field, why in violations))
        self.violations = violations


class UnknownModel(AimeshError):
    """The task names a model this deployment does not serve."""

    def __init__(self, model_name: str, known: frozenset[str]) -> None:
        super().__init__(f"model {model_name!r} is not served here; known models: {', '.join(sorted(known))}")
        self.model_name = model_name


class DeadlinePassed(AimeshError):
    """The task's deadline was already over when it was submitted."""


class UndecodableRecord(AimeshError):
    """A Kafka record that is not a task or result this version can read. ``reason`` says why in one of
    REASONS (a metric label); ``task_id`` is set when the record's task id could still be read."""

    REASONS = ("empty_value", "not_protobuf", "unknown_schema_version", "missing_task_id")

    def __init__(self, message: str, *, reason: str, task_id: str = "") -> None:
        super().__init__(message)
        self.reason = reason
        self.task_id = task_id
