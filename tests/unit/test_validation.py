import time

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from aimesh.errors import DeadlinePassed, InvalidTask, UnknownModel
from aimesh.ingest.validation import Limits, validate
from aimesh.v1 import ingest_pb2, task_pb2

LIMITS = Limits(models=frozenset({"summarize", "sentiment"}), max_text_bytes=100)


def request(**fields) -> ingest_pb2.SubmitTaskRequest:
    fields.setdefault("model_name", "sentiment")
    fields.setdefault("input", task_pb2.TaskInput(text="good day"))
    return ingest_pb2.SubmitTaskRequest(**fields)


def violations(req: ingest_pb2.SubmitTaskRequest, prefix: str = "") -> list[str]:
    with pytest.raises(InvalidTask) as info:
        validate(req, LIMITS, prefix=prefix)
    return [field for field, _ in info.value.violations]


def test_a_good_request_passes() -> None:
    validate(request(parameters={"sentences": "2"}, idempotency_key="k-1"), LIMITS)


def test_missing_and_blank_input_are_field_violations() -> None:
    assert violations(ingest_pb2.SubmitTaskRequest(model_name="sentiment")) == ["input"]
    assert violations(request(input=task_pb2.TaskInput(text="   \n"))) == ["input.text"]


def test_oversized_text_counts_utf8_bytes() -> None:
    validate(request(input=task_pb2.TaskInput(text="é" * 50)), LIMITS)  # 100 bytes: at the limit
    assert violations(request(input=task_pb2.TaskInput(text="é" * 51))) == ["input.text"]


def test_malformed_parameters_are_named() -> None:
    found = violations(request(parameters={"Bad-Key": "1", "triton_x": "2", "ok": "v" * 1025}))
    assert sorted(found) == ["parameters['Bad-Key']", "parameters['ok']", "parameters['triton_x']"]


def test_every_violation_is_reported_at_once_with_prefix() -> None:
    found = violations(ingest_pb2.SubmitTaskRequest(idempotency_key="k" * 129), prefix="tasks[2].")
    assert found == ["tasks[2].model_name", "tasks[2].input", "tasks[2].idempotency_key"]


def test_unknown_model_is_not_a_field_violation() -> None:
    with pytest.raises(UnknownModel):
        validate(request(model_name="gpt-17"), LIMITS)


def test_deadline_in_the_past_is_rejected() -> None:
    past = Timestamp(seconds=int(time.time()) - 10)
    with pytest.raises(DeadlinePassed):
        validate(request(deadline=past), LIMITS)
    validate(request(deadline=Timestamp(seconds=int(time.time()) + 60)), LIMITS)


def test_priority_must_be_a_known_class() -> None:
    for known in (task_pb2.PRIORITY_UNSPECIFIED, task_pb2.PRIORITY_INTERACTIVE, task_pb2.PRIORITY_BATCH):
        validate(request(priority=known), LIMITS)
    assert violations(request(priority=3), prefix="tasks[2].") == ["tasks[2].priority"]
    assert violations(request(priority=-1)) == ["priority"]


def test_a_deadline_beyond_the_maximum_or_outside_timestamps_is_a_field_violation() -> None:
    limits = Limits(models=frozenset({"sentiment"}), max_text_bytes=100, max_deadline_s=60)
    for seconds in (10**13, -(10**13), int(time.time()) + 120):
        with pytest.raises(InvalidTask) as info:
            validate(request(deadline=Timestamp(seconds=seconds)), limits, prefix="tasks[0].")
        assert [field for field, _ in info.value.violations] == ["tasks[0].deadline"]
    validate(request(deadline=Timestamp(seconds=int(time.time()) + 50)), limits)


def test_triton_reserved_parameter_names_are_refused() -> None:
    reserved = ["priority", "timeout", "headers", "sequence_id", "sequence_start", "sequence_end", "binary_data_output"]
    found = violations(request(parameters=dict.fromkeys(reserved, "1")))
    assert sorted(found) == sorted(f"parameters[{name!r}]" for name in reserved)


def test_model_version_takes_ascii_digits_only_in_triton_range() -> None:
    for version in ("١", "²", "0", "01", "-1", str(2**63)):
        assert violations(request(model_version=version)) == ["model_version"], version
    validate(request(model_version=str(2**63 - 1)), LIMITS)
    validate(request(model_version="3"), LIMITS)
