"""Fixtures of the tests that drive the running mesh through its public contracts."""

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from aimesh.devstack.ports import free_ports
from aimesh.devstack.stack import Stack
from aimesh.devstack.triton import TritonServer

from .mesh_client import MeshClient


@pytest.fixture
async def client(mesh: Stack) -> AsyncIterator[MeshClient]:
    c = MeshClient(mesh.ingest_address, mesh.notifier_address)
    yield c
    await c.close()


@pytest.fixture(scope="package")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """A Triton of its own serving the repository's models, for the tests that call the models directly."""
    grpc_port, http_port, metrics_port = free_ports(3)
    server = TritonServer(
        model_repository=Path(__file__).resolve().parents[2] / "models",
        grpc_port=grpc_port,
        http_port=http_port,
        metrics_port=metrics_port,
        log_dir=tmp_path_factory.mktemp("triton-logs"),
    )
    started = time.monotonic()
    with server:
        print(f"tritonserver ready in {time.monotonic() - started:.1f} s")
        yield server
