"""The `aimesh` CLI on the client library, against the threaded_fakes: output, --json lines, exit codes."""

from __future__ import annotations

import json
from datetime import timedelta

import click
import pytest
from client_fakes import OTHER, TASK, Failure, ThreadedFakes, aimesh, state, story
from google.rpc import code_pb2

from aimesh.client.cli import EXIT_CALL_FAILED, EXIT_TASK_UNSUCCESSFUL, EXIT_USAGE, Duration
from aimesh.v1 import ingest_pb2, result_pb2, task_pb2


def test_submit_prints_the_task_id_and_sends_the_options(threaded_fakes: ThreadedFakes) -> None:
    result = aimesh(
        threaded_fakes,
        "submit",
        "summarize",
        "Some text.",
        "-p",
        "sentences=2",
        "--priority",
        "batch",
        "--deadline",
        "2m",
    )
    assert result.exit_code == 0, result.output
    [request] = threaded_fakes.ingest.requests
    assert isinstance(request, ingest_pb2.SubmitTaskRequest)
    assert result.stdout.strip() and len(result.stdout.split()) == 1
    assert dict(request.parameters) == {"sentences": "2"} and request.priority == task_pb2.PRIORITY_BATCH
    assert request.HasField("deadline") and request.idempotency_key


def test_submit_wait_streams_tokens_then_the_final_output(threaded_fakes: ThreadedFakes) -> None:
    threaded_fakes.ingest.task_ids = [TASK, OTHER]
    threaded_fakes.notifier.updates = {t: story(t, ["Once", " upon", " a", " time"]) for t in (TASK, OTHER)}
    result = aimesh(threaded_fakes, "submit", "generate", "Tell me", "--wait")
    assert result.exit_code == 0, result.output
    assert result.stdout == "Once upon a time\n"  # streamed; the whole text is not printed twice
    assert "QUEUED" in result.stderr and "SUCCEEDED" in result.stderr and TASK in result.stderr

    result = aimesh(threaded_fakes, "--json", "submit", "generate", "Tell me", "--wait")
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines[0]["taskId"] == OTHER and [line["sequence"] for line in lines[1:]] == [1, 2, 3, 4, 5, 6, 7]
    assert lines[-1]["status"] == "TASK_STATUS_SUCCEEDED"


def test_watch_get_and_cancel(threaded_fakes: ThreadedFakes) -> None:
    failed = state(TASK, 3, result_pb2.TASK_STATUS_FAILED)
    failed.result.error.code = result_pb2.ERROR_CODE_MODEL_ERROR
    failed.result.error.message = "the model raised"
    threaded_fakes.notifier.updates[TASK] = [*story(TASK, [])[:2], failed]
    result = aimesh(threaded_fakes, "watch", TASK)
    assert result.exit_code == EXIT_TASK_UNSUCCESSFUL
    assert f"task {TASK} FAILED: MODEL_ERROR: the model raised" in result.stderr

    result = aimesh(threaded_fakes, "--json", "get", TASK)
    assert result.exit_code == EXIT_TASK_UNSUCCESSFUL and json.loads(result.stdout)["sequence"] == 3

    result = aimesh(threaded_fakes, "cancel", TASK)
    assert result.exit_code == 0 and "had ended already: FAILED" in result.stdout

    result = aimesh(threaded_fakes, "watch", TASK, "--after-sequence", "3")
    assert result.exit_code == 0 and result.stdout == ""  # nothing after the terminal update


def test_a_failed_call_is_one_line_with_the_grpc_code(threaded_fakes: ThreadedFakes) -> None:
    result = aimesh(threaded_fakes, "get", TASK)
    assert result.exit_code == EXIT_CALL_FAILED
    assert result.stderr == f"aimesh: error: NOT_FOUND: task {TASK} not found [TASK_NOT_FOUND]\n"


def test_usage_errors(threaded_fakes: ThreadedFakes) -> None:
    assert aimesh(threaded_fakes, "submit", "m", "t", "-p", "novalue").exit_code == EXIT_USAGE
    assert aimesh(threaded_fakes, "submit", "m", "t", "--deadline", "soon").exit_code == EXIT_USAGE
    assert aimesh(threaded_fakes, "submit", "m", "t", "--priority", "urgent").exit_code == EXIT_USAGE
    assert not threaded_fakes.ingest.requests


def test_durations() -> None:
    parse = Duration().convert
    assert parse("500ms", None, None) == timedelta(milliseconds=500)
    assert parse("30s", None, None) == parse("30", None, None) == timedelta(seconds=30)
    assert parse("2m", None, None) == timedelta(minutes=2) and parse("1.5h", None, None) == timedelta(minutes=90)
    for bad in ("", "0s", "-1s", "3 days"):
        with pytest.raises(click.BadParameter):
            parse(bad, None, None)


def test_unimplemented_is_reported_as_such(threaded_fakes: ThreadedFakes) -> None:
    threaded_fakes.notifier.updates[TASK] = story(TASK)
    threaded_fakes.notifier.failures = [Failure(code_pb2.UNIMPLEMENTED, "Method not found!")]
    result = aimesh(threaded_fakes, "cancel", TASK)
    assert result.exit_code == EXIT_CALL_FAILED and "UNIMPLEMENTED" in result.stderr
