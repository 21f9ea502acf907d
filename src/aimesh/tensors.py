"""Tensors in Triton's raw form, the one codec every service shares.

A task's tensor travels as its datatype (KServe v2 names), its shape and its raw contents: the elements in
row-major order, little-endian, one byte per BOOL, and for BYTES each element as a 4-byte little-endian length
followed by its bytes (Triton's ``raw_input_contents``). Nothing is converted on the way, so a float or an image
arrives bit for bit; these helpers check that contents fit their shape and convert to and from numpy at the edges
(the worker's Triton call, the client).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from aimesh.errors import AimeshError

# Each datatype's numpy element type, little-endian; BYTES elements are Python bytes in an object array.
DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(np.object_),
}
DATATYPES = tuple(DTYPES)
# Triton's model configuration names of the same types (TYPE_STRING is BYTES).
CONFIG_TYPES = {f"TYPE_{name}" if name != "BYTES" else "TYPE_STRING": name for name in DATATYPES}
MAX_RANK = 16
_LENGTH = struct.Struct("<I")


class BadTensor(AimeshError, ValueError):
    """Contents that do not fit their datatype and shape."""


def elements(shape: Sequence[int]) -> int:
    return math.prod(shape)


def shape_problem(shape: Sequence[int]) -> str | None:
    """Why a task's tensor shape is unusable, or None."""
    if len(shape) > MAX_RANK:
        return f"has {len(shape)} dimensions; the limit is {MAX_RANK}"
    if any(d < 0 for d in shape):
        return "dimensions must be >= 0"
    return None


def contents_problem(datatype: str, shape: Sequence[int], raw: bytes | memoryview) -> str | None:
    """Why ``raw`` is not the contents of a ``datatype`` tensor of ``shape``, or None."""
    if datatype not in DTYPES:
        return f"unknown datatype {datatype!r}: use one of {', '.join(DATATYPES)}"
    count = elements(shape)
    if datatype != "BYTES":
        expected = count * DTYPES[datatype].itemsize
        if len(raw) != expected:
            return f"has {len(raw)} bytes of contents; {datatype} of shape {list(shape)} takes {expected}"
        return None
    try:
        found = _bytes_elements(raw)
    except BadTensor as e:
        return str(e)
    if found != count:
        return f"holds {found} BYTES elements; shape {list(shape)} takes {count}"
    return None


def _bytes_elements(raw: bytes | memoryview) -> int:
    """How many length-prefixed elements ``raw`` holds; BadTensor if one overruns the end."""
    view, offset, count = memoryview(raw), 0, 0
    while offset < len(view):
        if offset + _LENGTH.size > len(view):
            raise BadTensor(f"BYTES contents end inside an element's length, at byte {offset}")
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += _LENGTH.size + length
        if offset > len(view):
            raise BadTensor(f"BYTES element {count} is {length} bytes long, past the end of the contents")
        count += 1
    return count


def to_numpy(datatype: str, shape: Sequence[int], raw: bytes | memoryview) -> npt.NDArray[Any]:
    """The array of a tensor's raw contents (checked: BadTensor if they do not fit)."""
    problem = contents_problem(datatype, shape, raw)
    if problem:
        raise BadTensor(problem)
    if datatype != "BYTES":
        return np.frombuffer(raw, dtype=DTYPES[datatype]).reshape(shape)
    view, offset, items = memoryview(raw), 0, []
    while offset < len(view):
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += _LENGTH.size
        items.append(bytes(view[offset : offset + length]))
        offset += length
    array = np.empty(len(items), dtype=np.object_)
    array[:] = items
    return array.reshape(shape)


def to_raw(datatype: str, array: npt.NDArray[Any]) -> bytes:
    """A tensor's raw contents from its array (BYTES elements as bytes, or str encoded in UTF-8)."""
    if datatype not in DTYPES:
        raise BadTensor(f"unknown datatype {datatype!r}")
    if datatype != "BYTES":
        return np.ascontiguousarray(array, dtype=DTYPES[datatype]).tobytes()
    parts: list[bytes] = []
    for item in array.reshape(-1).tolist():
        data = item if isinstance(item, bytes) else str(item).encode("utf-8")
        parts.append(_LENGTH.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def datatype_of(array: npt.NDArray[Any]) -> str:
    """The datatype of a numpy array (object or bytes/str arrays are BYTES)."""
    if array.dtype.kind in "OSU":
        return "BYTES"
    for name, dtype in DTYPES.items():
        if name != "BYTES" and array.dtype.kind == dtype.kind and array.dtype.itemsize == dtype.itemsize:
            return name
    raise BadTensor(f"numpy dtype {array.dtype} has no Triton datatype")
