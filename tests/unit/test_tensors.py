"""The raw tensor codec (aimesh.tensors), ingest's checks of tensors against a model's signature, and the worker's
requests and outputs of tensor rows."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from aimesh import tensors
from aimesh.client import input_tensor
from aimesh.ingest.signatures import InputSpec, ModelSignature, SignatureReader, Signatures
from aimesh.ingest.tensor_checks import check_tensors, check_text
from aimesh.v1 import task_pb2, tensor_pb2
from aimesh.worker.tensor_io import TensorRow, inputs_of, outputs_of, row_bytes

DIGITS = ModelSignature({"IMAGE": InputSpec("IMAGE", "UINT8", (8, 8))}, max_batch_size=64)


@given(
    datatype=st.sampled_from([d for d in tensors.DATATYPES if d != "BYTES"]),
    shape=st.lists(st.integers(0, 4), max_size=3),
    data=st.data(),
)
def test_fixed_size_contents_round_trip_bit_for_bit(datatype: str, shape: list[int], data: Any) -> None:
    size = int(np.prod(shape)) * tensors.DTYPES[datatype].itemsize
    raw = data.draw(st.binary(min_size=size, max_size=size))
    if datatype == "BOOL":
        raw = bytes(b & 1 for b in raw)  # numpy's bool is one byte, 0 or 1
    array = tensors.to_numpy(datatype, shape, raw)
    assert array.shape == tuple(shape)
    assert tensors.to_raw(datatype, array) == raw


@given(items=st.lists(st.binary(max_size=20), max_size=6))
def test_bytes_contents_are_length_prefixed_elements(items: list[bytes]) -> None:
    array = np.empty(len(items), dtype=np.object_)
    array[:] = items
    raw = tensors.to_raw("BYTES", array)
    assert raw == b"".join(struct.pack("<I", len(i)) + i for i in items)
    assert tensors.to_numpy("BYTES", [len(items)], raw).tolist() == items


@pytest.mark.parametrize(
    ("datatype", "shape", "raw", "says"),
    [
        ("FP32", [2, 2], b"\0" * 15, "has 15 bytes of contents; FP32 of shape [2, 2] takes 16"),
        ("INT4", [1], b"\0", "unknown datatype 'INT4'"),
        ("BYTES", [2], struct.pack("<I", 1) + b"a", "holds 1 BYTES elements; shape [2] takes 2"),
        ("BYTES", [1], struct.pack("<I", 9) + b"abc", "past the end of the contents"),
        ("BYTES", [1], b"\1\0", "end inside an element's length"),
    ],
)
def test_contents_that_do_not_fit_are_named(datatype: str, shape: list[int], raw: bytes, says: str) -> None:
    problem = tensors.contents_problem(datatype, shape, raw)
    assert problem is not None and says in problem
    with pytest.raises(tensors.BadTensor):
        tensors.to_numpy(datatype, shape, raw)


def test_a_signature_is_read_from_tritons_json_configuration() -> None:
    config = {
        "max_batch_size": 64,
        "input": [
            {"name": "IMAGE", "data_type": "TYPE_UINT8", "dims": ["8", "8"]},
            {"name": "TEXT", "data_type": "TYPE_STRING", "dims": ["1"], "optional": True},
        ],
    }
    signature = ModelSignature.from_config(config)
    assert signature.max_batch_size == 64
    assert signature.inputs["IMAGE"] == InputSpec("IMAGE", "UINT8", (8, 8))
    assert signature.inputs["TEXT"] == InputSpec("TEXT", "BYTES", (1,), optional=True)
    assert signature.takes_text


def test_tensors_are_checked_against_the_models_declared_inputs() -> None:
    good = task_pb2.Tensors(tensors=[input_tensor("IMAGE", np.zeros((8, 8), np.uint8))])
    assert check_tensors(good, DIGITS, "input.tensors") == []
    variable = ModelSignature({"IMAGE": InputSpec("IMAGE", "UINT8", (-1, -1))})
    empty = task_pb2.Tensors(tensors=[input_tensor("IMAGE", np.zeros((3, 0), np.uint8))])
    assert check_tensors(empty, variable, "t") == []

    wrong = task_pb2.Tensors(
        tensors=[input_tensor("IMAGE", np.zeros((8, 8, 1), np.uint8)), input_tensor("EXTRA", np.zeros(1, np.uint8))]
    )
    found = dict(check_tensors(wrong, DIGITS, "input.tensors"))
    assert "has 3 dimensions, not 2" in found["input.tensors.tensors[0].shape"]
    assert "no input 'EXTRA'" in found["input.tensors.tensors[1].name"]

    missing = task_pb2.Tensors(tensors=[input_tensor("OTHER", np.zeros(1, np.uint8))])
    problems = check_tensors(
        missing, ModelSignature({"A": InputSpec("A", "FP32", (1,)), "OTHER": InputSpec("OTHER", "UINT8", (1,))}), "t"
    )
    assert problems == [("t.tensors", "the model's input A FP32 [1] is required")]


def test_tensors_are_checked_for_consistency_without_a_signature() -> None:
    given_tensors = task_pb2.Tensors(
        tensors=[
            tensor_pb2.InputTensor(name="A", datatype="FP32", shape=[2], raw_contents=b"\0" * 8),
            tensor_pb2.InputTensor(name="A", datatype="FP32", shape=[2], raw_contents=b"\0" * 8),
            tensor_pb2.InputTensor(name="B", datatype="FP32", shape=[-1]),
            tensor_pb2.InputTensor(name="C", datatype="FP32", shape=[3]),
            tensor_pb2.InputTensor(name="D", datatype="UINT8", shape=[4], object=tensor_pb2.ObjectRef(key="k", size=5)),
        ]
    )
    found = dict(check_tensors(given_tensors, None, "in"))
    assert found == {
        "in.tensors[1].name": "'A' is given twice",
        "in.tensors[2].shape": "dimensions must be >= 0",
        "in.tensors[3]": "set raw_contents or object",
        "in.tensors[4].object.sha256": "must be 64 lowercase hex digits",
        "in.tensors[4].object.size": "is 5 bytes; UINT8 of shape [4] takes 4",
    }
    assert check_tensors(task_pb2.Tensors(), None, "in") == [("in", "must hold at least one tensor")]


def test_text_is_refused_for_a_model_known_to_take_none() -> None:
    assert check_text(None, "input.text") == []
    assert check_text(ModelSignature({"TEXT": InputSpec("TEXT", "BYTES", (1,))}), "input.text") == []
    ((field, why),) = check_text(DIGITS, "input.text")
    assert field == "input.text" and "IMAGE UINT8 [8, 8]" in why


def test_the_signature_reader_keeps_what_it_knew_when_triton_cannot_be_asked() -> None:
    from tritonclient.utils import InferenceServerException

    answers: list[Any] = [DIGITS, InferenceServerException("connection refused")]

    def fetch(model: str) -> ModelSignature | None:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    signatures = Signatures()
    reader = SignatureReader(signatures, ["digits"], fetch, interval_s=60)
    reader.read_once()
    reader.read_once()
    assert signatures.get("digits") == DIGITS


class FakeResult:
    """tritonclient's InferResult as far as _outputs_of reads it."""

    def __init__(self, outputs: dict[str, tuple[str, np.ndarray]]) -> None:
        self._outputs = outputs

    def get_response(self) -> Any:
        class Meta:
            def __init__(self, name: str, datatype: str) -> None:
                self.name, self.datatype = name, datatype

        class Response:
            outputs = [Meta(n, d) for n, (d, _) in self._outputs.items()]

        return Response()

    def as_numpy(self, name: str) -> np.ndarray:
        return self._outputs[name][1]


def test_rows_of_a_batching_model_are_stacked_and_their_outputs_split() -> None:
    rows = [TensorRow((input_tensor("IMAGE", np.full((2, 2), i, np.uint8)),), batched=True) for i in range(3)]
    (image,) = inputs_of(rows)
    assert (image.name(), image.shape(), image.datatype()) == ("IMAGE", [3, 2, 2], "UINT8")
    assert row_bytes(rows[0]) == 4

    labels = np.array([[7], [8], [9]], dtype=np.int64)
    outputs = outputs_of(FakeResult({"LABEL": ("INT64", labels)}), rows)
    assert [o.tensors[0].raw_contents for o in outputs] == [tensors.to_raw("INT64", row) for row in labels]
    assert [list(o.tensors[0].shape) for o in outputs] == [[1]] * 3


def test_a_row_of_a_model_that_does_not_batch_is_the_whole_request() -> None:
    array = np.arange(6, dtype=np.float16).reshape(2, 3)
    row = TensorRow((input_tensor("X", array),), batched=False)
    (x,) = inputs_of([row])
    assert x.shape() == [2, 3]
    png = np.array([b"\x89PNG\r\n\x1a\n\xff"], dtype=np.object_)
    (output,) = outputs_of(FakeResult({"PNG": ("BYTES", png), "Y": ("FP16", array)}), [row])
    assert [t.name for t in output.tensors] == ["PNG", "Y"]
    assert tensors.to_numpy("BYTES", [1], output.tensors[0].raw_contents).tolist() == [png[0]]
    assert output.tensors[1].raw_contents == array.tobytes()


def test_text_rows_keep_their_typed_outputs() -> None:
    outputs = outputs_of(FakeResult({"LABEL": ("BYTES", np.array([[b"positive"]], dtype=np.object_))}), ["great"])
    assert list(outputs[0].tensors[0].string_data) == ["positive"] and not outputs[0].tensors[0].raw_contents
