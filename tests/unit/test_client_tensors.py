"""The client's tensors against the fake servers: input tensors of every datatype in raw form, large contents
uploaded in chunks with their SHA-256 and sent by reference, downloads checked against their digest, outputs
decoded to numpy arrays, and how the CLI renders raw outputs."""

from __future__ import annotations

import hashlib
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import pytest
from client_fakes import FAST, TASK, UNAVAILABLE, Failure, Fakes, ThreadedFakes, object_ref
from google.rpc import code_pb2

from aimesh import tensors
from aimesh.client import (
    DEFAULT_UPLOAD_THRESHOLD_BYTES,
    UPLOAD_CHUNK_BYTES,
    AsyncClient,
    Client,
    ClientError,
    DigestMismatch,
    TaskSpec,
    input_tensor,
)
from aimesh.client.render import output_lines
from aimesh.v1 import ingest_pb2, notifier_pb2, result_pb2

MIB = 1024 * 1024


def sample(datatype: str, shape: tuple[int, ...], seed: int = 7) -> npt.NDArray[Any]:
    """An array of ``datatype`` with awkward values: extremes, NaN and negative zero, bytes that are not UTF-8."""
    rng = np.random.default_rng(seed)
    count = int(np.prod(shape))
    if datatype == "BYTES":
        items = [b"", b"\x00\xff\xfe not utf-8", "héllo".encode(), *(rng.bytes(i % 9) for i in range(count))]
        array: npt.NDArray[Any] = np.empty(count, dtype=np.object_)
        array[:] = items[:count]
        return array.reshape(shape)
    dtype = tensors.DTYPES[datatype]
    if datatype == "BOOL":
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    raw = rng.bytes(count * dtype.itemsize)  # every bit pattern: NaNs with payloads, infinities, -0.0
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def raw_output(name: str, array: npt.NDArray[Any], datatype: str | None = None) -> result_pb2.OutputTensor:
    kind = datatype or tensors.datatype_of(array)
    return result_pb2.OutputTensor(
        name=name, datatype=kind, shape=list(array.shape), raw_contents=tensors.to_raw(kind, array)
    )


def submitted(fakes: Fakes) -> ingest_pb2.SubmitTaskRequest:
    [request] = [r for r in fakes.ingest.requests if isinstance(r, ingest_pb2.SubmitTaskRequest)]
    return request


@pytest.mark.parametrize("datatype", tensors.DATATYPES)
def test_every_datatype_becomes_an_input_tensor_bit_for_bit(datatype: str) -> None:
    array = sample(datatype, (2, 3))
    request = TaskSpec("identity", tensors={"INPUT": array, "EMPTY": sample(datatype, (0, 4))}).request()

    assert request.input.WhichOneof("kind") == "tensors"
    [tensor, empty] = request.input.tensors.tensors
    assert (tensor.name, tensor.datatype, list(tensor.shape)) == ("INPUT", datatype, [2, 3])
    assert tensor.raw_contents == tensors.to_raw(datatype, array)
    back = tensors.to_numpy(datatype, tensor.shape, tensor.raw_contents)
    assert back.tobytes() == array.tobytes() if datatype != "BYTES" else back.tolist() == array.tolist()
    assert (empty.datatype, list(empty.shape), empty.raw_contents) == (datatype, [0, 4], b"")


def test_arrays_take_their_datatype_from_their_dtype() -> None:
    assert input_tensor("T", [[1, 2], [3, 4]]).datatype == "INT64"
    assert input_tensor("T", np.array([1.5], dtype=">f4")).raw_contents == np.array([1.5], "<f4").tobytes()
    words = input_tensor("T", np.array(["ab", "ç"]))
    assert (words.datatype, words.raw_contents) == ("BYTES", b"\x02\x00\x00\x00ab\x02\x00\x00\x00\xc3\xa7")
    assert input_tensor("T", np.arange(3), datatype="FP16").raw_contents == np.arange(3, dtype="<f2").tobytes()
    with pytest.raises(ValueError, match="no Triton datatype"):
        input_tensor("T", np.array([1 + 2j]))


def test_a_task_carries_text_or_tensors_and_given_messages_are_left_alone() -> None:
    with pytest.raises(ValueError, match="not both"):
        TaskSpec("identity", "text", tensors={"X": np.zeros(1)}).request()
    assert TaskSpec("summarize", "text").request().input.text == "text"
    assert TaskSpec("identity", tensors={}).request().input.WhichOneof("kind") == "tensors"
    given = input_tensor("X", np.zeros(4, dtype=np.uint8))
    request = TaskSpec("identity", tensors=[given]).request()
    request.input.tensors.tensors[0].object.key = "moved"
    assert given.WhichOneof("contents") == "raw_contents"


async def test_large_contents_are_uploaded_in_chunks_with_their_digest_and_sent_by_reference(
    fakes: Fakes, client: AsyncClient
) -> None:
    large = sample("UINT8", (2 * MIB + 5,))
    small = sample("FP32", (DEFAULT_UPLOAD_THRESHOLD_BYTES // 4,))  # exactly the threshold: stays inline
    await client.submit("identity", tensors={"LARGE": large, "SMALL": small})

    [upload] = fakes.ingest.uploads
    header = upload[0].header
    assert upload[0].WhichOneof("part") == "header"
    assert (header.size, header.sha256) == (large.size, hashlib.sha256(large.tobytes()).hexdigest())
    assert header.content_type == "application/octet-stream"
    assert [len(m.chunk) for m in upload[1:]] == [UPLOAD_CHUNK_BYTES, UPLOAD_CHUNK_BYTES, 5]
    [by_reference, inline] = submitted(fakes).input.tensors.tensors
    assert by_reference.WhichOneof("contents") == "object"
    assert by_reference.object.sha256 == header.sha256 and by_reference.object.size == large.size
    assert fakes.ingest.objects[by_reference.object.key] == large.tobytes()
    assert (by_reference.datatype, list(by_reference.shape)) == ("UINT8", [2 * MIB + 5])
    assert inline.WhichOneof("contents") == "raw_contents" and inline.raw_contents == small.tobytes()


async def test_the_threshold_is_the_clients_and_an_upload_is_retried_whole(fakes: Fakes) -> None:
    fakes.ingest.upload_failures = [UNAVAILABLE]
    async with AsyncClient(
        fakes.ingest_address, fakes.notifier_address, retry=FAST, upload_threshold_bytes=10
    ) as client:
        await client.submit("identity", tensors={"X": np.arange(3, dtype=np.int32)})  # 12 bytes > 10
    first, second = fakes.ingest.uploads
    assert first == second and b"".join(m.chunk for m in second[1:]) == np.arange(3, dtype="<i4").tobytes()
    assert submitted(fakes).input.tensors.tensors[0].WhichOneof("contents") == "object"


async def test_upload_answers_the_reference_and_refusals_are_client_errors(fakes: Fakes, client: AsyncClient) -> None:
    ref = await client.upload(b"\x89PNG data", content_type="image/png")
    assert ref.content_type == "image/png" and fakes.ingest.objects[ref.key] == b"\x89PNG data"
    fakes.ingest.upload_failures = [Failure(code_pb2.FAILED_PRECONDITION, "the mesh runs without an object store")]
    with pytest.raises(ClientError) as refused:
        await client.upload(b"x")
    assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION


async def test_download_checks_the_digest_of_what_it_received(fakes: Fakes, client: AsyncClient) -> None:
    data = sample("UINT8", (2 * MIB + 3,)).tobytes()
    fakes.notifier.downloads[(TASK, "IMAGE")] = data
    assert await client.download(TASK, "IMAGE") == data

    fakes.notifier.download_refs[(TASK, "IMAGE")] = object_ref(data[:-1] + b"\x00")
    with pytest.raises(DigestMismatch) as damaged:
        await client.download(TASK, "IMAGE")
    assert damaged.value.code == grpc.StatusCode.DATA_LOSS and not damaged.value.retryable
    assert "SHA-256" in damaged.value.message and isinstance(damaged.value, ClientError)

    fakes.notifier.download_refs[(TASK, "IMAGE")] = object_ref(data + b"!")
    with pytest.raises(DigestMismatch, match="bytes"):
        await client.download(TASK, "IMAGE")


async def test_a_damaged_object_the_notifier_found_is_a_digest_mismatch(fakes: Fakes, client: AsyncClient) -> None:
    fakes.notifier.downloads[(TASK, "IMAGE")] = b"data"
    fakes.notifier.download_failures = [UNAVAILABLE, Failure(code_pb2.DATA_LOSS, "the object's SHA-256 differs")]
    with pytest.raises(DigestMismatch, match="SHA-256 differs"):
        await client.download(TASK, "IMAGE")
    assert len(fakes.notifier.download_requests) == 2  # UNAVAILABLE retried, DATA_LOSS not
    with pytest.raises(ClientError) as missing:
        await client.download(TASK, "OTHER")
    assert missing.value.code == grpc.StatusCode.NOT_FOUND


def a_result(*outputs: result_pb2.OutputTensor) -> notifier_pb2.TaskState:
    result = result_pb2.AIResultEvent(task_id=TASK, status=result_pb2.TASK_STATUS_SUCCEEDED, sequence=3)
    result.output.tensors.extend(outputs)
    return notifier_pb2.TaskState(task_id=TASK, status=result.status, sequence=3, result=result)


def by_reference(name: str, array: npt.NDArray[Any]) -> result_pb2.OutputTensor:
    output = raw_output(name, array)
    output.object.CopyFrom(object_ref(output.raw_contents, key=f"results/{name}"))
    output.ClearField("raw_contents")
    return output


async def test_outputs_decodes_raw_downloads_by_reference_and_converts_typed(fakes: Fakes, client: AsyncClient) -> None:
    probabilities = sample("FP32", (10,))
    png = np.array([b"\x89PNG\r\n\x1a\n" + bytes(range(256))], dtype=np.object_)
    large = sample("FP64", (300, 300))
    fakes.notifier.downloads[(TASK, "LARGE")] = large.tobytes()
    typed = result_pb2.OutputTensor(name="SCORE", datatype="FP32", shape=[2], float_data=[0.5, 0.25])
    state = a_result(
        raw_output("LABEL", np.array([7], dtype=np.int64)),
        raw_output("PROBABILITIES", probabilities),
        raw_output("PNG", png),
        by_reference("LARGE", large),
        typed,
        result_pb2.OutputTensor(name="TEXT", datatype="BYTES", shape=[1], string_data=["hi"]),
    )

    arrays = await client.outputs(state)
    assert arrays["LABEL"].tolist() == [7] and arrays["LABEL"].dtype == np.int64
    assert arrays["PROBABILITIES"].tobytes() == probabilities.tobytes()
    assert arrays["PNG"].tolist() == png.tolist()
    assert arrays["LARGE"].shape == (300, 300) and arrays["LARGE"].tobytes() == large.tobytes()
    assert arrays["SCORE"].tolist() == [0.5, 0.25] and arrays["SCORE"].dtype == np.float32
    assert arrays["TEXT"].tolist() == ["hi"]

    # The notifier's object agrees with itself but not with the reference the result holds.
    fakes.notifier.downloads[(TASK, "LARGE")] = large.tobytes()[::-1]
    with pytest.raises(DigestMismatch, match="LARGE"):
        await client.outputs(state)


def test_raw_outputs_are_rendered_decoded_or_described() -> None:
    large = np.zeros((1000, 1000), dtype=np.float32)
    lines = output_lines(
        a_result(
            raw_output("LABEL", np.array([7], dtype=np.int64)),
            raw_output("PROBABILITIES", np.linspace(0, 1, 10, dtype=np.float32)),
            raw_output("CAPTION", np.array([b"a cat"], dtype=np.object_)),
            raw_output("PNG", np.array([b"\x89PNG\r\n\x1a\nrest"], dtype=np.object_)),
            raw_output("BLOB", np.array([b"\xff\x00"], dtype=np.object_)),
            raw_output("MASK", np.array([[True, False]])),
            by_reference("LARGE", large),
            result_pb2.OutputTensor(name="BAD", datatype="FP32", shape=[2], raw_contents=b"\x00"),
        ).result
    )
    sha = hashlib.sha256(large.tobytes()).hexdigest()
    assert lines == [
        "LABEL: [7]",
        "PROBABILITIES: [0, 0.1111, 0.2222, 0.3333, 0.4444, 0.5556, 0.6667, 0.7778, ... (10 values)]",
        "CAPTION: a cat",
        "PNG: <PNG image, 12 bytes>",
        "BLOB: <2 bytes>",
        "MASK: [True, False] shape [1, 2]",
        f"LARGE: FP32 [1000, 1000] <4000000 bytes, sha256 {sha[:12]}...> (held by reference)",
        "BAD: FP32 [2] <1 bytes that do not fit: has 1 bytes of contents; FP32 of shape [2] takes 8>",
    ]


def test_the_blocking_client_mirrors_tensors_uploads_and_downloads(threaded_fakes: ThreadedFakes) -> None:
    image = sample("UINT8", (600, 600))  # 360 000 bytes: over the default threshold
    threaded_fakes.notifier.downloads[(TASK, "LARGE")] = image.tobytes()
    with Client(threaded_fakes.ingest_address, threaded_fakes.notifier_address, retry=FAST) as client:
        client.submit("resize", tensors={"IMAGE": image}, parameters={"scale": "0.5"})
        ref = client.upload(b"abc")
        assert client.download(TASK, "LARGE") == image.tobytes()
        arrays = client.outputs(a_result(by_reference("LARGE", image)).result)
    [upload, _] = threaded_fakes.ingest.uploads
    assert upload[0].header.size == image.size and ref.size == 3
    assert np.array_equal(arrays["LARGE"], image)
    [request] = [r for r in threaded_fakes.ingest.requests if isinstance(r, ingest_pb2.SubmitTaskRequest)]
    assert request.input.tensors.tensors[0].object.size == image.size
