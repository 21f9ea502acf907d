"""How the CLI shows tasks to a person: output tensors as lines, a live status line, streamed tokens."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any, TextIO

import numpy.typing as npt

from aimesh.client import payloads
from aimesh.tensors import BadTensor
from aimesh.v1 import notifier_pb2, result_pb2

MAX_NUMBERS_SHOWN = 8
MAX_TEXT_SHOWN = 200
SHA256_SHOWN = 12


def status_name(status: int) -> str:
    return result_pb2.TaskStatus.Name(status).removeprefix("TASK_STATUS_")  # type: ignore[arg-type]


def partial_text(state: notifier_pb2.TaskState) -> str | None:
    """The tokens a partial output of a streaming model adds, or None if ``state`` is not one."""
    if not state.result.partial:
        return None
    return "".join(s for t in state.result.output.tensors if t.name == "TEXT" for s in t.string_data)


def output_lines(result: result_pb2.AIResultEvent) -> list[str]:
    """``NAME: value`` for each output tensor; long numeric tensors shortened; raw outputs decoded, binary ones
    and ones held by reference described (``<N bytes, sha256 ...>``)."""
    lines = []
    for tensor in result.output.tensors:
        if payloads.is_raw(tensor):
            lines.append(f"{tensor.name}: {raw_value(tensor)}")
        elif tensor.string_data:
            value = tensor.string_data[0] if len(tensor.string_data) == 1 else list(tensor.string_data)
            lines.append(f"{tensor.name}: {value}")
        else:
            lines.append(f"{tensor.name}: {_numbers(list(tensor.float_data) or list(tensor.int_data))}")
    return lines


def raw_value(tensor: result_pb2.OutputTensor) -> str:
    """A raw output as a person reads it: numbers as the typed ones, text as text, other bytes by size."""
    if payloads.is_by_reference(tensor):
        ref = tensor.object
        return f"{_kind(tensor)} <{ref.size} bytes, sha256 {ref.sha256[:SHA256_SHOWN]}...> (held by reference)"
    try:
        array = payloads.output_array(tensor)
    except BadTensor as e:
        return f"{_kind(tensor)} <{len(tensor.raw_contents)} bytes that do not fit: {e}>"
    if tensor.datatype == "BYTES":
        return _bytes_elements(array)
    values = array.reshape(-1)[:MAX_NUMBERS_SHOWN].tolist()
    return _numbers(values, array.size) + (f" shape {list(tensor.shape)}" if len(tensor.shape) > 1 else "")


def _kind(tensor: result_pb2.OutputTensor) -> str:
    return f"{tensor.datatype} {list(tensor.shape)}"


def _numbers(numbers: Sequence[Any], count: int | None = None) -> str:
    total = len(numbers) if count is None else count
    shown = ", ".join(f"{n:.4g}" if isinstance(n, float) else str(n) for n in numbers[:MAX_NUMBERS_SHOWN])
    more = f", ... ({total} values)" if total > MAX_NUMBERS_SHOWN else ""
    return f"[{shown}{more}]"


def _bytes_elements(array: npt.NDArray[Any]) -> str:
    items = [_one_bytes(item) for item in array.reshape(-1)[:MAX_NUMBERS_SHOWN].tolist()]
    if array.size == 1:
        return items[0]
    more = f", ... ({array.size} values)" if array.size > MAX_NUMBERS_SHOWN else ""
    return f"[{', '.join(items)}{more}]"


def _one_bytes(item: bytes) -> str:
    if item.startswith(payloads.PNG_MAGIC):
        return f"<PNG image, {len(item)} bytes>"
    try:
        text = item.decode("utf-8")
    except UnicodeDecodeError:
        return f"<{len(item)} bytes>"
    if not all(c.isprintable() or c in "\n\t" for c in text):
        return f"<{len(item)} bytes>"
    return text if len(text) <= MAX_TEXT_SHOWN else f"{text[:MAX_TEXT_SHOWN]}... ({len(text)} characters)"


def text_output(result: result_pb2.AIResultEvent) -> str | None:
    for tensor in result.output.tensors:
        if tensor.name == "TEXT" and tensor.string_data:
            return "".join(tensor.string_data)
    return None


def failure_line(state: notifier_pb2.TaskState) -> str:
    """One line saying how a task that did not succeed ended."""
    line = f"task {state.task_id} {status_name(state.status)}"
    error = state.result.error
    if error.code or error.message:
        code = result_pb2.ErrorCode.Name(error.code).removeprefix("ERROR_CODE_")
        retry = " (retryable)" if error.retryable else ""
        line += f": {code}: {error.message}{retry}"
    return line


class StatusLine:
    """A status line on a terminal (rewritten in place, with the time since it started ticking), or one
    line per change on anything else."""

    def __init__(self, stream: TextIO, task_id: str) -> None:
        self._stream = stream
        self._task_id = task_id
        self._live = stream.isatty()
        self._status = ""
        self._shown = False
        self._started = time.monotonic()
        self._ticker: asyncio.Task[None] | None = None

    def set(self, status: str) -> None:
        if status == self._status:
            return
        self._status = status
        if self._live:
            self._draw()
            if self._ticker is None:
                self._ticker = asyncio.get_running_loop().create_task(self._tick())
        else:
            print(f"{status} {self._task_id}", file=self._stream, flush=True)

    def clear(self) -> None:
        """Erase the line (before tokens or the final output) and stop ticking."""
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        if self._live and self._shown:
            self._stream.write("\r\033[K")
            self._stream.flush()
            self._shown = False

    def _draw(self) -> None:
        elapsed = time.monotonic() - self._started
        self._stream.write(f"\r\033[K{self._status} {self._task_id} {elapsed:.1f} s")
        self._stream.flush()
        self._shown = True

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            self._draw()
