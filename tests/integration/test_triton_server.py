"""The development tritonserver launcher: start-up failures are reported, kill leaves nothing behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from aimesh.devstack.ports import free_ports
from aimesh.devstack.triton import TritonServer, TritonServerError, live_group_members

pytestmark = pytest.mark.integration

ECHO_CONFIG = """
backend: "python"
max_batch_size: 8
input [ { name: "TEXT", data_type: TYPE_STRING, dims: [ 1 ] } ]
output [ { name: "OUT", data_type: TYPE_STRING, dims: [ 1 ] } ]
instance_group [ { count: 1, kind: KIND_CPU } ]
"""
ECHO_MODEL = """
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def execute(self, requests):
        texts = [pb_utils.get_input_tensor_by_name(r, "TEXT").as_numpy() for r in requests]
        return [pb_utils.InferenceResponse([pb_utils.Tensor("OUT", t)]) for t in texts]
"""


def _repository(root: Path, model_py: str) -> Path:
    version = root / "models" / "echo" / "1"
    version.mkdir(parents=True)
    (version.parent / "config.pbtxt").write_text(ECHO_CONFIG)
    (version / "model.py").write_text(model_py)
    return root / "models"


def _server(tmp_path: Path, repository: Path) -> TritonServer:
    grpc_port, http_port, metrics_port = free_ports(3)
    return TritonServer(
        model_repository=repository,
        grpc_port=grpc_port,
        http_port=http_port,
        metrics_port=metrics_port,
        log_dir=tmp_path / "logs",
    )


def test_kill_takes_the_stubs_and_their_shared_memory(tmp_path: Path) -> None:
    server = _server(tmp_path, _repository(tmp_path, ECHO_MODEL))
    with server:
        pid = server.pid
        assert pid is not None
        stubs = [member for member in live_group_members(pid) if member != pid]
        assert len(stubs) == 1  # the echo model's one instance
        # The stub's second argument names the shared-memory region it shares with the server.
        region = Path("/dev/shm") / (Path(f"/proc/{stubs[0]}/cmdline").read_bytes().split(b"\0")[2].decode())
        assert region.exists()

        server.kill()

        assert server.pid is None
        assert live_group_members(pid) == []
        assert not region.exists()

        # The same ports serve again after a crash.
        server.start()
        server.wait_ready(60)
        assert server.pid not in (None, pid)
    assert server.pid is None
    server.stop()  # idempotent


def test_model_that_fails_to_load_is_reported(tmp_path: Path) -> None:
    server = _server(tmp_path, _repository(tmp_path, "raise RuntimeError('no weights for this model')\n"))
    with pytest.raises(TritonServerError, match="no weights for this model") as raised:
        with server:
            pytest.fail("a model that cannot load must not make the server ready")
    assert "exited with" in str(raised.value)
    assert server.pid is None


def test_log_dir_inside_the_repository_is_refused(tmp_path: Path) -> None:
    repository = _repository(tmp_path, ECHO_MODEL)
    with pytest.raises(ValueError, match="inside the model repository"):
        TritonServer(
            model_repository=repository,
            grpc_port=1,
            http_port=2,
            metrics_port=3,
            log_dir=repository / "logs",
        )


def test_wait_ready_before_start_is_an_error(tmp_path: Path) -> None:
    server = _server(tmp_path, _repository(tmp_path, ECHO_MODEL))
    with pytest.raises(TritonServerError, match="before start"):
        server.wait_ready(1)


def _maps_jemalloc(pid: int) -> bool:
    return "libjemalloc" in Path(f"/proc/{pid}/maps").read_text()


def test_server_and_stubs_run_on_jemalloc(tmp_path: Path) -> None:
    # `make tools` installs it; the soak's memory bounds were measured with it (docs/soak.md).
    server = _server(tmp_path, _repository(tmp_path, ECHO_MODEL))
    with server:
        pid = server.pid
        assert pid is not None
        members = live_group_members(pid)
        assert len(members) == 2  # the server and the echo model's stub
        assert all(_maps_jemalloc(member) for member in members), "tritonserver or its stub runs on glibc malloc"


def test_preload_can_be_turned_off(tmp_path: Path) -> None:
    grpc_port, http_port, metrics_port = free_ports(3)
    repository = _repository(tmp_path, ECHO_MODEL)
    server = TritonServer(
        model_repository=repository,
        grpc_port=grpc_port,
        http_port=http_port,
        metrics_port=metrics_port,
        log_dir=tmp_path / "logs",
        preload="",
    )
    with server:
        assert server.pid is not None and not _maps_jemalloc(server.pid)
