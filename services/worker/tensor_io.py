"""A task's input as it goes to Triton (a text, or a ``TensorRow`` of raw tensors) and its outputs as they come
back: a text's outputs typed (string, float or integer lists), tensors' outputs raw, bit for bit."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from tritonclient.grpc import InferInput

from aimesh import tensors
from aimesh.errors import AimeshError
from aimesh.v1 import result_pb2, tensor_pb2

# The input every text model reads.
INPUT_NAME = "TEXT"


class RowsMismatch(AimeshError):
    """An output whose rows do not match the request's."""


@dataclass(frozen=True)
class TensorRow:
    """One task's input tensors, their contents in ``raw_contents``. ``batched``: the model batches
    (max_batch_size > 0), so rows are stacked along a new first dimension and outputs split along it; otherwise the
    row goes alone and its tensors are the request's."""

    tensors: tuple[tensor_pb2.InputTensor, ...]
    batched: bool

    def key(self) -> tuple[object, ...]:
        """What rows sharing a request must agree on: every tensor's name, datatype and shape."""
        return tuple((t.name, t.datatype, tuple(t.shape)) for t in self.tensors)


# A task's input as it goes to Triton.
Row = str | TensorRow


def row_bytes(row: Row) -> int:
    """The size of a row's input: a text's UTF-8 bytes or the tensors' contents."""
    if isinstance(row, TensorRow):
        return sum(len(t.raw_contents) for t in row.tensors)
    # An ASCII text's length is its UTF-8 size (str.isascii is a flag check): only others are encoded to measure.
    return len(row) if row.isascii() else len(row.encode("utf-8"))


def to_raw_output_tensor(name: str, datatype: str, array: npt.NDArray[Any]) -> result_pb2.OutputTensor:
    """One task's slice of a Triton output in raw form, bit for bit."""
    return result_pb2.OutputTensor(
        name=name, datatype=datatype, shape=list(array.shape), raw_contents=tensors.to_raw(datatype, array)
    )


def to_output_tensor(name: str, datatype: str, array: npt.NDArray[Any]) -> result_pb2.OutputTensor:
    """One task's slice of a Triton output (batch dimension already removed) as an OutputTensor."""
    tensor = result_pb2.OutputTensor(name=name, datatype=datatype, shape=list(array.shape))
    flat = array.reshape(-1)
    if datatype == "BYTES":
        tensor.string_data.extend(
            v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in flat.tolist()
        )
    elif datatype.startswith("FP") or datatype == "BF16":
        tensor.float_data.extend(flat.astype(np.float32).tolist())
    else:
        tensor.int_data.extend(flat.astype(np.int64).tolist())
    return tensor


def inputs_of(rows: Sequence[Row]) -> list[InferInput]:
    """The request's inputs: the texts as one TEXT column, or the rows' tensors (stacked when the model batches)."""
    first = rows[0]
    if not isinstance(first, TensorRow):
        data = np.array([[str(t).encode("utf-8")] for t in rows], dtype=np.object_)
        tensor = InferInput(INPUT_NAME, list(data.shape), "BYTES")
        tensor.set_data_from_numpy(data)
        return [tensor]
    table = [row.tensors for row in rows if isinstance(row, TensorRow)]
    inputs = []
    for j, spec in enumerate(first.tensors):
        arrays = [tensors.to_numpy(spec.datatype, spec.shape, row[j].raw_contents) for row in table]
        data = np.stack(arrays) if first.batched else arrays[0]
        tensor = InferInput(spec.name, list(data.shape), spec.datatype)
        tensor.set_data_from_numpy(data)
        inputs.append(tensor)
    return inputs


def outputs_of(result: Any, rows: Sequence[Row]) -> list[result_pb2.TaskOutput]:
    """Each row's outputs: a text's typed, tensors' raw; split along the batch dimension unless the model does not
    batch (one row: the outputs are its own)."""
    first = rows[0]
    raw = isinstance(first, TensorRow)
    split = not (isinstance(first, TensorRow) and not first.batched)
    outputs = [result_pb2.TaskOutput() for _ in rows]
    for meta in result.get_response().outputs:
        array = result.as_numpy(meta.name)
        if not split:
            outputs[0].tensors.append(to_raw_output_tensor(meta.name, meta.datatype, array))
            continue
        if array is None or array.ndim == 0 or len(array) != len(rows):
            rows_found = 0 if array is None or array.ndim == 0 else len(array)
            raise RowsMismatch(f"output {meta.name} has {rows_found} rows for {len(rows)} inputs")
        convert = to_raw_output_tensor if raw else to_output_tensor
        for row, output in zip(array, outputs, strict=True):
            output.tensors.append(convert(meta.name, meta.datatype, row))
    return outputs
