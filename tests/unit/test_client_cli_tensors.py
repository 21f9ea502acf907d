"""The `aimesh` CLI with tensors, against the threaded_fakes: --image decoded with Pillow, --tensor from .npy files,
--output-dir writing raw outputs (downloading the ones held by reference), raw outputs printed without it."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from client_fakes import TASK, ThreadedFakes, aimesh, object_ref, story
from PIL import Image

from aimesh import tensors
from aimesh.client.cli import EXIT_USAGE
from aimesh.v1 import ingest_pb2, result_pb2, tensor_pb2

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def sent_tensors(threaded_fakes: ThreadedFakes) -> dict[str, tensor_pb2.InputTensor]:
    [request] = threaded_fakes.ingest.requests
    assert isinstance(request, ingest_pb2.SubmitTaskRequest)
    return {t.name: t for t in request.input.tensors.tensors}


def raw_output(name: str, array: npt.NDArray[Any]) -> result_pb2.OutputTensor:
    kind = tensors.datatype_of(array)
    return result_pb2.OutputTensor(
        name=name, datatype=kind, shape=list(array.shape), raw_contents=tensors.to_raw(kind, array)
    )


def test_image_is_sent_as_a_grey_uint8_tensor_or_in_color(threaded_fakes: ThreadedFakes, tmp_path: Path) -> None:
    pixels = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    Image.fromarray(pixels, mode="L").save(tmp_path / "digit.png")
    result = aimesh(threaded_fakes, "submit", "digits", "--image", str(tmp_path / "digit.png"))
    assert result.exit_code == 0, result.output
    image = sent_tensors(threaded_fakes)["IMAGE"]
    assert (image.datatype, list(image.shape), image.raw_contents) == ("UINT8", [8, 8], pixels.tobytes())

    rgb = np.zeros((3, 5, 3), dtype=np.uint8)
    rgb[..., 0] = 255
    Image.fromarray(rgb, mode="RGB").save(tmp_path / "red.png")
    threaded_fakes.ingest.requests.clear()
    result = aimesh(threaded_fakes, "submit", "resize", "--image", str(tmp_path / "red.png"), "--input-name", "PICTURE")
    assert result.exit_code == 0, result.output
    grey = sent_tensors(threaded_fakes)["PICTURE"]
    assert list(grey.shape) == [3, 5] and set(grey.raw_contents) == {76}  # Pillow's L of pure red

    threaded_fakes.ingest.requests.clear()
    result = aimesh(
        threaded_fakes, "submit", "resize", "--image", str(tmp_path / "red.png"), "--keep-color", "-p", "scale=2"
    )
    assert result.exit_code == 0, result.output
    color = sent_tensors(threaded_fakes)["IMAGE"]
    assert list(color.shape) == [3, 5, 3] and color.raw_contents == rgb.tobytes()


def test_tensors_from_npy_files(threaded_fakes: ThreadedFakes, tmp_path: Path) -> None:
    values = np.array([[1.5, -0.0], [np.inf, 3.25]], dtype=np.float32)
    words = np.array([b"ab", b"c"])
    np.save(tmp_path / "values.npy", values)
    np.save(tmp_path / "words.npy", words)
    result = aimesh(
        threaded_fakes, "submit", "identity", "--tensor", f"VALUES={tmp_path / 'values.npy'}",
        "--tensor", f"WORDS={tmp_path / 'words.npy'}",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    sent = sent_tensors(threaded_fakes)
    assert (sent["VALUES"].datatype, list(sent["VALUES"].shape)) == ("FP32", [2, 2])
    assert sent["VALUES"].raw_contents == values.tobytes()
    assert sent["WORDS"].datatype == "BYTES" and sent["WORDS"].raw_contents == tensors.to_raw("BYTES", words)


def test_usage_errors_with_tensors(threaded_fakes: ThreadedFakes, tmp_path: Path) -> None:
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "digit.png")
    (tmp_path / "not.png").write_bytes(b"not an image")
    np.save(tmp_path / "x.npy", np.zeros(2))
    digit, npy = str(tmp_path / "digit.png"), str(tmp_path / "x.npy")
    for args in (
        ["digits"],  # neither text nor tensors
        ["digits", "some text", "--image", digit],  # both
        ["digits", "--image", str(tmp_path / "not.png")],
        ["digits", "--image", str(tmp_path / "missing.png")],
        ["digits", "--tensor", "X"],
        ["digits", "--tensor", f"X={tmp_path / 'digit.png'}"],
        ["digits", "--tensor", f"X={npy}", "--tensor", f"X={npy}"],
        ["digits", "--image", digit, "--tensor", f"IMAGE={npy}"],
        ["digits", "--tensor", f"X={npy}", "--keep-color"],
        ["digits", "--image", digit, "--output-dir", str(tmp_path / "out")],  # without --wait
    ):
        result = aimesh(threaded_fakes, "submit", *args)
        assert result.exit_code == EXIT_USAGE, (args, result.output)
    assert not threaded_fakes.ingest.requests


def digits_outputs(threaded_fakes: ThreadedFakes) -> tuple[npt.NDArray[Any], bytes, npt.NDArray[Any]]:
    """The final update of TASK: a label, probabilities, a PNG, and a large array held by reference."""
    probabilities = np.linspace(0, 0.9, 10, dtype=np.float32)
    png = PNG_MAGIC + bytes(range(200))
    large = np.arange(400 * 400, dtype=np.float32).reshape(400, 400)
    final = story(TASK, [])[-1]
    final.result.output.tensors.extend(
        [
            raw_output("LABEL", np.array([7], dtype=np.int64)),
            raw_output("PROBABILITIES", probabilities),
            raw_output("IMAGE_PNG", np.array([png], dtype=np.object_)),
            result_pb2.OutputTensor(
                name="LARGE", datatype="FP32", shape=[400, 400], object=object_ref(large.tobytes())
            ),
        ]
    )
    threaded_fakes.ingest.task_ids = [TASK]
    threaded_fakes.notifier.updates[TASK] = [*story(TASK, [])[:2], final]
    threaded_fakes.notifier.downloads[(TASK, "LARGE")] = large.tobytes()
    return probabilities, png, large


def test_wait_with_output_dir_writes_raw_outputs_to_files(threaded_fakes: ThreadedFakes, tmp_path: Path) -> None:
    probabilities, png, large = digits_outputs(threaded_fakes)
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "digit.png")
    out = tmp_path / "out"
    result = aimesh(
        threaded_fakes, "submit", "digits", "--image", str(tmp_path / "digit.png"), "--wait", "--output-dir", str(out)
    )
    assert result.exit_code == 0, result.output

    assert sorted(p.name for p in out.iterdir()) == ["IMAGE_PNG.png", "LABEL.npy", "LARGE.npy", "PROBABILITIES.npy"]
    assert (out / "IMAGE_PNG.png").read_bytes() == png
    assert np.load(out / "LABEL.npy").tolist() == [7]
    assert np.load(out / "PROBABILITIES.npy").tobytes() == probabilities.tobytes()
    assert np.array_equal(np.load(out / "LARGE.npy"), large)
    assert f"IMAGE_PNG: wrote {out / 'IMAGE_PNG.png'} ({len(png)} bytes)" in result.stdout.splitlines()
    assert len(result.stdout.splitlines()) == 4 and "SUCCEEDED" in result.stderr
    [download] = threaded_fakes.notifier.download_requests
    assert (download.task_id, download.output_name) == (TASK, "LARGE")

    result = aimesh(threaded_fakes, "get", TASK, "--output-dir", str(tmp_path / "again"))  # get writes them too
    assert result.exit_code == 0 and (tmp_path / "again" / "IMAGE_PNG.png").read_bytes() == png


def test_without_output_dir_raw_outputs_are_printed_and_large_ones_named(threaded_fakes: ThreadedFakes) -> None:
    _, png, large = digits_outputs(threaded_fakes)
    result = aimesh(threaded_fakes, "watch", TASK)
    assert result.exit_code == 0, result.output
    sha = hashlib.sha256(large.tobytes()).hexdigest()
    assert result.stdout.splitlines() == [
        "LABEL: [7]",
        "PROBABILITIES: [0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, ... (10 values)]",
        f"IMAGE_PNG: <PNG image, {len(png)} bytes>",
        f"LARGE: FP32 [400, 400] <{large.nbytes} bytes, sha256 {sha[:12]}...> (held by reference); "
        "--output-dir DIR writes it to DIR/LARGE.npy",
    ]
    assert not threaded_fakes.notifier.download_requests


def test_json_with_output_dir_prints_json_lines_and_writes_files(threaded_fakes: ThreadedFakes, tmp_path: Path) -> None:
    _, png, _ = digits_outputs(threaded_fakes)
    result = aimesh(threaded_fakes, "--json", "watch", TASK, "--output-dir", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert all(line.startswith("{") for line in result.stdout.splitlines())
    assert (tmp_path / "IMAGE_PNG.png").read_bytes() == png and "IMAGE_PNG: wrote" in result.stderr
