"""The `aimesh` command's files: images and numpy arrays read as input tensors, raw outputs written to a folder."""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click
import numpy as np
import numpy.typing as npt
from PIL import Image

from aimesh.client import payloads
from aimesh.errors import AimeshError
from aimesh.v1 import result_pb2

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


class UnreadableInput(AimeshError, ValueError):
    """An input file that is not an image or a numpy array."""


def read_image(path: Path, *, keep_color: bool = False) -> npt.NDArray[np.uint8]:
    """An image file (PNG, or anything Pillow reads) as a UINT8 array: grey HxW, or RGB HxWx3 with
    ``keep_color``."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB" if keep_color else "L"), dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UnreadableInput(f"{path} is not an image Pillow reads: {e}") from None


def read_array(path: Path) -> npt.NDArray[Any]:
    """A numpy .npy file (never unpickled: BYTES tensors as fixed-width bytes or str arrays)."""
    try:
        array: npt.NDArray[Any] = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UnreadableInput(f"{path} is not a numpy .npy file without objects: {e}") from None
    if not isinstance(array, np.ndarray):
        raise UnreadableInput(f"{path} holds several arrays (.npz): give one .npy file per tensor")
    return array


def tensor_files(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, npt.NDArray[Any]]:
    """--tensor NAME=FILE.npy, repeated: the arrays by name."""
    arrays = {}
    for item in values:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise click.BadParameter(f"{item!r} is not NAME=FILE.npy", ctx, param)
        if name in arrays:
            raise click.BadParameter(f"tensor {name} is given twice", ctx, param)
        try:
            arrays[name] = read_array(Path(path))
        except UnreadableInput as e:
            raise click.BadParameter(str(e), ctx, param) from None
    return arrays


def task_input(
    text: str | None, image: Path | None, keep_color: bool, input_name: str, arrays: dict[str, npt.NDArray[Any]]
) -> tuple[str, dict[str, npt.NDArray[Any]] | None]:
    """The task's text, or its tensors (the image's and the arrays); a usage error for both or neither."""
    if keep_color and image is None:
        raise click.UsageError("--keep-color goes with --image")
    if image is None and not arrays:
        if text is None:
            raise click.UsageError("give TEXT, or tensors with --image or --tensor")
        return (sys.stdin.read() if text == "-" else text), None
    if text is not None:
        raise click.UsageError("a task carries TEXT or tensors (--image, --tensor), not both")
    tensors = dict(arrays)
    if image is not None:
        if input_name in tensors:
            raise click.UsageError(f"input {input_name} is given by --image and by --tensor")
        try:
            tensors[input_name] = read_image(image, keep_color=keep_color)
        except UnreadableInput as e:
            raise click.BadParameter(str(e), param_hint="--image") from None
    return "", tensors


def file_name(name: str) -> str:
    """An output name made safe as a file name in the output folder (no separators, not hidden)."""
    return _UNSAFE.sub("_", name).lstrip(".") or "output"


def planned_file(tensor: result_pb2.OutputTensor) -> str:
    """Where ``write_outputs`` puts an output, before its contents are known (a BYTES output of one element may
    gain .png)."""
    single = tensor.datatype == "BYTES" and len(tensor.shape) <= 1 and list(tensor.shape) in ([], [1])
    return file_name(tensor.name) if single else f"{file_name(tensor.name)}.npy"


def write_outputs(
    folder: Path, result: result_pb2.AIResultEvent, arrays: Mapping[str, npt.NDArray[Any]]
) -> dict[str, tuple[Path, int]]:
    """Write each raw output of ``result`` (``arrays``: them decoded) into ``folder``: a BYTES output of one
    element as its bytes, ``NAME`` (``NAME.png`` for a PNG), any other as ``NAME.npy`` (BYTES as fixed-width
    bytes). Output name -> (path, bytes written)."""
    folder.mkdir(parents=True, exist_ok=True)
    written: dict[str, tuple[Path, int]] = {}
    for tensor in result.output.tensors:
        if not payloads.is_raw(tensor) or tensor.name not in arrays:
            continue
        array = arrays[tensor.name]
        element = payloads.single_bytes(tensor, array)
        if element is not None:
            suffix = ".png" if element.startswith(payloads.PNG_MAGIC) else ""
            path = folder / f"{file_name(tensor.name)}{suffix}"
            path.write_bytes(element)
        else:
            path = folder / f"{file_name(tensor.name)}.npy"
            if array.dtype == np.object_:
                array = np.array([_as_bytes(item) for item in array.reshape(-1)], dtype=np.bytes_).reshape(array.shape)
            np.save(path, array, allow_pickle=False)
        written[tensor.name] = (path, path.stat().st_size)
    return written


def _as_bytes(item: object) -> bytes:
    return item if isinstance(item, bytes) else str(item).encode("utf-8")
