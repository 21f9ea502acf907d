"""A real Triton Inference Server, run from the binary inside the ``nvidia-pytriton`` wheel, on CPU.

The wheel ships ``tritonserver`` with only the Python backend, plus one backend stub per Python minor version.
Running it outside pytriton takes three preparations, each from a failure seen on this machine:

* the stub for the environment's Python version is copied into ``backends/python/`` (the wheel leaves it out);
* that environment's ``bin`` goes first on PATH, because the stub takes the first ``python3`` there as its
  home, and so as the source of the packages the models import;
* the interpreter's own ``LIBDIR`` goes first on LD_LIBRARY_PATH: the stub links ``libpython3.X.so``, and a
  system copy of a different patch release fails deep inside the standard library.

Every server gets its own shared-memory prefix for the Python backend, so the regions a killed server leaves
in ``/dev/shm`` can be removed without touching another server's.

The server (and so its backend stubs, which inherit its environment) runs on jemalloc when the system has it
(Debian's ``libjemalloc2``, installed by ``make malloc``), as Triton's documentation advises against the memory
growth glibc's allocator shows under large and varied requests; docs/soak.md has the measurements.
"""

from __future__ import annotations

import ctypes.util
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tritonclient.grpc import InferenceServerClient
from tritonclient.utils import InferenceServerException

from aimesh.errors import AimeshError

from .process import Launched

_SHM_DIR = Path("/dev/shm")
# The Python backend's default region prefix, kept as the start of ours so that the usual clean-up glob
# (``triton_python_backend_shm_region_*``) still matches what a server left behind.
_SHM_PREFIX_BASE = "triton_python_backend_shm_region_aimesh_"
_EXCERPT_LINES = 15
_EXCERPT_LINE_CHARS = 600
_POLL_INTERVAL_S = 0.1

_log = logging.getLogger(__name__)


def jemalloc_library() -> str | None:
    """The soname of the system's jemalloc (``libjemalloc.so.2``), for LD_PRELOAD; None when it is not installed."""
    return ctypes.util.find_library("jemalloc")


# Run by the target environment's interpreter, which may not be this one.
_PROBE = """
import importlib.util, json, sys, sysconfig
spec = importlib.util.find_spec("pytriton")
print(json.dumps({
    "version": f"{sys.version_info[0]}.{sys.version_info[1]}",
    "libdir": sysconfig.get_config_var("LIBDIR"),
    "pytriton": list(spec.submodule_search_locations) if spec else [],
}))
"""


class TritonServerError(AimeshError, RuntimeError):
    """The development Triton server could not be prepared, did not become ready, or is not running."""


@dataclass(frozen=True)
class _Distribution:
    """Where the wheel's server lives and what the target environment needs to run it."""

    server_dir: Path  # site-packages/pytriton/tritonserver
    libs_dir: Path  # site-packages/nvidia_pytriton.libs
    python_version: str
    python_libdir: Path

    @property
    def binary(self) -> Path:
        return self.server_dir / "bin" / "tritonserver"

    @property
    def backends_dir(self) -> Path:
        return self.server_dir / "backends"


def _probe_distribution(python_prefix: Path) -> _Distribution:
    python = python_prefix / "bin" / "python3"
    try:
        result = subprocess.run([str(python), "-c", _PROBE], capture_output=True, text=True, timeout=30.0, check=True)
    except (OSError, subprocess.SubprocessError) as e:
        raise TritonServerError(f"cannot inspect the Python environment at {python_prefix}: {e}") from e
    found = json.loads(result.stdout)
    if not found["pytriton"]:
        raise TritonServerError(f"nvidia-pytriton is not installed in {python_prefix}")
    server_dir = Path(found["pytriton"][0]) / "tritonserver"
    return _Distribution(
        server_dir=server_dir,
        libs_dir=server_dir.parent.parent / "nvidia_pytriton.libs",
        python_version=found["version"],
        python_libdir=Path(found["libdir"]),
    )


def _install_stub(dist: _Distribution) -> None:
    """Put the stub for ``dist``'s Python version where the Python backend looks for it (idempotent)."""
    source = dist.server_dir / "python_backend_stubs" / dist.python_version / "triton_python_backend_stub"
    target = dist.backends_dir / "python" / "triton_python_backend_stub"
    if not source.is_file():
        raise TritonServerError(f"nvidia-pytriton has no backend stub for Python {dist.python_version}: {source}")
    if target.is_file() and target.read_bytes() == source.read_bytes():
        return
    # Copy then rename, so a server started concurrently never sees a half-written stub.
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    shutil.copy2(source, partial)
    os.replace(partial, target)


def _everything_ready(client: InferenceServerClient, *, timeout_s: float) -> bool:
    if not client.is_server_ready(client_timeout=timeout_s):
        return False
    index = client.get_model_repository_index(as_json=True, client_timeout=timeout_s).get("models", [])
    return bool(index) and all(model.get("state") == "READY" for model in index)


class TritonServer(Launched):
    """One ``tritonserver`` process serving ``model_repository`` on 127.0.0.1, CPU only.

    All models in the repository load at start (model control mode NONE) and configurations are used as
    written (no auto-complete). A model that fails to load makes the server exit, which `wait_ready` reports
    with the log tail. Output goes to ``log_dir/tritonserver.log``.
    """

    #: How long the ``with`` form waits for the server and its models.
    ready_timeout_s: float = 120.0

    def __init__(
        self,
        *,
        model_repository: Path,
        grpc_port: int,
        http_port: int,
        metrics_port: int,
        log_dir: Path,
        python_prefix: Path = Path(sys.prefix),
        preload: str | None = None,
    ) -> None:
        """``preload``: a library for LD_PRELOAD (an allocator); by default the system's jemalloc, if any; "": none."""
        self._model_repository = model_repository.resolve()
        self._grpc_port = grpc_port
        self._http_port = http_port
        self._metrics_port = metrics_port
        self._log_dir = log_dir.resolve()
        # Not resolved: a venv's bin/python3 is a symlink, and resolving it would lose the venv.
        self._python_prefix = python_prefix.absolute()
        if preload is None:
            preload = jemalloc_library() or ""
            if not preload:
                _log.warning("jemalloc not found (make malloc installs it): tritonserver runs on glibc's allocator")
        self._preload = preload
        if self._log_dir.is_relative_to(self._model_repository):
            # Triton would take the folder for a model without a config and refuse to start.
            raise ValueError(f"log_dir {log_dir} must not be inside the model repository {model_repository}")
        self._process: subprocess.Popen[bytes] | None = None
        self._shm_prefix = ""
        self._log_offset = 0

    @property
    def grpc_url(self) -> str:
        """``host:port`` for ``tritonclient.grpc`` clients."""
        return f"127.0.0.1:{self._grpc_port}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self._http_port}"

    @property
    def metrics_url(self) -> str:
        """The Prometheus metrics endpoint (``nv_inference_count``, ``nv_inference_exec_count``, ...)."""
        return f"http://127.0.0.1:{self._metrics_port}/metrics"

    @property
    def pid(self) -> int | None:
        """Process id of the running server; None before `start` and after `stop` or `kill`."""
        return self._process.pid if self._process is not None else None

    @property
    def log_path(self) -> Path:
        return self._log_dir / "tritonserver.log"

    def start(self) -> None:
        """Prepare the wheel's server for this environment and launch it without waiting for readiness.

        Raises:
            TritonServerError: already running, or the environment lacks nvidia-pytriton or a matching stub.
        """
        if self._process is not None:
            if self._process.poll() is None:
                raise TritonServerError(f"Triton already running as pid {self._process.pid}")
            self._finish(self._process)  # it died on its own: remove what it left in /dev/shm
        dist = _probe_distribution(self._python_prefix)
        _install_stub(dist)
        self._log_dir.mkdir(parents=True, exist_ok=True)
        self._shm_prefix = f"{_SHM_PREFIX_BASE}{secrets.token_hex(4)}_"
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([str(self._python_prefix / "bin"), env.get("PATH", "")])
        # The wheel's own libraries come second: the binaries find them by RPATH, but a stub run from another
        # directory would not.
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (str(dist.python_libdir), str(dist.libs_dir), env.get("LD_LIBRARY_PATH", "")) if p
        )
        if self._preload:
            env["LD_PRELOAD"] = " ".join(p for p in (self._preload, env.get("LD_PRELOAD", "")) if p)
        command = [
            str(dist.binary),
            f"--model-repository={self._model_repository}",
            f"--backend-directory={dist.backends_dir}",
            "--model-control-mode=none",
            "--disable-auto-complete-config",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={self._grpc_port}",
            "--http-address=127.0.0.1",
            f"--http-port={self._http_port}",
            "--metrics-address=127.0.0.1",
            f"--metrics-port={self._metrics_port}",
            # No GPU is assumed: without this the server logs NVML and DCGM failures at every start.
            "--allow-gpu-metrics=false",
            "--exit-timeout-secs=5",
            f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}",
        ]
        with self.log_path.open("ab") as log:
            self._log_offset = log.tell()
            self._process = subprocess.Popen(
                command,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Its own session (and process group, which the backend stubs join) keeps a Ctrl+C meant for
                # the caller from reaching the server, and lets `kill` take the stubs down with it.
                start_new_session=True,
            )

    def wait_ready(self, timeout_s: float) -> None:
        """Block until the server reports ready and every model in its repository is ready.

        Raises:
            TritonServerError: not started, the server exited, or ``timeout_s`` passed (the message ends with
                this run's error lines and last lines from the log).
        """
        process = self._process
        if process is None:
            raise TritonServerError("wait_ready() called before start()")
        deadline = time.monotonic() + timeout_s
        client = InferenceServerClient(self.grpc_url)
        try:
            while True:
                returncode = process.poll()
                if returncode is not None:
                    raise TritonServerError(
                        f"tritonserver exited with {returncode} during start-up\n{self._log_excerpt()}"
                    )
                remaining_s = deadline - time.monotonic()
                if remaining_s <= 0:
                    raise TritonServerError(f"tritonserver not ready after {timeout_s:.0f} s\n{self._log_excerpt()}")
                try:
                    if _everything_ready(client, timeout_s=min(1.0, remaining_s)):
                        return
                except InferenceServerException:
                    pass  # Not listening yet, or still loading; the exit and the deadline are checked above.
                time.sleep(_POLL_INTERVAL_S)
        finally:
            client.close()

    def stop(self, timeout_s: float = 20.0) -> None:
        """Shut the server down (SIGTERM, letting in-flight requests finish), SIGKILL it after ``timeout_s``.

        Waits for the exit. Idempotent, and a no-op on a server never started.
        """
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self._kill_group(process)
        self._finish(process)

    def kill(self) -> None:
        """SIGKILL the server and its backend stubs, as a crash would, and reap it."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            self._kill_group(process)
        process.wait()
        # SIGKILL reaches the stubs asynchronously: on a busy machine one can still be running just after the
        # server is reaped, holding its shared memory.
        _wait_group_gone(process.pid, timeout_s=10.0)
        self._finish(process)

    @staticmethod
    def _kill_group(process: subprocess.Popen[bytes]) -> None:
        # The group id is the server's pid, which stays ours while the server is unreaped, so this cannot
        # reach a stranger. Stubs left running would hold their shared memory until they noticed the death.
        os.killpg(process.pid, signal.SIGKILL)

    def _finish(self, process: subprocess.Popen[bytes]) -> None:
        process.wait()
        self._process = None
        # After a clean exit the server has removed its regions and this finds none; after a kill it has not.
        for region in _SHM_DIR.glob(f"{self._shm_prefix}*"):
            region.unlink(missing_ok=True)

    def _log_excerpt(self) -> str:
        """This run's error lines, then its last lines, without the tables Triton prints at start and exit."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(self._log_offset)
                text = log.read().decode(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        lines = [line[:_EXCERPT_LINE_CHARS] for line in text.splitlines() if line and line[0] not in "+|"]
        # glog marks errors with a leading E; a model's load failure is among them, far above the tail.
        errors = [line for line in lines if line.startswith("E")]
        return "\n".join(
            [
                f"errors in {self.log_path}:",
                *errors[-_EXCERPT_LINES:],
                "last lines:",
                *lines[-_EXCERPT_LINES:],
            ]
        )


def live_group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes in process group ``pgid``."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited while we looked
        state, process_group = fields[0], int(fields[2])
        if process_group == pgid and state != "Z":
            members.append(int(entry.name))
    return members


def _wait_group_gone(pgid: int, timeout_s: float) -> None:
    """Wait until process group ``pgid`` has no live member, or ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while live_group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.02)
