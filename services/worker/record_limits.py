"""Records that fit: what a finished task publishes, measured against the record size limit before it enters the
ledger, and the smaller records that replace those Kafka refuses anyway.

A record is measured as librdkafka measures it against ``message.max.bytes`` (key, value, each header's name and
value) plus a per-record overhead at least as large as librdkafka's, against ``AIMESH_MAX_RECORD_BYTES``:

- a result that would not fit becomes a FAILED result with ``ERROR_CODE_RESULT_TOO_LARGE``, without its output, its
  message giving the size and the limit;
- a dead-letter record that would not fit keeps its own headers and a prefix of its value (the task record), with
  ``aimesh.dlq.truncated`` giving the original value's size; if even that does not fit, its key is cut and the
  original record's headers are dropped.

Both depend only on the task and the limit, so a task read again after a restart ends the same way, and its outcome
can never be the record that makes a transaction abort for good.
"""

from __future__ import annotations

from aimesh import events
from aimesh.kafka import Headers
from aimesh.v1 import result_pb2

from .ledger import OutRecord

# librdkafka adds at most 36 bytes of framing to a record (length, attributes, timestamp and offset deltas, key,
# value and header-count varints) and up to 10 per header (two length varints): counted generously.
RECORD_OVERHEAD_BYTES = 64
HEADER_OVERHEAD_BYTES = 10
# What tracing adds to a result record's headers when it is sent: traceparent (55 characters) and, when the task's
# trace carries one, tracestate (at most 512 by W3C Trace Context).
TRACE_CONTEXT_BYTES = len("traceparent") + 55 + len("tracestate") + 512 + 2 * HEADER_OVERHEAD_BYTES
# What a dead-letter record keeps at most of its error message and of its key when it has to be cut.
MAX_ERROR_HEADER_BYTES = 4096
MAX_CUT_KEY_BYTES = 1024


def _as_bytes(value: str | bytes | None) -> bytes:
    return value.encode() if isinstance(value, str) else (value or b"")


def headers_bytes(headers: Headers) -> int:
    return sum(len(name.encode()) + len(_as_bytes(value)) + HEADER_OVERHEAD_BYTES for name, value in headers)


def record_bytes(record: OutRecord) -> int:
    """The size ``record`` counts for against the limit."""
    return RECORD_OVERHEAD_BYTES + len(record.key or b"") + len(record.value or b"") + headers_bytes(record.headers)


def cut_utf8(text: str, max_bytes: int) -> str:
    """``text`` cut to at most ``max_bytes`` of UTF-8, never inside a character."""
    return text.encode("utf-8", "replace")[: max(0, max_bytes)].decode("utf-8", "ignore")


class RecordLimits:
    """Fits result and dead-letter records to ``max_record_bytes``."""

    def __init__(self, *, results_topic: str, dead_letter_topic: str, max_record_bytes: int) -> None:
        self.results_topic = results_topic
        self.dead_letter_topic = dead_letter_topic
        self.max_record_bytes = max_record_bytes

    def result_bytes(self, result: result_pb2.AIResultEvent) -> int:
        # ByteSize, not a serialization: this runs for every result, which is serialized once more to be sent.
        key = len(result.task_id.encode())
        headers = headers_bytes(events.result_headers()) + TRACE_CONTEXT_BYTES
        return RECORD_OVERHEAD_BYTES + key + result.ByteSize() + headers

    def fit_result(self, result: result_pb2.AIResultEvent) -> result_pb2.AIResultEvent | None:
        """``result`` if its record fits; else a FAILED result, ERROR_CODE_RESULT_TOO_LARGE, without the output (None
        if not even that fits: a task id larger than the limit, which no record can carry)."""
        size = self.result_bytes(result)
        if size <= self.max_record_bytes:
            return result
        message = (
            f"the result is {size} bytes, over the {self.max_record_bytes}-byte record limit "
            "(AIMESH_MAX_RECORD_BYTES): its output was dropped"
        )
        return self.minimal_result(result, result_pb2.ERROR_CODE_RESULT_TOO_LARGE, message)

    def minimal_result(
        self, result: result_pb2.AIResultEvent, code: result_pb2.ErrorCode.ValueType, message: str
    ) -> result_pb2.AIResultEvent | None:
        """The smallest FAILED result of ``result``'s task: no output, ``code`` and ``message`` as its error. Fields
        copied from the task record (model, tenant) are dropped too if they alone would not fit. None if even the
        task id does not fit."""
        failed = result_pb2.AIResultEvent()
        failed.CopyFrom(result)
        failed.status = result_pb2.TASK_STATUS_FAILED
        failed.ClearField("output")
        failed.error.CopyFrom(result_pb2.TaskError(code=code, message=cut_utf8(message, MAX_ERROR_HEADER_BYTES)))
        if self.result_bytes(failed) > self.max_record_bytes:
            for name in ("model_name", "model_version", "tenant"):
                failed.ClearField(name)
        return failed if self.result_bytes(failed) <= self.max_record_bytes else None

    def fit_dead_letter(self, key: bytes | None, value: bytes | None, ours: Headers, original: Headers) -> OutRecord:
        """A dead-letter record of ``key`` and ``value`` with ``ours`` then the ``original`` record's headers, cut to
        fit: first the value, then (if that is not enough) the key, with the original headers dropped."""
        whole = OutRecord(self.dead_letter_topic, key, value, [*ours, *original])
        if record_bytes(whole) <= self.max_record_bytes:
            return whole
        cut = self._cut_value(key, value, [*ours, *original])
        if cut is None:
            cut = self._cut_value(_cut_key(key), value, _cut_headers(ours))
        return cut if cut is not None else self.minimal_dead_letter(key, len(value or b""), ours)

    def minimal_dead_letter(self, key: bytes | None, value_bytes: int, ours: Headers) -> OutRecord:
        """The smallest dead-letter record of a task record whose value was ``value_bytes`` long: no value, the key
        and ``ours`` headers cut."""
        marked: Headers = [*_cut_headers(ours), (events.DLQ_TRUNCATED_HEADER, str(value_bytes).encode())]
        return OutRecord(self.dead_letter_topic, _cut_key(key), b"", marked)

    def _cut_value(self, key: bytes | None, value: bytes | None, headers: Headers) -> OutRecord | None:
        """A record of ``key``, ``headers`` and the longest prefix of ``value`` that fits, marked as cut; None if
        the key and headers alone leave no room."""
        value = value or b""
        marked: Headers = [*headers, (events.DLQ_TRUNCATED_HEADER, str(len(value)).encode())]
        room = self.max_record_bytes - record_bytes(OutRecord(self.dead_letter_topic, key, b"", marked))
        if room < 0:
            return None
        return OutRecord(self.dead_letter_topic, key, value[:room], marked)


def _cut_key(key: bytes | None) -> bytes | None:
    return None if key is None else key[:MAX_CUT_KEY_BYTES]


def _cut_headers(headers: Headers) -> Headers:
    return [(name, _as_bytes(value)[:MAX_ERROR_HEADER_BYTES]) for name, value in headers]
