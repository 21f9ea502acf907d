"""Tensor inputs and outputs through the real mesh: ingest, Kafka, a worker, Triton, the notifier.

A digits image is classified, an image-returning model's bytes come back exactly, random tensors of every datatype
and shape round-trip through the identity model bit for bit, and ingest refuses tensors the model does not take.
"""

from __future__ import annotations

import io
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2, status_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from aimesh import tensors
from aimesh.client import input_tensor
from aimesh.devstack.stack import Stack
from aimesh.v1 import ingest_pb2, ingest_pb2_grpc, notifier_pb2, notifier_pb2_grpc, result_pb2, task_pb2, tensor_pb2

from .mesh_client import MeshClient, tensor

DIGITS = Path(__file__).parent.parent / "data" / "digits"


async def submit_tensors(
    client: MeshClient, model: str, *inputs: tensor_pb2.InputTensor, parameters: dict[str, str] | None = None
) -> str:
    request = ingest_pb2.SubmitTaskRequest(
        model_name=model,
        input=task_pb2.TaskInput(tensors=task_pb2.Tensors(tensors=inputs)),
        parameters=parameters or {},
    )
    return (await client.ingest.SubmitTask(request, timeout=30)).task_id


def output_array(output: result_pb2.OutputTensor) -> np.ndarray:
    return tensors.to_numpy(output.datatype, output.shape, output.raw_contents)


def violations(error: grpc.aio.AioRpcError) -> dict[str, str]:
    """The field violations of an INVALID_ARGUMENT answer."""
    status = status_pb2.Status()
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status.ParseFromString(value)
    found = {}
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            found.update({v.field: v.description for v in bad.field_violations})
    return found


def grey(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L"), dtype=np.uint8)


async def test_the_digits_model_reads_each_png_of_the_test_data_right(mesh: Stack, client: MeshClient) -> None:
    pngs = sorted(DIGITS.glob("digit_*.png"))
    assert len(pngs) >= 5, "the test data is missing"
    task_ids = [await submit_tensors(client, "digits", input_tensor("IMAGE", grey(p))) for p in pngs]
    for path, task_id in zip(pngs, task_ids, strict=True):
        result = await client.result(task_id)
        assert result.status == result_pb2.TASK_STATUS_SUCCEEDED, result.error
        label = output_array(tensor(result, "LABEL"))
        assert label.dtype == np.int64 and label.reshape(-1).tolist() == [int(path.stem.split("_")[1])], path.name
        probabilities = output_array(tensor(result, "PROBABILITIES"))
        assert probabilities.shape == (10,) and abs(float(probabilities.sum()) - 1.0) < 1e-4


async def test_an_image_returned_by_a_model_arrives_byte_identical(mesh: Stack, client: MeshClient) -> None:
    rng = np.random.default_rng(7)
    image = rng.integers(0, 256, size=(37, 53), dtype=np.uint8)
    task_id = await submit_tensors(client, "resize", input_tensor("IMAGE", image), parameters={"scale": "3"})
    result = await client.result(task_id)
    assert result.status == result_pb2.TASK_STATUS_SUCCEEDED, result.error

    expected = Image.fromarray(image).resize((53 * 3, 37 * 3), Image.Resampling.NEAREST)
    resized = output_array(tensor(result, "IMAGE"))
    assert resized.dtype == np.uint8 and np.array_equal(resized, np.asarray(expected))
    encoded = io.BytesIO()
    expected.save(encoded, format="PNG")
    png = output_array(tensor(result, "PNG")).reshape(-1)
    assert png.shape == (1,) and png[0] == encoded.getvalue()


def random_tensor(datatype: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """A tensor of ``datatype`` whose bits are random: NaNs, infinities and -0.0 included for floats."""
    rng = np.random.default_rng(seed)
    count = int(np.prod(shape))
    if datatype == "BYTES":
        items = [rng.bytes(int(rng.integers(0, 12))) for _ in range(count)]
        array = np.empty(count, dtype=np.object_)
        array[:] = items
        return array.reshape(shape)
    if datatype == "BOOL":
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    dtype = tensors.DTYPES[datatype]
    return np.frombuffer(rng.bytes(count * dtype.itemsize), dtype=dtype).reshape(shape)


def test_random_tensors_of_every_datatype_and_shape_round_trip_bit_for_bit(mesh: Stack) -> None:
    with grpc.insecure_channel(mesh.ingest_address) as ingest, grpc.insecure_channel(mesh.notifier_address) as notifier:
        submit = ingest_pb2_grpc.IngestServiceStub(ingest).SubmitTask
        watch = notifier_pb2_grpc.NotifierServiceStub(notifier).WatchTask

        @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(
            datatype=st.sampled_from(tensors.DATATYPES),
            shape=st.lists(st.integers(0, 5), min_size=1, max_size=3).map(tuple),
            seed=st.integers(0, 2**32 - 1),
        )
        def round_trip(datatype: str, shape: tuple[int, ...], seed: int) -> None:
            name = f"{datatype}_{len(shape)}"
            sent = input_tensor(name, random_tensor(datatype, shape, seed), datatype)
            request = ingest_pb2.SubmitTaskRequest(
                model_name="identity", input=task_pb2.TaskInput(tensors=task_pb2.Tensors(tensors=[sent]))
            )
            task_id = submit(request, timeout=30).task_id
            states = [u.state for u in watch(notifier_pb2.WatchTaskRequest(task_id=task_id), timeout=60)]
            result = states[-1].result
            assert result.status == result_pb2.TASK_STATUS_SUCCEEDED, result.error
            back = tensor(result, f"OUT_{name}")
            assert (back.datatype, list(back.shape)) == (datatype, list(shape))
            assert back.raw_contents == sent.raw_contents

        round_trip()


@pytest.mark.parametrize(
    ("inputs", "field", "says"),
    [
        ([input_tensor("IMAGE", np.zeros((8, 9), np.uint8))], "input.tensors.tensors[0].shape", "dimension 1 is 9"),
        ([input_tensor("IMAGE", np.zeros((8, 8), np.float32))], "input.tensors.tensors[0].datatype", "is UINT8"),
        ([input_tensor("PIXELS", np.zeros((8, 8), np.uint8))], "input.tensors.tensors[0].name", "takes IMAGE"),
        (
            [tensor_pb2.InputTensor(name="IMAGE", datatype="UINT8", shape=[8, 8], raw_contents=b"\0" * 63)],
            "input.tensors.tensors[0].raw_contents",
            "takes 64",
        ),
    ],
)
async def test_ingest_refuses_tensors_the_model_does_not_take(
    mesh: Stack, client: MeshClient, inputs: list[tensor_pb2.InputTensor], field: str, says: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await submit_tensors(client, "digits", *inputs)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    found = violations(info.value)
    assert field in found and says in found[field], found


async def test_ingest_refuses_text_for_a_model_that_takes_an_image(mesh: Stack, client: MeshClient) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.submit("digits", "seven")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "IMAGE UINT8 [8, 8]" in violations(info.value)["input.text"]
