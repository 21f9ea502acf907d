"""Ingest and notifier replicas of the local stack (``AIMESH_STACK_INGEST_REPLICAS``, ``..._NOTIFIER_REPLICAS``),
without starting any process: their names, ports, environment, the round-robin target, kill and restart by index,
and what ``make up`` prints and records."""

from __future__ import annotations

from pathlib import Path

import pytest

from aimesh.devstack import __main__ as stack_cli
from aimesh.devstack.process import ManagedProcess
from aimesh.devstack.stack import NOTIFIER_GROUP, Stack, StackSettings, StackState, read_state, write_state


@pytest.fixture
def launched(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Record ManagedProcess starts, stops and kills instead of running anything."""
    calls: list[tuple[str, str]] = []
    for action in ("start", "stop", "kill"):
        monkeypatch.setattr(
            ManagedProcess, action, lambda self, *a, _action=action, **k: calls.append((_action, self.name))
        )
    return calls


def replicated(tmp_path: Path) -> Stack:
    return Stack(StackSettings.on_free_ports(tmp_path, ingest_replicas=2, notifier_replicas=3, triton_servers=2))


def test_one_replica_of_each_by_default_on_the_ports_it_always_had(tmp_path: Path) -> None:
    stack = Stack(StackSettings(run_dir=tmp_path))
    assert stack.ingest_addresses == [stack.ingest_address] == ["127.0.0.1:50051"]
    assert stack.notifier_addresses == [stack.notifier_address] == ["127.0.0.1:50052"]
    assert stack.ingest_target == "127.0.0.1:50051"
    assert (stack.metrics_port("ingest"), stack.metrics_port("notifier"), stack.metrics_port("ingest-1")) == (
        9101,
        9103,
        0,
    )


def test_the_replica_counts_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AIMESH_STACK_INGEST_REPLICAS", "2")
    monkeypatch.setenv("AIMESH_STACK_NOTIFIER_REPLICAS", "3")
    settings = StackSettings(run_dir=tmp_path)
    assert (settings.ingest_replicas, settings.notifier_replicas) == (2, 3)
    monkeypatch.setenv("AIMESH_STACK_INGEST_REPLICAS", "0")
    with pytest.raises(ValueError, match="ingest_replicas"):
        StackSettings(run_dir=tmp_path)


def test_every_replica_has_ports_of_its_own_and_the_first_keeps_the_settings_ones(tmp_path: Path) -> None:
    stack = replicated(tmp_path)
    s = stack.settings
    assert stack.ingest_addresses[0] == stack.ingest_address and len(stack.ingest_addresses) == 2
    assert stack.notifier_addresses[0] == stack.notifier_address and len(stack.notifier_addresses) == 3
    names = ["ingest", "ingest-1", "notifier", "notifier-1", "notifier-2"]
    metrics = [stack.metrics_port(name) for name in names]
    assert metrics[0] == s.ingest_metrics_port and metrics[2] == s.notifier_metrics_port
    grpc_ports = [int(a.rpartition(":")[2]) for a in (*stack.ingest_addresses, *stack.notifier_addresses)]
    triton_ports = [int(u.rpartition(":")[2]) for u in stack.triton_urls]
    settings_ports = {port for name, port in s.model_dump().items() if name.endswith("_port")}
    ours = [*grpc_ports[1:2], *grpc_ports[3:], *metrics[1:2], *metrics[3:], *triton_ports[1:]]
    assert len(set(ours)) == len(ours) and not set(ours) & settings_ports
    assert stack.ingest_target == "ipv4:" + ",".join(stack.ingest_addresses)
    assert stack.notifier_target == "ipv4:" + ",".join(stack.notifier_addresses)


def test_replicas_serve_no_metrics_when_the_first_serves_none(tmp_path: Path) -> None:
    stack = Stack(StackSettings.on_free_ports(tmp_path, ingest_replicas=2, ingest_metrics_port=0))
    assert stack.metrics_port("ingest") == stack.metrics_port("ingest-1") == 0


def test_each_replica_binds_its_own_address_logs_under_its_own_name_and_the_gateway_calls_the_first(
    tmp_path: Path, launched: list[tuple[str, str]]
) -> None:
    stack = replicated(tmp_path)
    for index in range(2):
        stack.start_replica("ingest", index)
    for index in range(3):
        stack.start_replica("notifier", index)
    assert [name for _, name in launched] == ["ingest", "ingest-1", "notifier", "notifier-1", "notifier-2"]
    for service, variable in (("ingest", "AIMESH_INGEST_ADDRESS"), ("notifier", "AIMESH_NOTIFIER_ADDRESS")):
        for index, address in enumerate(stack.replica_addresses(service)):
            process = stack.services[stack.replica_name(service, index)]
            assert process._env[variable] == address
            assert process._env["AIMESH_METRICS_PORT"] == str(stack.metrics_port(process.name))
            assert process.log_path == stack.log_dir / f"{process.name}.log"
    states = {stack.services[n]._env["AIMESH_NOTIFIER_STATE_DIR"] for n in ("notifier", "notifier-1", "notifier-2")}
    assert len(states) == 3  # one state directory each: RocksDB locks its own
    for name in ("notifier", "notifier-1", "notifier-2"):
        assert stack.services[name]._env["AIMESH_NOTIFIER_PARTITIONED"] == "true"
        assert stack.services[name]._env["AIMESH_NOTIFIER_GROUP"] == NOTIFIER_GROUP
    gateway = stack.start_gateway()
    assert gateway._env["AIMESH_INGEST_ADDRESS"] == stack.ingest_address
    assert gateway._env["AIMESH_NOTIFIER_ADDRESS"] == stack.notifier_address


def test_one_replica_is_killed_stopped_or_restarted_by_index(tmp_path: Path, launched: list[tuple[str, str]]) -> None:
    stack = replicated(tmp_path)
    for index in range(3):
        stack.start_replica("notifier", index)
    launched.clear()
    stack.kill_replica("notifier", 2)
    stack.stop_replica("notifier", 0)
    stack.restart_replica("notifier", 1, wait=False)
    assert launched == [("kill", "notifier-2"), ("stop", "notifier"), ("stop", "notifier-1"), ("start", "notifier-1")]
    assert stack.services["notifier-1"]._env["AIMESH_NOTIFIER_ADDRESS"] == stack.notifier_addresses[1]


def test_the_state_records_every_replica_and_an_older_state_file_still_reads(tmp_path: Path) -> None:
    stack = replicated(tmp_path)
    state = stack.state()
    assert state.ingest_addresses == stack.ingest_addresses and state.ingest_address == stack.ingest_address
    assert state.notifier_addresses == stack.notifier_addresses
    write_state(tmp_path, state)
    assert read_state(tmp_path) == state
    (tmp_path / "stack.json").write_text('{"ingest_address": "127.0.0.1:1", "notifier_address": "127.0.0.1:2"}')
    assert read_state(tmp_path) == StackState(ingest_address="127.0.0.1:1", notifier_address="127.0.0.1:2")


def test_make_up_prints_every_replicas_address(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("AIMESH_STACK_RUN_DIR", str(tmp_path))
    monkeypatch.setenv("AIMESH_STACK_INGEST_REPLICAS", "2")
    monkeypatch.setenv("AIMESH_STACK_NOTIFIER_REPLICAS", "2")
    monkeypatch.setenv("AIMESH_STACK_GATEWAY_PORT", "0")
    monkeypatch.setattr(Stack, "start", lambda self, say: None)
    assert stack_cli.main(["up"]) == 0
    printed = capsys.readouterr().out
    state = read_state(tmp_path)
    assert state is not None and len(state.ingest_addresses) == len(state.notifier_addresses) == 2
    for name, address in zip(
        ("ingest", "ingest-1", "notifier", "notifier-1"),
        (*state.ingest_addresses, *state.notifier_addresses),
        strict=True,
    ):
        assert f"{name} {address}" in printed
    assert f"AIMESH_INGEST_ADDRESS={','.join(state.ingest_addresses)}" in printed
