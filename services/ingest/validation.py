"""Validation of SubmitTask requests: everything is checked before anything is published."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from aimesh.errors import DeadlinePassed, InvalidTask, UnknownModel
from aimesh.events import timestamp_s
from aimesh.v1 import ingest_pb2, task_pb2

PARAMETER_KEY = re.compile(r"[a-z][a-z0-9_]{0,63}")
MAX_PARAMETERS = 32
MAX_PARAMETER_VALUE_CHARS = 1024
MAX_IDEMPOTENCY_KEY_CHARS = 128
MAX_MODEL_NAME_CHARS = 128
RESERVED_PARAMETER_PREFIX = "triton_"


@dataclass(frozen=True)
class Limits:
    """What ingest accepts."""

    models: frozenset[str]
    max_text_bytes: int


def validate(request: ingest_pb2.SubmitTaskRequest, limits: Limits, *, prefix: str = "") -> None:
    """Raise InvalidTask listing every violation, UnknownModel, or DeadlinePassed; return if the request is good.

    ``prefix`` qualifies field paths, e.g. ``tasks[3].`` inside a batch.
    """
    violations: list[tuple[str, str]] = []

    def bad(field: str, why: str) -> None:
        violations.append((prefix + field, why))

    if not request.model_name:
        bad("model_name", "required")
    elif len(request.model_name) > MAX_MODEL_NAME_CHARS:
        bad("model_name", f"longer than {MAX_MODEL_NAME_CHARS} characters")
    if request.model_version and not request.model_version.isdigit():
        bad("model_version", "must be a positive integer or empty")

    kind = request.input.WhichOneof("kind") if request.HasField("input") else None
    if kind is None:
        bad("input", "required: set input.text")
    elif kind == "text":
        size = len(request.input.text.encode("utf-8"))
        if not request.input.text.strip():
            bad("input.text", "must not be empty or blank")
        elif size > limits.max_text_bytes:
            bad("input.text", f"is {size} bytes; the limit is {limits.max_text_bytes}")

    if len(request.parameters) > MAX_PARAMETERS:
        bad("parameters", f"has {len(request.parameters)} entries; the limit is {MAX_PARAMETERS}")
    for key, value in request.parameters.items():
        if not PARAMETER_KEY.fullmatch(key):
            bad(f"parameters[{key!r}]", "key must be 1-64 characters of [a-z0-9_] starting with a letter")
        elif key.startswith(RESERVED_PARAMETER_PREFIX):
            bad(f"parameters[{key!r}]", f"keys starting with {RESERVED_PARAMETER_PREFIX!r} are reserved")
        if len(value) > MAX_PARAMETER_VALUE_CHARS:
            bad(f"parameters[{key!r}]", f"value longer than {MAX_PARAMETER_VALUE_CHARS} characters")

    if len(request.idempotency_key) > MAX_IDEMPOTENCY_KEY_CHARS:
        bad("idempotency_key", f"longer than {MAX_IDEMPOTENCY_KEY_CHARS} characters")
    if request.priority not in task_pb2.Priority.values():
        bad("priority", f"unknown priority {request.priority}: use PRIORITY_INTERACTIVE or PRIORITY_BATCH")
    if request.HasField("deadline") and (request.deadline.nanos < 0 or request.deadline.nanos >= 1_000_000_000):
        bad("deadline", "nanos must be within [0, 1e9)")

    if violations:
        raise InvalidTask(violations)
    if request.model_name not in limits.models:
        raise UnknownModel(request.model_name, limits.models)
    if request.HasField("deadline") and timestamp_s(request.deadline) <= time.time():
        raise DeadlinePassed(f"{prefix}deadline is already in the past")
