"""The code's shape: no module in src/ or services/ over 400 lines and no function or method over 60 (generated
protobuf code aside), so that a newcomer finds each behaviour in a module and a function small enough to read;
and defaults written once, not repeated where they can drift apart."""

from __future__ import annotations

import ast
import inspect
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from aimesh.devstack.kafka import KafkaBrokerError
from aimesh.devstack.triton import TritonServerError
from aimesh.errors import AimeshError
from aimesh.notifier.buffers import BufferLimits
from aimesh.notifier.forwarding import Forwarder
from aimesh.notifier.service import StreamLimits, TooManySubscriptions
from aimesh.settings import NotifierSettings, ServerSettings, WorkerSettings
from aimesh.worker.batching import Batcher
from aimesh.worker.options import WorkerOptions

ROOT = Path(__file__).resolve().parents[2]
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def modules() -> Iterator[Path]:
    """Every hand-written Python module of the services and the library."""
    for top in ("src", "services"):
        for path in sorted((ROOT / top).rglob("*.py")):
            if "_pb2" not in path.name:
                yield path


def long_functions(path: Path) -> Iterator[str]:
    """Each function or method of ``path`` longer than the limit, counted from its ``def`` line to its last."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            lines = (node.end_lineno or node.lineno) - node.lineno + 1
            if lines > MAX_FUNCTION_LINES:
                yield f"{path.relative_to(ROOT)}:{node.lineno} {node.name} has {lines} lines"


def test_the_structure_check_sees_the_services_and_the_library() -> None:
    found = {path.relative_to(ROOT).as_posix() for path in modules()}
    assert {"services/notifier/store.py", "src/aimesh/settings.py", "services/worker/worker.py"} <= found
    assert not any("_pb2" in name for name in found)


def test_no_module_is_over_400_lines() -> None:
    long = [
        f"{path.relative_to(ROOT)} has {lines} lines"
        for path in modules()
        if (lines := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    ]
    assert not long, f"modules over {MAX_MODULE_LINES} lines:\n" + "\n".join(long)


def test_no_function_is_over_60_lines() -> None:
    long = [offender for path in modules() for offender in long_functions(path)]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


def test_the_stream_limits_default_to_the_notifier_settings() -> None:
    settings = NotifierSettings.model_construct()  # the defaults, whatever the environment says
    assert StreamLimits() == StreamLimits.of(settings)


def default(function: Callable[..., Any], parameter: str) -> Any:
    return inspect.signature(function).parameters[parameter].default


def test_the_stream_buffer_limits_default_to_the_notifier_settings() -> None:
    settings = NotifierSettings.model_construct()
    assert BufferLimits() == BufferLimits(settings.max_stream_buffer_bytes, settings.max_stream_buffer_updates)


def test_the_worker_options_inline_limit_defaults_to_the_worker_settings() -> None:
    assert default(WorkerOptions, "inline_limit_bytes") == WorkerSettings.model_construct().inline_limit_bytes


def test_the_batcher_request_size_defaults_to_the_worker_settings() -> None:
    assert default(Batcher, "max_request_bytes") == WorkerSettings.model_construct().max_request_bytes


def test_the_forwarded_message_size_defaults_to_the_server_settings() -> None:
    assert default(Forwarder, "max_message_bytes") == ServerSettings.model_construct().max_message_bytes


def test_the_notifier_and_dev_stack_errors_have_the_one_root() -> None:
    assert issubclass(TooManySubscriptions, AimeshError)
    # Still RuntimeErrors too, as callers of the dev stack catch them.
    assert issubclass(KafkaBrokerError, AimeshError) and issubclass(KafkaBrokerError, RuntimeError)
    assert issubclass(TritonServerError, AimeshError) and issubclass(TritonServerError, RuntimeError)
