"""Checks of a task's input against what its model takes: tensors that fit their datatype and shape, and, when the
model's signature is known (``signatures``), the inputs it declares."""

from __future__ import annotations

import re

from aimesh import tensors
from aimesh.v1 import task_pb2, tensor_pb2

from .signatures import ModelSignature

MAX_TENSORS = 64
MAX_TENSOR_NAME_CHARS = 256
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def check_tensors(given: task_pb2.Tensors, signature: ModelSignature | None, field: str) -> list[tuple[str, str]]:
    """Violations of a task's tensors as (field path, why); ``field`` is the path of ``input.tensors``."""
    items = given.tensors
    if not items:
        return [(field, "must hold at least one tensor")]
    if len(items) > MAX_TENSORS:
        return [(field, f"holds {len(items)} tensors; the limit is {MAX_TENSORS}")]
    violations: list[tuple[str, str]] = []
    seen: set[str] = set()
    for i, tensor in enumerate(items):
        path = f"{field}.tensors[{i}]"
        if not tensor.name:
            violations.append((f"{path}.name", "required"))
        elif len(tensor.name) > MAX_TENSOR_NAME_CHARS:
            violations.append((f"{path}.name", f"longer than {MAX_TENSOR_NAME_CHARS} characters"))
        elif tensor.name in seen:
            violations.append((f"{path}.name", f"{tensor.name!r} is given twice"))
        seen.add(tensor.name)
        violations.extend(_contents_violations(tensor, path))
    if signature is not None and not violations:
        violations.extend(signature.check(items, f"{field}.tensors"))
    return violations


def _contents_violations(tensor: tensor_pb2.InputTensor, path: str) -> list[tuple[str, str]]:
    if tensor.datatype not in tensors.DTYPES:
        return [
            (f"{path}.datatype", f"unknown datatype {tensor.datatype!r}: use one of {', '.join(tensors.DATATYPES)}")
        ]
    problem = tensors.shape_problem(tensor.shape)
    if problem:
        return [(f"{path}.shape", problem)]
    where = tensor.WhichOneof("contents")
    if where == "raw_contents":
        problem = tensors.contents_problem(tensor.datatype, tensor.shape, tensor.raw_contents)
        return [(f"{path}.raw_contents", problem)] if problem else []
    if where == "object":
        return _object_violations(tensor, f"{path}.object")
    if tensors.elements(tensor.shape) == 0:
        return []  # an empty tensor has empty contents, which proto3 cannot tell from unset
    return [(path, "set raw_contents or object")]


def _object_violations(tensor: tensor_pb2.InputTensor, path: str) -> list[tuple[str, str]]:
    ref = tensor.object
    violations = []
    if not ref.key:
        violations.append((f"{path}.key", "required"))
    if not SHA256_HEX.fullmatch(ref.sha256):
        violations.append((f"{path}.sha256", "must be 64 lowercase hex digits"))
    if tensor.datatype != "BYTES":
        expected = tensors.elements(tensor.shape) * tensors.DTYPES[tensor.datatype].itemsize
        if ref.size != expected:
            violations.append(
                (
                    f"{path}.size",
                    f"is {ref.size} bytes; {tensor.datatype} of shape {list(tensor.shape)} takes {expected}",
                )
            )
    return violations


def check_text(signature: ModelSignature | None, field: str) -> list[tuple[str, str]]:
    """A text input for a model known to take no TEXT input."""
    if signature is None or signature.takes_text:
        return []
    return [(field, f"the model takes no text; send input.tensors: {signature.describe()}")]
