"""The local stack's HTTP gateway, without starting Kafka or Triton: its port, how it is started and waited for, its
place in the state file and the stop order, and what ``make up`` and ``make demo`` print."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from aimesh.devstack import __main__ as stack_cli
from aimesh.devstack import stack as stack_module
from aimesh.devstack.stack import Stack, StackSettings, StackState, read_state, stop_from_state, write_state


class RecordedProcess:
    """Stands in for ManagedProcess: records what would run, runs nothing."""

    started: list[RecordedProcess] = []

    def __init__(self, name: str, argv: Sequence[str], *, env: Mapping[str, str], log_path: Path) -> None:
        self.name, self.argv, self.env, self.log_path = name, list(argv), dict(env), log_path
        self.pid = 4242

    def start(self) -> None:
        RecordedProcess.started.append(self)

    def alive(self) -> bool:
        return True


class ExitedProcess:
    def alive(self) -> bool:
        return False

    def returncode(self) -> int:
        return 3

    def log_tail(self) -> str:
        return "ModuleNotFoundError: No module named 'aimesh.gateway'"


class Health(http.server.BaseHTTPRequestHandler):
    """/healthz answering 503 to the first ``unhealthy`` requests, then 200."""

    unhealthy = 2
    requests = 0

    def do_GET(self) -> None:  # noqa: N802 - the http.server hook's name
        type(self).requests += 1
        self.send_response(503 if self.requests <= self.unhealthy else 200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[str]:
    Health.requests = 0
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/healthz"
    server.shutdown()
    server.server_close()


def test_the_gateway_serves_on_loopback_port_8080_by_default(tmp_path: Path) -> None:
    stack = Stack(StackSettings(run_dir=tmp_path))

    assert (stack.settings.gateway_port, stack.settings.gateway_metrics_port) == (8080, 9104)
    assert stack.gateway_url == "http://127.0.0.1:8080"
    assert stack.state().gateway_url == "http://127.0.0.1:8080"


@pytest.mark.parametrize("field", ["gateway_port", "gateway_metrics_port"])
def test_a_stack_on_free_ports_gives_the_gateway_ports_of_its_own(field: str, tmp_path: Path) -> None:
    settings = StackSettings.on_free_ports(tmp_path, workers=3)
    port = getattr(settings, field)
    others = [p for name, p in settings.model_dump().items() if name.endswith("_port") and name != field]
    workers = range(settings.worker_metrics_port, settings.worker_metrics_port + 3)

    assert port not in (StackSettings.model_fields[field].default, 0)
    assert port not in others and port not in workers


def test_a_gateway_port_that_another_part_uses_is_refused() -> None:
    with pytest.raises(ValueError, match=r"used twice: \[50051\]"):
        StackSettings(gateway_port=50051)


def test_gateway_port_zero_runs_no_gateway(tmp_path: Path) -> None:
    stack = Stack(StackSettings(run_dir=tmp_path, gateway_port=0))

    assert stack.state().gateway_url == ""
    with pytest.raises(RuntimeError, match="no gateway"):
        stack.gateway_url  # noqa: B018 - the property's refusal is the point


def test_the_gateway_binds_its_port_and_calls_the_stacks_ingest_and_notifier(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stack_module, "ManagedProcess", RecordedProcess)
    RecordedProcess.started = []
    settings = StackSettings.on_free_ports(tmp_path)
    stack = Stack(settings)

    stack.start_gateway()

    [gateway] = RecordedProcess.started
    assert gateway.name == "gateway" and gateway.argv[1:] == ["-m", "aimesh.gateway"]
    assert gateway.env["AIMESH_GATEWAY_ADDRESS"] == f"127.0.0.1:{settings.gateway_port}"
    assert gateway.env["AIMESH_INGEST_ADDRESS"] == stack.ingest_address
    assert gateway.env["AIMESH_NOTIFIER_ADDRESS"] == stack.notifier_address
    assert gateway.env["AIMESH_METRICS_PORT"] == str(settings.gateway_metrics_port)
    assert stack.metrics_url("gateway") == f"http://127.0.0.1:{settings.gateway_metrics_port}/metrics"
    assert gateway.log_path == stack.log_dir / "gateway.log"
    assert stack.services["gateway"] is gateway


def test_waiting_for_the_gateway_ends_when_its_health_answers_200(tmp_path: Path, health_server: str) -> None:
    stack = Stack(StackSettings(run_dir=tmp_path, ready_timeout_s=10))

    stack.wait_http_healthy(health_server, "gateway")

    assert Health.requests == Health.unhealthy + 1


def test_waiting_for_a_gateway_that_exited_reports_its_log(tmp_path: Path, health_server: str) -> None:
    stack = Stack(StackSettings(run_dir=tmp_path, ready_timeout_s=10))
    stack.services["gateway"] = ExitedProcess()  # type: ignore[assignment]

    with pytest.raises(RuntimeError, match=r"gateway exited with 3:\n.*No module named 'aimesh.gateway'"):
        stack.wait_http_healthy(health_server, "gateway")


def test_make_down_stops_the_gateway_before_the_services_it_calls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stopped: list[int] = []

    def stop_pid(pid: int, timeout_s: float = 30.0) -> bool:
        stopped.append(pid)
        return True

    monkeypatch.setattr(stack_module, "stop_pid", stop_pid)
    write_state(tmp_path, StackState(pids={"notifier": 3, "ingest": 1, "gateway": 2}, gateway_url="http://x"))
    assert read_state(tmp_path) == StackState(pids={"notifier": 3, "ingest": 1, "gateway": 2}, gateway_url="http://x")

    assert stop_from_state(tmp_path, say=lambda _: None)
    assert stopped == [2, 1, 3]


class FakeStack:
    """Stands in for Stack in the command line: starts nothing."""

    def __init__(self, settings: StackSettings) -> None:
        self.settings = settings
        self.ingest_address, self.notifier_address = "127.0.0.1:50051", "127.0.0.1:50052"
        self.gateway_url = "http://127.0.0.1:8080"

    def start(self, **_: object) -> None:
        pass

    def stop(self) -> None:
        pass

    def state(self) -> StackState:
        return StackState(gateway_url=self.gateway_url)


@pytest.mark.parametrize("command", ["up", "demo"])
def test_make_up_and_make_demo_print_the_gateways_url(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("AIMESH_STACK_RUN_DIR", str(tmp_path))
    monkeypatch.setattr(stack_cli, "Stack", FakeStack)

    async def no_demo(ingest: str, notifier: str) -> int:
        return 0

    monkeypatch.setattr(stack_cli, "run_demo", no_demo)

    assert stack_cli.main([command]) == 0
    assert "http://127.0.0.1:8080" in capsys.readouterr().out
