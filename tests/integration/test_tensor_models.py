"""The tensor models (digits, resize, identity) served by the real tritonserver, called directly with tritonclient."""

from __future__ import annotations

import asyncio
import importlib.util
import io
import re
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image
from tritonclient.grpc import InferInput, InferRequestedOutput, InferResult
from tritonclient.grpc.aio import InferenceServerClient
from tritonclient.utils import InferenceServerException

from aimesh.devstack.triton import TritonServer

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
DIGITS_DATA = REPO_ROOT / "tests" / "data" / "digits"
DATATYPES = ("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64")
RANKS = (1, 2, 3)
NUMPY_TYPES = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}
# A quiet NaN with a payload and a signalling NaN, by float width in bytes: any bit pattern must come back.
NAN_PAYLOADS = {2: [0x7E01, 0x7C01], 4: [0x7FC00001, 0x7F800001], 8: [0x7FF8000000000001, 0x7FF0000000000001]}
BYTES_ITEMS = [b"", b"text", b"\xff\xfe\x00not utf-8\x80", b"\x00", "é ünïcode".encode(), b"x" * 1000]


def _digits_classifier() -> ModuleType:
    # The model's own module: the held-out images and how pixels are made from scikit-learn's values.
    name = "_triton_model_digits_classifier"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "models" / "digits" / "1" / "classifier.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", autouse=True)
def load_times(triton: TritonServer) -> Iterator[None]:
    yield
    _print_load_times(triton.log_path)


def _print_load_times(log_path: Path) -> None:
    # glog lines: "I1207 22:30:01.123456 1234 file.cc:123] ..." - from "loading: <model>:1" to "successfully loaded".
    stamps: dict[tuple[str, str], float] = {}
    for line in log_path.read_text(errors="replace").splitlines():
        found = re.match(r"I\d{4} (\d\d):(\d\d):(\d\d\.\d+) .*?\] (.*)$", line)
        if not found:
            continue
        seconds = int(found[1]) * 3600 + int(found[2]) * 60 + float(found[3])
        if loading := re.search(r"loading: (\w+):\d+", found[4]):
            stamps[("start", loading[1])] = seconds
        elif loaded := re.search(r"successfully loaded '(\w+)'", found[4]):
            stamps[("end", loaded[1])] = seconds
    for model in ("digits", "resize", "identity"):
        if ("start", model) in stamps and ("end", model) in stamps:
            print(f"{model} loaded in {stamps[('end', model)] - stamps[('start', model)]:.2f} s")


@asynccontextmanager
async def _client(server: TritonServer) -> AsyncIterator[InferenceServerClient]:
    client = InferenceServerClient(server.grpc_url)
    try:
        yield client
    finally:
        await client.close()


def _tensor(name: str, array: np.ndarray, datatype: str) -> InferInput:
    tensor = InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


async def _classify(client: InferenceServerClient, images: np.ndarray) -> InferResult:
    outputs = [InferRequestedOutput("LABEL"), InferRequestedOutput("PROBABILITIES")]
    return await client.infer("digits", [_tensor("IMAGE", images, "UINT8")], outputs=outputs, client_timeout=30.0)


def _test_digits() -> tuple[np.ndarray, list[int]]:
    paths = sorted(DIGITS_DATA.glob("digit_*.png"))
    assert len(paths) == 10
    images = np.stack([np.asarray(Image.open(p), dtype=np.uint8) for p in paths])
    return images, [int(p.stem.removeprefix("digit_")) for p in paths]


async def test_tensor_models_declare_their_tensors(triton: TritonServer) -> None:
    async with _client(triton) as client:
        configs = {
            m: (await client.get_model_config(m, as_json=True))["config"] for m in ("digits", "resize", "identity")
        }

    def tensors(config: dict[str, Any], kind: str) -> list[tuple[str, str, list[str]]]:
        return [(t["name"], t["data_type"], t["dims"]) for t in config[kind]]

    assert tensors(configs["digits"], "input") == [("IMAGE", "TYPE_UINT8", ["8", "8"])]
    assert tensors(configs["digits"], "output") == [
        ("LABEL", "TYPE_INT64", ["1"]),
        ("PROBABILITIES", "TYPE_FP32", ["10"]),
    ]
    assert int(configs["digits"]["max_batch_size"]) == 64 and "dynamic_batching" in configs["digits"]
    assert tensors(configs["resize"], "output") == [
        ("IMAGE", "TYPE_UINT8", ["-1", "-1"]),
        ("PNG", "TYPE_STRING", ["1"]),
    ]
    identity_inputs = {name: (datatype, len(dims)) for name, datatype, dims in tensors(configs["identity"], "input")}
    expected = {
        f"{dt}_{rank}": ("TYPE_STRING" if dt == "BYTES" else f"TYPE_{dt}", rank)
        for dt in (*DATATYPES, "BYTES")
        for rank in RANKS
    }
    assert identity_inputs == expected
    assert all(i["optional"] for i in configs["identity"]["input"])
    assert {name for name, _, _ in tensors(configs["identity"], "output")} == {f"OUT_{n}" for n in expected}


async def test_digits_classifies_each_test_image_and_batches_them(triton: TritonServer) -> None:
    images, labels = _test_digits()
    async with _client(triton) as client:
        batch = await _classify(client, images)
        # One request per image, all at once: Triton's dynamic batcher may run them together.
        singles = await asyncio.gather(*(_classify(client, image[np.newaxis]) for image in images))
    assert batch.as_numpy("LABEL").shape == (10, 1) and batch.as_numpy("LABEL").dtype == np.int64
    assert batch.as_numpy("LABEL").reshape(-1).tolist() == labels
    probabilities = batch.as_numpy("PROBABILITIES")
    assert probabilities.shape == (10, 10) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert (probabilities.argmax(axis=1) == labels).all()
    assert [r.as_numpy("LABEL").tolist() for r in singles] == [[[label]] for label in labels]
    for single, row in zip(singles, probabilities, strict=True):
        np.testing.assert_allclose(single.as_numpy("PROBABILITIES")[0], row, rtol=1e-5, atol=1e-6)


async def test_digits_accuracy_on_held_out_images(triton: TritonServer) -> None:
    pixels, labels = _digits_classifier().held_out()
    async with _client(triton) as client:
        results = await asyncio.gather(*(_classify(client, pixels[i : i + 64]) for i in range(0, len(pixels), 64)))
    predicted = np.concatenate([r.as_numpy("LABEL").reshape(-1) for r in results])
    assert predicted.shape == labels.shape
    accuracy = float((predicted == labels).mean())
    print(f"digits: {accuracy:.3f} of {len(labels)} held-out images right")
    assert accuracy >= 0.9


def _pillow_png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


async def _resize(
    client: InferenceServerClient,
    image: np.ndarray,
    parameters: dict[str, str | int] | None = None,
    *,
    priority: int = 0,
    timeout_us: int | None = None,
) -> InferResult:
    outputs = [InferRequestedOutput("IMAGE"), InferRequestedOutput("PNG")]
    return await client.infer(
        "resize",
        [_tensor("IMAGE", image, "UINT8")],
        outputs=outputs,
        parameters=parameters,
        priority=priority,
        timeout=timeout_us,
        client_timeout=30.0,
    )


async def test_resize_returns_the_pillow_image_and_its_png(triton: TritonServer) -> None:
    rng = np.random.default_rng(7)
    image = rng.integers(0, 256, size=(7, 5), dtype=np.uint8)
    digit = np.asarray(Image.open(DIGITS_DATA / "digit_3.png"), dtype=np.uint8)
    async with _client(triton) as client:
        default = await _resize(client, image)
        cases = [(image, 3, await _resize(client, image, {"scale": "3"}))]
        cases.append((image, 8, await _resize(client, image, {"scale": 8})))  # an integer parameter also works
        cases.append((digit, 1, await _resize(client, digit, {"scale": "1"})))
        large = rng.integers(0, 256, size=(600, 900), dtype=np.uint8)
        cases.append((large, 4, await _resize(client, large, {"scale": "4"})))
        # Images of different shapes at once, at both priorities and with a queue timeout, as the worker sends them:
        # the queue orders them, and each comes back with its own image.
        shaped = [rng.integers(0, 256, size=shape, dtype=np.uint8) for shape in ((1, 1), (3, 9), (16, 2), (5, 5))]
        together = await asyncio.gather(
            *(_resize(client, im, priority=1 + i % 2, timeout_us=10_000_000) for i, im in enumerate(shaped))
        )
        cases += [(im, 2, result) for im, result in zip(shaped, together, strict=True)]
    cases.append((image, 2, default))
    for source, scale, result in cases:
        height, width = source.shape
        expected = np.asarray(Image.fromarray(source).resize((width * scale, height * scale), Image.Resampling.NEAREST))
        pixels = result.as_numpy("IMAGE")
        assert pixels.dtype == np.uint8 and pixels.shape == (height * scale, width * scale)
        assert np.array_equal(pixels, expected)
        assert np.array_equal(pixels, np.repeat(np.repeat(source, scale, axis=0), scale, axis=1))
        png = result.as_numpy("PNG")
        assert png.shape == (1,)
        assert png[0] == _pillow_png(expected)
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(png[0]))), expected)


async def test_resize_refuses_a_bad_scale_or_an_empty_image(triton: TritonServer) -> None:
    image = np.zeros((4, 4), dtype=np.uint8)
    async with _client(triton) as client:
        errors = await asyncio.gather(
            *(_resize(client, image, {"scale": bad}) for bad in ("0", "9", "two", "", "2.5", "-1")),
            _resize(client, np.zeros((0, 4), dtype=np.uint8)),
            # 8200 x 8200 once scaled: over the model's 8192 x 8192 limit.
            _resize(client, np.zeros((1025, 1025), dtype=np.uint8), {"scale": "8"}),
            return_exceptions=True,
        )
        fine = await _resize(client, image, {"scale": "2", "unrelated": "ignored"})
    for error in errors:
        assert isinstance(error, InferenceServerException), error
        assert error.status() == "StatusCode.INVALID_ARGUMENT", error
        assert "parameter 'scale' must be" in str(error.message()) or "IMAGE" in str(error.message()), error
    assert fine.as_numpy("IMAGE").shape == (8, 8)


def _edge_values(datatype: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Random values of ``datatype`` with the type's edge cases first: extremes; for floats NaNs (with payloads),
    -0.0, infinities and subnormals."""
    size = int(np.prod(shape))
    if datatype == "BYTES":
        items = [BYTES_ITEMS[i % len(BYTES_ITEMS)] for i in range(size)]
        return np.array(items, dtype=np.object_).reshape(shape)
    dtype = np.dtype(NUMPY_TYPES[datatype])
    if dtype == np.bool_:
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        values = rng.integers(info.min, info.max, size=size, dtype=dtype, endpoint=True)
        edges = np.array([info.min, info.max, 0, 1], dtype=dtype)
    else:
        bits = np.dtype(f"u{dtype.itemsize}")
        values = rng.integers(0, np.iinfo(bits).max, size=size, dtype=bits, endpoint=True).view(dtype)
        finfo = np.finfo(dtype)
        nans = np.array(NAN_PAYLOADS[dtype.itemsize], dtype=bits).view(dtype)
        edges = np.concatenate(
            [
                np.array([np.nan, -0.0, np.inf, -np.inf, finfo.smallest_subnormal, finfo.max, finfo.min], dtype=dtype),
                nans,
            ]
        )
    values[: min(size, len(edges))] = edges[:size]
    return values.reshape(shape)


def _same(sent: np.ndarray, received: np.ndarray) -> bool:
    if sent.dtype == np.object_:
        return received.dtype == np.object_ and received.shape == sent.shape and received.tolist() == sent.tolist()
    return received.dtype == sent.dtype and received.shape == sent.shape and received.tobytes() == sent.tobytes()


SHAPES = {1: (9,), 2: (3, 4), 3: (2, 3, 2)}
EMPTY_SHAPES = {1: (0,), 2: (2, 0), 3: (0, 3, 1)}


async def test_identity_returns_every_datatype_and_rank_bit_for_bit(triton: TritonServer) -> None:
    rng = np.random.default_rng(17)
    async with _client(triton) as client:
        for shapes in (SHAPES, EMPTY_SHAPES):
            sent = {
                f"{dt}_{rank}": _edge_values(dt, shapes[rank], rng) for dt in (*DATATYPES, "BYTES") for rank in RANKS
            }
            inputs = [_tensor(name, array, name.rsplit("_", 1)[0]) for name, array in sent.items()]
            result = await client.infer("identity", inputs, client_timeout=30.0)
            for name, array in sent.items():
                received = result.as_numpy(f"OUT_{name}")
                assert received is not None, name
                assert _same(array, received), (name, array, received)


async def test_identity_answers_only_the_inputs_sent_even_when_every_output_is_asked(triton: TritonServer) -> None:
    # As the worker calls a model: it asks for every output the model's metadata declares.
    async with _client(triton) as client:
        metadata = await client.get_model_metadata("identity", as_json=True)
        outputs = [InferRequestedOutput(o["name"]) for o in metadata["outputs"]]
        fp32 = np.array([[1.5, -0.0], [np.nan, 3.0]], dtype=np.float32)
        text = np.array([b"", b"\xff"], dtype=np.object_)
        result = await client.infer(
            "identity",
            [_tensor("FP32_2", fp32, "FP32"), _tensor("BYTES_1", text, "BYTES")],
            outputs=outputs,
            client_timeout=30.0,
        )
    assert sorted(o.name for o in result.get_response().outputs) == ["OUT_BYTES_1", "OUT_FP32_2"]
    assert _same(fp32, result.as_numpy("OUT_FP32_2")) and _same(text, result.as_numpy("OUT_BYTES_1"))


@st.composite
def _tensors(draw: st.DrawFn) -> tuple[str, np.ndarray]:
    datatype = draw(st.sampled_from((*DATATYPES, "BYTES")))
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=5))
    if datatype == "BYTES":
        elements = st.binary(max_size=20)
        return f"BYTES_{len(shape)}", draw(hnp.arrays(np.object_, shape, elements=elements))
    dtype = np.dtype(NUMPY_TYPES[datatype])
    if dtype.kind == "f":
        # Any bit pattern: generated as unsigned integers of the same width, then viewed as floats.
        bits = draw(hnp.arrays(np.dtype(f"u{dtype.itemsize}"), shape))
        return f"{datatype}_{len(shape)}", bits.view(dtype)
    return f"{datatype}_{len(shape)}", draw(hnp.arrays(dtype, shape))


def test_identity_round_trips_random_tensors(triton: TritonServer) -> None:
    client = grpcclient.InferenceServerClient(triton.grpc_url)

    @settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(tensors=st.dictionaries(st.integers(0, 38), _tensors(), min_size=1, max_size=6))
    def round_trip(tensors: dict[int, tuple[str, np.ndarray]]) -> None:
        sent = dict(tensors.values())  # one tensor per input name
        inputs = [_tensor(name, array, name.rsplit("_", 1)[0]) for name, array in sent.items()]
        result = client.infer("identity", inputs, client_timeout=30.0)
        assert sorted(o.name for o in result.get_response().outputs) == sorted(f"OUT_{n}" for n in sent)
        for name, array in sent.items():
            assert _same(array, result.as_numpy(f"OUT_{name}")), name

    try:
        round_trip()
    finally:
        client.close()
