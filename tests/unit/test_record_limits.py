"""Fitting result and dead-letter records to the record size limit before they are published (no Kafka)."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaException, Producer

from aimesh import events
from aimesh.v1 import result_pb2
from aimesh.worker.ledger import OutRecord
from aimesh.worker.record_limits import RecordLimits, record_bytes

LIMIT = 100_000
TASK_ID = "6f1c2a4e-3b7d-4e8a-9c0f-1a2b3c4d5e6f"
OURS = [(events.DLQ_REASON_HEADER, b"result_too_large"), (events.DLQ_ERROR_HEADER, b"too large")]


def limits() -> RecordLimits:
    return RecordLimits(results_topic="results", dead_letter_topic="dlq", max_record_bytes=LIMIT)


def result(text: str) -> result_pb2.AIResultEvent:
    r = result_pb2.AIResultEvent(
        schema_version=1,
        task_id=TASK_ID,
        status=result_pb2.TASK_STATUS_SUCCEEDED,
        model_name="sleep",
        worker_id="w",
        tenant="acme",
        sequence=3,
    )
    r.output.tensors.add(name="TEXT", datatype="BYTES", shape=[1], string_data=[text])
    return r


def test_a_result_that_fits_is_kept_as_it_is() -> None:
    small = result("x" * 1000)
    assert limits().fit_result(small) is small


def sent(r: result_pb2.AIResultEvent, *trace_context: tuple[str, bytes]) -> OutRecord:
    return OutRecord("results", TASK_ID.encode(), r.SerializeToString(), [*events.result_headers(), *trace_context])


def test_a_result_whose_record_fits_only_without_its_trace_context_headers_is_too_large() -> None:
    trace_context = [
        ("traceparent", b"00-" + b"1" * 32 + b"-" + b"2" * 16 + b"-01"),
        ("tracestate", b"v=" + b"s" * 510),
    ]
    over = record_bytes(sent(result("x" * LIMIT))) - LIMIT
    at_the_limit = result("x" * (LIMIT - over))
    assert record_bytes(sent(at_the_limit)) <= LIMIT < record_bytes(sent(at_the_limit, *trace_context))

    fitted = limits().fit_result(at_the_limit)

    assert fitted is not None and fitted.error.code == result_pb2.ERROR_CODE_RESULT_TOO_LARGE


def test_a_result_over_the_limit_becomes_a_failed_result_too_large_that_fits() -> None:
    big = result("x" * LIMIT)
    fitted = limits().fit_result(big)
    assert fitted is not None
    assert fitted.status == result_pb2.TASK_STATUS_FAILED
    assert fitted.error.code == result_pb2.ERROR_CODE_RESULT_TOO_LARGE and not fitted.error.retryable
    size = limits().result_bytes(big)
    assert f"the result is {size} bytes, over the {LIMIT}-byte record limit" in fitted.error.message
    assert not fitted.HasField("output")
    assert (fitted.task_id, fitted.tenant, fitted.model_name, fitted.sequence) == (TASK_ID, "acme", "sleep", 3)
    assert limits().result_bytes(fitted) <= LIMIT
    assert limits().fit_result(result("x" * LIMIT)) == fitted  # the same input ends the same way


def test_a_minimal_result_drops_copied_fields_that_alone_would_not_fit_and_none_fits_a_giant_task_id() -> None:
    hostile = result("x")
    hostile.tenant = "t" * LIMIT
    minimal = limits().minimal_result(hostile, result_pb2.ERROR_CODE_RESULT_REFUSED, "refused")
    assert minimal is not None and minimal.tenant == "" and limits().result_bytes(minimal) <= LIMIT
    hostile.task_id = "i" * LIMIT
    assert limits().minimal_result(hostile, result_pb2.ERROR_CODE_RESULT_REFUSED, "refused") is None


def test_a_dead_letter_record_that_fits_is_the_task_record_byte_for_byte() -> None:
    record = limits().fit_dead_letter(b"key", b"v" * 1000, OURS, [("traceparent", b"00-abc")])
    assert (record.key, record.value, record.headers) == (b"key", b"v" * 1000, [*OURS, ("traceparent", b"00-abc")])


def test_an_oversize_dead_letter_record_keeps_its_headers_and_a_prefix_of_its_value() -> None:
    value = bytes(range(256)) * 1000
    record = limits().fit_dead_letter(b"key", value, OURS, [("traceparent", b"00-abc")])
    headers = dict(record.headers)
    assert headers[events.DLQ_TRUNCATED_HEADER] == str(len(value)).encode()
    assert headers["traceparent"] == b"00-abc" and headers[events.DLQ_REASON_HEADER] == b"result_too_large"
    assert record.value is not None and value.startswith(record.value) and len(record.value) > LIMIT - 500
    assert record_bytes(record) == LIMIT  # as much of the value as fits


def test_huge_original_headers_and_key_are_cut_when_cutting_the_value_is_not_enough() -> None:
    record = limits().fit_dead_letter(b"k" * LIMIT, b"value", OURS, [("junk", b"j" * LIMIT)])
    assert record_bytes(record) <= LIMIT
    assert [name for name, _ in record.headers] == [*(n for n, _ in OURS), events.DLQ_TRUNCATED_HEADER]
    assert record.key == b"k" * 1024 and record.value == b"value"


def test_the_minimal_dead_letter_record_has_no_value_and_says_how_large_it_was() -> None:
    record = limits().minimal_dead_letter(b"key", 123_456, OURS)
    assert record.value == b"" and dict(record.headers)[events.DLQ_TRUNCATED_HEADER] == b"123456"


@pytest.mark.parametrize("extra_headers", [0, 5])
def test_a_record_measured_at_the_limit_is_one_librdkafka_accepts(extra_headers: int) -> None:
    """The measure is at least librdkafka's own (checked against message.max.bytes in produce(), before any broker)."""
    headers = [(f"h{i}", b"v" * i) for i in range(extra_headers)]
    empty = OutRecord("t", b"key", b"", headers)
    at_limit = OutRecord("t", b"key", b"x" * (LIMIT - record_bytes(empty)), headers)
    assert record_bytes(at_limit) == LIMIT
    producer = Producer({"bootstrap.servers": "127.0.0.1:1", "message.max.bytes": LIMIT, "log_level": 0})
    producer.produce("t", key=at_limit.key, value=at_limit.value, headers=headers)  # accepted
    with pytest.raises(KafkaException):  # while a bit more than the limit itself is refused
        producer.produce("t", key=b"key", value=b"x" * (LIMIT + 1), headers=headers)
    producer.purge()
