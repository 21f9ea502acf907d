"""Tensors on the client's side: input tensors built from numpy arrays in the raw form (aimesh.tensors, the one
codec), the messages of an upload (UploadInput), and output tensors decoded back to numpy arrays."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt

from aimesh import tensors
from aimesh.tensors import BadTensor
from aimesh.v1 import ingest_pb2, result_pb2, tensor_pb2

# Input contents larger than this go to the object store first (UploadInput) and the task carries a reference.
DEFAULT_UPLOAD_THRESHOLD_BYTES = 256 * 1024
# The largest chunk of one UploadInput message (the RPC's limit).
UPLOAD_CHUNK_BYTES = 1024 * 1024
OCTET_STREAM = "application/octet-stream"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# A task's input tensors: arrays by input name (datatype from the array's dtype), or InputTensor messages.
Tensors: TypeAlias = Mapping[str, npt.ArrayLike] | Sequence[tensor_pb2.InputTensor]


def input_tensor(name: str, array: npt.ArrayLike, datatype: str | None = None) -> tensor_pb2.InputTensor:
    """An InputTensor with raw contents; ``datatype`` None takes it from the array's dtype (str, bytes and object
    arrays are BYTES). BadTensor for a dtype without a Triton datatype."""
    values = np.asarray(array)
    kind = datatype or tensors.datatype_of(values)
    return tensor_pb2.InputTensor(
        name=name, datatype=kind, shape=list(values.shape), raw_contents=tensors.to_raw(kind, values)
    )


def input_tensors(given: Tensors) -> list[tensor_pb2.InputTensor]:
    """The InputTensors of a task's ``tensors`` (messages are copied, so the caller's are never changed)."""
    if isinstance(given, Mapping):
        return [input_tensor(name, array) for name, array in given.items()]
    built = []
    for tensor in given:
        if not isinstance(tensor, tensor_pb2.InputTensor):
            raise TypeError(f"tensors must map names to arrays or be InputTensor messages, not {type(tensor)}")
        copy = tensor_pb2.InputTensor()
        copy.CopyFrom(tensor)
        built.append(copy)
    return built


def sha256_hex(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def upload_messages(
    data: bytes, content_type: str, digest: str, chunk_bytes: int = UPLOAD_CHUNK_BYTES
) -> Iterator[ingest_pb2.UploadInputRequest]:
    """UploadInput's request stream: the header (size, content type, SHA-256), then the contents in chunks."""
    header = ingest_pb2.UploadHeader(size=len(data), content_type=content_type, sha256=digest)
    yield ingest_pb2.UploadInputRequest(header=header)
    for offset in range(0, len(data), chunk_bytes):
        yield ingest_pb2.UploadInputRequest(chunk=data[offset : offset + chunk_bytes])


def is_by_reference(tensor: result_pb2.OutputTensor) -> bool:
    """Whether the output's contents are in the object store (fetch them with DownloadOutput)."""
    return tensor.HasField("object")


def is_raw(tensor: result_pb2.OutputTensor) -> bool:
    """Whether the output is in the raw form (a task with tensor inputs), inline or by reference, rather than in
    the typed fields a text task gets. An output with no data at all has no elements: raw too."""
    if is_by_reference(tensor) or tensor.raw_contents:
        return True
    return not (tensor.string_data or tensor.float_data or tensor.int_data)


def output_array(tensor: result_pb2.OutputTensor, contents: bytes | None = None) -> npt.NDArray[Any]:
    """The output as an array of its datatype and shape: from its raw contents, from ``contents`` (the download
    of a by-reference output), or from the typed fields (BYTES as str, as the worker decoded them). BadTensor
    for data that does not fit the shape."""
    shape = list(tensor.shape)
    if is_by_reference(tensor):
        if contents is None:
            raise ValueError(f"output {tensor.name} is held by reference: download its contents first")
        return tensors.to_numpy(tensor.datatype, shape, contents)
    if is_raw(tensor):
        return tensors.to_numpy(tensor.datatype, shape, tensor.raw_contents)
    if tensor.string_data:
        values: npt.NDArray[Any] = np.empty(len(tensor.string_data), dtype=np.object_)
        values[:] = list(tensor.string_data)
    else:
        dtype = tensors.DTYPES.get(tensor.datatype)
        if dtype is None or tensor.datatype == "BYTES":
            raise BadTensor(f"output {tensor.name} has numbers but datatype {tensor.datatype!r}")
        values = np.asarray(list(tensor.float_data) or list(tensor.int_data)).astype(dtype)
    if values.size != tensors.elements(shape):
        raise BadTensor(f"output {tensor.name} has {values.size} values; shape {shape} takes {tensors.elements(shape)}")
    return values.reshape(shape)


def single_bytes(tensor: result_pb2.OutputTensor, array: npt.NDArray[Any]) -> bytes | None:
    """The element of a BYTES output of exactly one element (an encoded image, a document), else None."""
    if tensor.datatype != "BYTES" or array.size != 1:
        return None
    item = array.reshape(-1)[0]
    return item if isinstance(item, bytes) else str(item).encode("utf-8")
