"""Fixtures of the tests that drive the running mesh through its public contracts."""

from collections.abc import AsyncIterator

import pytest

from aimesh.devstack.stack import Stack

from .mesh_client import MeshClient


@pytest.fixture
async def client(mesh: Stack) -> AsyncIterator[MeshClient]:
    c = MeshClient(mesh.ingest_address, mesh.notifier_address)
    yield c
    await c.close()
