"""Validation of SubmitTask requests: everything is checked before anything is published."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

from google.protobuf.timestamp_pb2 import Timestamp
from tritonclient.utils import TRITON_RESERVED_REQUEST_PARAMS, TRITON_RESERVED_REQUEST_PARAMS_PREFIX

from aimesh.errors import DeadlinePassed, InvalidTask, UnknownModel
from aimesh.events import timestamp_s
from aimesh.v1 import ingest_pb2, task_pb2

from .parameters import ParameterCatalog
from .signatures import Signatures
from .tensor_checks import check_tensors, check_text

PARAMETER_KEY = re.compile(r"[a-z][a-z0-9_]{0,63}")
MAX_PARAMETERS = 32
MAX_PARAMETER_VALUE_CHARS = 1024
MAX_IDEMPOTENCY_KEY_CHARS = 128
MAX_MODEL_NAME_CHARS = 128
# Names tritonclient's infer() refuses as request parameters (it sets them itself from its own arguments):
# a task carrying one would only fail in the worker, as a model error in the dead-letter topic.
RESERVED_PARAMETER_PREFIX = TRITON_RESERVED_REQUEST_PARAMS_PREFIX
RESERVED_PARAMETERS = frozenset(TRITON_RESERVED_REQUEST_PARAMS)
# Triton serves versions from positive, numerically named directories without leading zeros, as int64.
MODEL_VERSION = re.compile(r"[1-9][0-9]{0,18}")
MAX_MODEL_VERSION = 2**63 - 1
# google.protobuf.Timestamp's range: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z.
MIN_TIMESTAMP_S = -62_135_596_800
MAX_TIMESTAMP_S = 253_402_300_799


@dataclass(frozen=True)
class Limits:
    """What ingest accepts. ``parameters`` declares each model's parameters (none declared: not checked)."""

    models: frozenset[str]
    max_text_bytes: int
    max_deadline_s: float = 86_400.0
    parameters: ParameterCatalog = field(default_factory=lambda: ParameterCatalog({}))
    signatures: Signatures = field(default_factory=Signatures)


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
    if request.model_version and not _is_model_version(request.model_version):
        bad("model_version", f"must be empty or an integer from 1 to {MAX_MODEL_VERSION} in ASCII digits")

    violations.extend(_input_violations(request, limits, prefix))

    if len(request.parameters) > MAX_PARAMETERS:
        bad("parameters", f"has {len(request.parameters)} entries; the limit is {MAX_PARAMETERS}")
    for key, value in request.parameters.items():
        if not PARAMETER_KEY.fullmatch(key):
            bad(f"parameters[{key!r}]", "key must be 1-64 characters of [a-z0-9_] starting with a letter")
        elif key.startswith(RESERVED_PARAMETER_PREFIX) or key in RESERVED_PARAMETERS:
            bad(
                f"parameters[{key!r}]",
                f"is reserved by Triton ({', '.join(sorted(RESERVED_PARAMETERS))} and "
                f"names starting with {RESERVED_PARAMETER_PREFIX!r})",
            )
        if len(value) > MAX_PARAMETER_VALUE_CHARS:
            bad(f"parameters[{key!r}]", f"value longer than {MAX_PARAMETER_VALUE_CHARS} characters")
    for key, problem in limits.parameters.check(request.model_name, request.parameters):
        bad(f"parameters[{key!r}]", problem)

    if len(request.idempotency_key) > MAX_IDEMPOTENCY_KEY_CHARS:
        bad("idempotency_key", f"longer than {MAX_IDEMPOTENCY_KEY_CHARS} characters")
    if request.priority not in task_pb2.Priority.values():
        bad("priority", f"unknown priority {request.priority}: use PRIORITY_INTERACTIVE or PRIORITY_BATCH")
    now = time.time()
    out_of_range = _deadline_problem(request.deadline, now, limits.max_deadline_s)
    if request.HasField("deadline") and out_of_range:
        bad("deadline", out_of_range)

    if violations:
        raise InvalidTask(violations)
    if request.model_name not in limits.models:
        raise UnknownModel(request.model_name, limits.models)
    if request.HasField("deadline") and timestamp_s(request.deadline) <= now:
        raise DeadlinePassed(f"{prefix}deadline is already in the past")


def _input_violations(request: ingest_pb2.SubmitTaskRequest, limits: Limits, prefix: str) -> list[tuple[str, str]]:
    signature = limits.signatures.get(request.model_name)
    kind = request.input.WhichOneof("kind") if request.HasField("input") else None
    if kind is None:
        return [(prefix + "input", "required: set input.text or input.tensors")]
    if kind == "tensors":
        return check_tensors(request.input.tensors, signature, prefix + "input.tensors")
    size = len(request.input.text.encode("utf-8"))
    if not request.input.text.strip():
        return [(prefix + "input.text", "must not be empty or blank")]
    if size > limits.max_text_bytes:
        return [(prefix + "input.text", f"is {size} bytes; the limit is {limits.max_text_bytes}")]
    return check_text(signature, prefix + "input.text")


def _is_model_version(version: str) -> bool:
    # str.isdigit() also holds for "²" and "١": only ASCII digits name a Triton version.
    return MODEL_VERSION.fullmatch(version) is not None and int(version) <= MAX_MODEL_VERSION


def _deadline_problem(deadline: Timestamp, now: float, max_deadline_s: float) -> str | None:
    """Why a deadline is out of range, or None. A past deadline is not out of range (it is a precondition)."""
    if not 0 <= deadline.nanos < 1_000_000_000:
        return "nanos must be within [0, 1e9)"
    if not MIN_TIMESTAMP_S <= deadline.seconds <= MAX_TIMESTAMP_S:
        return f"is not a valid Timestamp (years 1 to 9999); a deadline must lie within the next {max_deadline_s:g} s"
    if timestamp_s(deadline) > now + max_deadline_s:
        return f"is more than {max_deadline_s:g} s from now; a deadline must lie within the next {max_deadline_s:g} s"
    return None
