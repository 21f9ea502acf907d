"""Structured logs: one JSON object per line with the service, task id and trace ids; readable text otherwise."""

import io
import json
import logging
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider

from aimesh import runtime


@pytest.fixture
def stderr() -> Iterator[io.StringIO]:
    yield io.StringIO()
    logging.getLogger().handlers.clear()


def test_json_lines_carry_service_task_and_trace_ids(stderr: io.StringIO) -> None:
    runtime.configure_logging("worker", "INFO", "json", stderr)
    tracer = TracerProvider().get_tracer("test")
    token = runtime.task_id_var.set("task-42")
    try:
        with tracer.start_as_current_span("work") as span:
            logging.getLogger("aimesh.test").info("inferring %s", "now")
    finally:
        runtime.task_id_var.reset(token)
    logging.getLogger("aimesh.test").warning("outside")
    first, second = (json.loads(line) for line in stderr.getvalue().splitlines())
    context = span.get_span_context()
    assert first["level"] == "INFO" and first["service"] == "worker" and first["logger"] == "aimesh.test"
    assert first["message"] == "inferring now" and first["task_id"] == "task-42"
    assert first["trace_id"] == f"{context.trace_id:032x}" and first["span_id"] == f"{context.span_id:016x}"
    assert second["task_id"] is None and second["trace_id"] is None


def test_auto_is_text_on_a_terminal_and_json_elsewhere(stderr: io.StringIO, monkeypatch: pytest.MonkeyPatch) -> None:
    runtime.configure_logging("ingest", "INFO", "auto", stderr)
    logging.getLogger("x").info("piped")
    assert json.loads(stderr.getvalue())["message"] == "piped"
    monkeypatch.setattr(stderr, "isatty", lambda: True)
    runtime.configure_logging("ingest", "INFO", "auto", stderr)
    logging.getLogger("x").info("on a terminal")
    assert stderr.getvalue().splitlines()[-1].endswith("INFO ingest x: on a terminal")
