"""Tensors through the client library and the `aimesh` CLI against the real mesh: a digit PNG classified with
--image, a resized image written byte-identical with --output-dir, a large tensor uploaded, sent by reference
and returned bit for bit through `outputs`.

Written with the client side of issue 17 and not yet run: it needs the services' tensor and claim-check support
and the stack's object store (the lead runs it once they are in)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aimesh.client import AsyncClient
from aimesh.devstack.stack import Stack
from aimesh.v1 import result_pb2

from .test_cli import aimesh

pytestmark = pytest.mark.integration

DIGITS = Path(__file__).resolve().parents[1] / "data" / "digits"


def test_a_digit_png_is_classified_from_the_cli(mesh: Stack) -> None:
    run = aimesh(mesh, "submit", "digits", "--image", str(DIGITS / "digit_3.png"), "--wait")
    assert run.returncode == 0, run.stderr
    assert "LABEL: [3]" in run.stdout.splitlines()
    assert any(line.startswith("PROBABILITIES: [") for line in run.stdout.splitlines())


def test_a_resized_image_is_written_byte_identical(mesh: Stack, tmp_path: Path) -> None:
    image = np.random.default_rng(11).integers(0, 256, size=(21, 34), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "in.png")
    out = tmp_path / "out"
    run = aimesh(mesh, "submit", "resize", "--image", str(tmp_path / "in.png"), "-p", "scale=3", "--wait",
                 "--output-dir", str(out))  # fmt: skip
    assert run.returncode == 0, run.stderr

    expected = Image.fromarray(image).resize((34 * 3, 21 * 3), Image.Resampling.NEAREST)
    encoded = io.BytesIO()
    expected.save(encoded, format="PNG")
    assert (out / "PNG.png").read_bytes() == encoded.getvalue()
    assert np.array_equal(np.load(out / "IMAGE.npy"), np.asarray(expected))
    assert f"PNG: wrote {out / 'PNG.png'}" in run.stdout


async def test_a_large_tensor_goes_by_reference_and_comes_back_bit_for_bit(mesh: Stack) -> None:
    values = np.frombuffer(np.random.default_rng(5).bytes(3 * 1024 * 1024), dtype="<f4").reshape(-1, 1024)
    async with AsyncClient(mesh.ingest_address, mesh.notifier_address, timeout_s=60) as client:
        task_id = await client.submit("identity", tensors={"FP32_2": values})
        state = await client.result(task_id, timeout_s=120)
        assert state.status == result_pb2.TASK_STATUS_SUCCEEDED, state.result.error
        arrays = await client.outputs(state)
    assert arrays["OUT_FP32_2"].shape == values.shape
    assert arrays["OUT_FP32_2"].tobytes() == values.tobytes()  # NaN payloads and -0.0 included
