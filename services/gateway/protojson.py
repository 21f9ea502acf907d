"""Request bodies as proto3 JSON, and the JSON Schema of each message for the OpenAPI document.

Bodies are parsed by google.protobuf.json_format, the mapping every gRPC-JSON tool uses (camelCase and the
proto's snake_case names both accepted, unknown fields refused); the schemas are walked from the same
descriptors, so the OpenAPI document cannot drift from the protos.
"""

from __future__ import annotations

import json
import math
from typing import Any, NoReturn, TypeVar

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from starlette.requests import ClientDisconnect, Request

from .problems import Problem, bad_request

M = TypeVar("M", bound=Message)

JSON_MEDIA_TYPE = "application/json"


async def read_message(request: Request, message_type: type[M], max_body_bytes: int) -> M:
    """The request's body as ``message_type``; a Problem for a wrong content type (415), a body over
    ``max_body_bytes`` (413, refused before it is read when Content-Length says so), malformed JSON or a body
    that is not the message (400), a client gone before its body arrived (499)."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != JSON_MEDIA_TYPE:
        raise Problem(415, f"the body must be {JSON_MEDIA_TYPE}, not {media_type or 'missing'}")
    body = await _read_limited(request, max_body_bytes)
    try:
        parsed = parse_json(body)
    except ValueError as e:
        raise bad_request(f"the body is not JSON: {e}") from None
    if not isinstance(parsed, dict):
        raise bad_request(f"the body must be a JSON object, a {message_type.DESCRIPTOR.full_name}")
    try:
        return json_format.ParseDict(parsed, message_type())
    except json_format.ParseError as e:
        raise bad_request(f"the body is not a valid {message_type.DESCRIPTOR.full_name}: {e}") from None


async def _read_limited(request: Request, max_body_bytes: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_body_bytes:
        raise _too_large(max_body_bytes)
    chunks, size = [], 0
    try:
        async for chunk in request.stream():  # a chunked body has no length to check first
            size += len(chunk)
            if size > max_body_bytes:
                raise _too_large(max_body_bytes)
            chunks.append(chunk)
    except ClientDisconnect:
        # Nobody reads this answer: it keeps a client that left mid-body (or sent a body the parser refused)
        # out of the 500s and the error log.
        raise Problem(499, "the client closed the connection before its body arrived") from None
    return b"".join(chunks)


def _too_large(max_body_bytes: int) -> Problem:
    return Problem(413, f"the body is larger than {max_body_bytes} bytes")


MAX_INTEGER_DIGITS = 20  # a uint64 has 20: a longer integer fits no protobuf field


def parse_json(text: str | bytes) -> Any:
    """``text`` parsed as JSON (RFC 8259); ValueError for anything else, also for what Python's json module
    reads beyond the RFC (NaN, Infinity) and numbers no protobuf field holds (a float that overflows to
    infinity, which json_format cannot convert; an integer past 20 digits, which int() refuses past 4,300)."""
    try:
        return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float, parse_int=_bounded_int)
    except RecursionError:
        raise ValueError("it nests too deeply") from None


def _refuse_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"the number {text[:30]} is out of range")
    return number


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INTEGER_DIGITS:
        raise ValueError(f"the number {text[:30]}... is out of range")
    return int(text)


def to_json(message: Message) -> dict[str, Any]:
    """A message as proto3 JSON (camelCase names, enums by name, default values left out)."""
    return json_format.MessageToDict(message)


# --- JSON Schema -------------------------------------------------------------------------------------------
_SCALARS: dict[int, dict[str, Any]] = {
    FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    FieldDescriptor.TYPE_BYTES: {"type": "string", "format": "byte"},
    FieldDescriptor.TYPE_DOUBLE: {"type": "number"},
    FieldDescriptor.TYPE_FLOAT: {"type": "number"},
    FieldDescriptor.TYPE_INT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_SINT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_SFIXED32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_UINT32: {"type": "integer", "format": "uint32", "minimum": 0},
    FieldDescriptor.TYPE_FIXED32: {"type": "integer", "format": "uint32", "minimum": 0},
}
# proto3 JSON writes 64-bit integers as strings (a JavaScript number cannot hold them) and reads either.
_INT64 = {"oneOf": [{"type": "string", "pattern": "^-?[0-9]+$"}, {"type": "integer"}], "format": "int64"}
_WELL_KNOWN: dict[str, dict[str, Any]] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "pattern": "^-?[0-9]+(\\.[0-9]{1,9})?s$", "example": "1.5s"},
}


def schema_name(descriptor: Descriptor) -> str:
    """The OpenAPI component name of a message: its full name, dots to underscores (``aimesh_v1_TaskState``)."""
    return str(descriptor.full_name).replace(".", "_")


def message_schemas(*roots: Descriptor) -> dict[str, dict[str, Any]]:
    """The JSON Schema of each message reachable from ``roots``, by ``schema_name``."""
    schemas: dict[str, dict[str, Any]] = {}
    pending = list(roots)
    while pending:
        descriptor = pending.pop()
        name = schema_name(descriptor)
        if name in schemas or descriptor.full_name in _WELL_KNOWN:
            continue
        schemas[name] = _object_schema(descriptor)
        pending += [m for m in map(_referenced, descriptor.fields) if m is not None]
    return dict(sorted(schemas.items()))


def _referenced(field: FieldDescriptor) -> Descriptor | None:
    """The message a field's schema refers to (a map's value type; a map entry itself has no schema)."""
    message: Descriptor | None = field.message_type
    if message is not None and message.GetOptions().map_entry:
        value: Descriptor | None = message.fields_by_name["value"].message_type
        return value
    return message


def _object_schema(descriptor: Descriptor) -> dict[str, Any]:
    properties = {f.json_name: _field_schema(f) for f in descriptor.fields}
    return {"type": "object", "properties": properties}


def _field_schema(field: FieldDescriptor) -> dict[str, Any]:
    message = field.message_type
    if message is not None and message.GetOptions().map_entry:
        return {"type": "object", "additionalProperties": _single_schema(message.fields_by_name["value"])}
    single = _single_schema(field)
    return {"type": "array", "items": single} if field.is_repeated else single


def _single_schema(field: FieldDescriptor) -> dict[str, Any]:
    if field.message_type is not None:
        known = _WELL_KNOWN.get(field.message_type.full_name)
        return dict(known) if known else {"$ref": f"#/components/schemas/{schema_name(field.message_type)}"}
    if field.enum_type is not None:
        return {"type": "string", "enum": [v.name for v in field.enum_type.values]}
    return dict(_SCALARS.get(field.type, _INT64))
