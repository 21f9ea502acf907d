"""The local stack's Triton servers (``AIMESH_STACK_TRITON_SERVERS``), without starting any: their ports, log folders
and the list the workers get."""

from __future__ import annotations

from pathlib import Path

from aimesh.devstack.stack import Stack, StackSettings


def test_one_server_by_default_and_the_workers_get_its_address_alone(tmp_path: Path) -> None:
    stack = Stack(StackSettings(run_dir=tmp_path))
    assert stack.triton_urls == [stack.triton_url] == ["127.0.0.1:8001"]
    assert stack.service_env()["AIMESH_TRITON_URL"] == "127.0.0.1:8001"


def test_more_servers_get_ports_of_their_own_and_the_workers_get_them_all(tmp_path: Path) -> None:
    settings = StackSettings.on_free_ports(tmp_path, triton_servers=3)
    stack = Stack(settings)
    assert stack.triton_urls[0] == stack.triton_url
    assert stack.service_env()["AIMESH_TRITON_URL"] == ",".join(stack.triton_urls)
    servers = [stack._triton_server(i) for i in range(3)]
    assert [s.grpc_url for s in servers] == stack.triton_urls
    ports = [int(u.rpartition(":")[2]) for s in servers for u in (s.grpc_url, s.http_url, s.metrics_url.split("/")[2])]
    taken = {p for p in settings.model_dump().values() if isinstance(p, int)}
    assert len(set(ports)) == 9 and not (set(ports[3:]) & taken)
    assert (
        len({s.log_path for s in servers}) == 3 and servers[0].log_path == stack.log_dir.resolve() / "tritonserver.log"
    )
