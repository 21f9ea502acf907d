"""Tensors through the HTTP gateway's proto3 JSON, over real HTTP against the fake servers: an InputTensor's
raw contents travel base64-encoded (proto3 JSON's form of bytes) and reach ingest bit for bit, an ObjectRef
passes as it is, and a result's raw and by-reference outputs come back the same way."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator

import numpy as np
import pytest
from client_fakes import Fakes, object_ref, story
from test_gateway import Gateway, running_gateway, started

from aimesh import tensors
from aimesh.v1 import ingest_pb2

TASK = "5b0f7c1e-2f43-4a55-9d53-2c1f3f0d8a11"


@pytest.fixture
async def gateway() -> AsyncIterator[Gateway]:
    async with started(Fakes()) as fakes, running_gateway(fakes) as running:
        yield running


async def test_an_input_tensor_reaches_ingest_bit_for_bit_from_base64(gateway: Gateway) -> None:
    values = np.array([[np.nan, -0.0], [np.inf, 1e-45]], dtype=np.float32)
    raw = tensors.to_raw("FP32", values)
    encoded = base64.b64encode(raw).decode()
    ref = object_ref(b"x" * 10, key="uploads/abc")
    body = {
        "modelName": "identity",
        "input": {
            "tensors": {
                "tensors": [
                    {"name": "VALUES", "datatype": "FP32", "shape": [2, 2], "rawContents": encoded},
                    {"name": "LARGE", "datatype": "UINT8", "shape": ["10"], "object": {
                        "bucket": ref.bucket, "key": ref.key, "size": str(ref.size), "sha256": ref.sha256,
                    }},
                ]
            }
        },
    }  # fmt: skip
    answer = await gateway.http.post("/v1/tasks", json=body)
    assert answer.status_code == 202, answer.text

    [request] = gateway.fakes.ingest.requests
    assert isinstance(request, ingest_pb2.SubmitTaskRequest)
    inline, large = request.input.tensors.tensors
    assert (inline.datatype, list(inline.shape), inline.raw_contents) == ("FP32", [2, 2], raw)
    assert large.WhichOneof("contents") == "object" and (large.object.key, large.object.size) == (ref.key, 10)
    assert large.object.sha256 == ref.sha256 and list(large.shape) == [10]


async def test_contents_that_are_not_base64_are_refused(gateway: Gateway) -> None:
    body = {"modelName": "identity", "input": {"tensors": {"tensors": [{"name": "X", "rawContents": "not base64!"}]}}}
    answer = await gateway.http.post("/v1/tasks", json=body)
    assert answer.status_code == 400 and not gateway.fakes.ingest.requests


async def test_raw_outputs_come_back_as_base64(gateway: Gateway) -> None:
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256))
    final = story(TASK, [])[-1]
    final.result.output.tensors.add(
        name="IMAGE_PNG", datatype="BYTES", shape=[1], raw_contents=tensors.to_raw("BYTES", np.array([png], object))
    )
    final.result.output.tensors.add(name="LARGE", datatype="FP32", shape=[4], object=object_ref(b"\x00" * 16))
    gateway.fakes.notifier.updates[TASK] = [final]

    answer = await gateway.http.get(f"/v1/tasks/{TASK}")
    assert answer.status_code == 200, answer.text
    outputs = {t["name"]: t for t in answer.json()["state"]["result"]["output"]["tensors"]}
    raw = base64.b64decode(outputs["IMAGE_PNG"]["rawContents"])
    assert tensors.to_numpy("BYTES", [1], raw).tolist() == [png]
    assert outputs["LARGE"]["object"]["sha256"] == object_ref(b"\x00" * 16).sha256
