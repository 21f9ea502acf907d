"""Encoding and decoding of the Kafka payloads (AITaskEvent, AIResultEvent) and their record headers."""

from __future__ import annotations

import time
from typing import TypeVar

from google.protobuf import message as pb_message
from google.protobuf.timestamp_pb2 import Timestamp

from aimesh.errors import UndecodableRecord
from aimesh.kafka import Headers
from aimesh.v1 import result_pb2, task_pb2

SCHEMA_VERSION = 1
CONTENT_TYPE_HEADER = "content-type"
TASK_CONTENT_TYPE = b"application/x-protobuf; messageType=aimesh.v1.AITaskEvent"
RESULT_CONTENT_TYPE = b"application/x-protobuf; messageType=aimesh.v1.AIResultEvent"
CANCEL_CONTENT_TYPE = b"application/x-protobuf; messageType=aimesh.v1.AICancelEvent"

# Sequence numbers of a task's updates (AIResultEvent.sequence): QUEUED, RUNNING, then partial outputs from
# FIRST_PARTIAL_SEQUENCE on, and the terminal result one past the last partial output.
QUEUED_SEQUENCE = 1
RUNNING_SEQUENCE = 2
FIRST_PARTIAL_SEQUENCE = 3

M = TypeVar("M", bound=pb_message.Message)
E = TypeVar("E", task_pb2.AITaskEvent, result_pb2.AIResultEvent, task_pb2.AICancelEvent)

# Headers of a dead-letter record. Its key and value are the original record's, byte for byte, unless cut to fit.
DLQ_REASON_HEADER = "aimesh.dlq.reason"  # a short machine-readable reason, one of DLQ_REASONS
DLQ_ERROR_HEADER = "aimesh.dlq.error"  # a human-readable message
DLQ_TOPIC_HEADER = "aimesh.dlq.original.topic"
DLQ_PARTITION_HEADER = "aimesh.dlq.original.partition"
DLQ_OFFSET_HEADER = "aimesh.dlq.original.offset"
DLQ_ATTEMPTS_HEADER = "aimesh.dlq.attempts"  # how many times inference was tried (0: never reached Triton)
DLQ_WORKER_HEADER = "aimesh.dlq.worker"
DLQ_TASK_ID_HEADER = "aimesh.dlq.task_id"  # present when the task id could be read
# Present when the record was cut to fit the record size limit: the original value's size in bytes. The value is then
# a prefix of the original (empty when Kafka refused even the cut record); the key may be cut and the original headers
# dropped too.
DLQ_TRUNCATED_HEADER = "aimesh.dlq.truncated"

TERMINAL_STATUSES = frozenset(
    {
        result_pb2.TASK_STATUS_SUCCEEDED,
        result_pb2.TASK_STATUS_FAILED,
        result_pb2.TASK_STATUS_EXPIRED,
        result_pb2.TASK_STATUS_CANCELLED,
    }
)


def task_headers() -> Headers:
    """Headers of a new tasks-topic record (trace context is added by the send span)."""
    return [(CONTENT_TYPE_HEADER, TASK_CONTENT_TYPE)]


def result_headers() -> Headers:
    """Headers of a new results-topic record."""
    return [(CONTENT_TYPE_HEADER, RESULT_CONTENT_TYPE)]


def cancel_headers() -> Headers:
    """Headers of a new cancellations-topic record."""
    return [(CONTENT_TYPE_HEADER, CANCEL_CONTENT_TYPE)]


def is_terminal(status: int) -> bool:
    return status in TERMINAL_STATUSES


def now_timestamp() -> Timestamp:
    # Timestamp.GetCurrentTime goes through datetime and calendar: several times slower, on every task.
    seconds, nanos = divmod(time.time_ns(), 1_000_000_000)
    return Timestamp(seconds=seconds, nanos=nanos)


def timestamp_s(ts: Timestamp) -> float:
    """Seconds since the epoch of a Timestamp (0.0 when unset)."""
    return ts.seconds + ts.nanos / 1e9


def decode_task(value: bytes | None) -> task_pb2.AITaskEvent:
    """Parse a tasks-topic record value; raise UndecodableRecord if it is not a task this version reads."""
    return _decode(task_pb2.AITaskEvent, value, "task", keep_task_id=True)


def decode_result(value: bytes | None) -> result_pb2.AIResultEvent:
    """Parse a results-topic record value; raise UndecodableRecord if it is not a result this version reads."""
    return _decode(result_pb2.AIResultEvent, value, "result")


def decode_cancel(value: bytes | None) -> task_pb2.AICancelEvent:
    """Parse a cancellations-topic record value; raise UndecodableRecord if it is not one this version reads."""
    return _decode(task_pb2.AICancelEvent, value, "cancel")


def _decode(cls: type[E], value: bytes | None, kind: str, *, keep_task_id: bool = False) -> E:
    """``value`` parsed as ``cls``, with a known schema version and a task id. ``keep_task_id``: the error for an
    unknown version carries the task id (a task's FAILED result can still be published)."""
    event = _parse(cls, value)
    if event.schema_version != SCHEMA_VERSION:
        raise UndecodableRecord(
            f"unknown {kind} schema version {event.schema_version}",
            reason="unknown_schema_version",
            task_id=event.task_id if keep_task_id else "",
        )
    if not event.task_id:
        raise UndecodableRecord(f"{kind} record has no task_id", reason="missing_task_id")
    return event


def _parse(cls: type[M], value: bytes | None) -> M:
    if not value:
        raise UndecodableRecord("empty record value", reason="empty_value")
    event = cls()
    try:
        event.ParseFromString(value)
    except pb_message.DecodeError as e:
        raise UndecodableRecord(f"not a {cls.DESCRIPTOR.full_name}: {e}", reason="not_protobuf") from e
    return event
