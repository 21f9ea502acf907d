"""The Helm chart's gRPC health probe over TLS (deploy/helm/aimesh/files/health_probe.py), run as the kubelet runs it
(a process in the container) against an in-process TLS server with certificates the tests make."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from certificates import Authority

from aimesh.grpc_edge import GrpcServer, ServerTls

PROBE = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "aimesh" / "files" / "health_probe.py"


@pytest.fixture(scope="module")
def authority() -> Authority:
    return Authority()


@pytest.fixture
def ca_file(tmp_path: Path, authority: Authority) -> Path:
    path = tmp_path / "ca.crt"
    path.write_bytes(authority.cert_pem)
    return path


async def serve(tls: ServerTls) -> GrpcServer:
    server = GrpcServer("127.0.0.1:0", ["aimesh.v1.NotifierService"], tls=tls)
    await server.start()
    return server


@pytest.fixture
async def tls_server(tmp_path: Path, authority: Authority) -> AsyncIterator[GrpcServer]:
    server = await serve(ServerTls(*authority.server().write(tmp_path, "server")))
    yield server
    await server.stop(0)


@pytest.fixture
async def mtls_server(tmp_path: Path, authority: Authority, ca_file: Path) -> AsyncIterator[GrpcServer]:
    server = await serve(ServerTls(*authority.server().write(tmp_path, "server"), client_ca_file=ca_file))
    yield server
    await server.stop(0)


async def probe(server: GrpcServer, *args: str) -> tuple[int, str]:
    """Exit status and output of the probe; a separate process, so this event loop keeps serving meanwhile."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(PROBE),
        f"127.0.0.1:{server.port}",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode is not None
    return process.returncode, output.decode()


async def test_a_serving_tls_server_passes(tls_server: GrpcServer, ca_file: Path) -> None:
    status, output = await probe(tls_server, f"--ca-file={ca_file}", "--server-name=localhost")
    assert status == 0, output
    assert "SERVING" in output


async def test_a_server_not_serving_fails(tls_server: GrpcServer, ca_file: Path) -> None:
    await tls_server.set_serving(False)
    status, output = await probe(tls_server, f"--ca-file={ca_file}", "--server-name=localhost")
    assert status == 1
    assert "NOT_SERVING" in output


async def test_a_name_the_certificate_does_not_hold_fails(tls_server: GrpcServer, ca_file: Path) -> None:
    status, output = await probe(tls_server, f"--ca-file={ca_file}", "--server-name=ingest.example.com")
    assert status == 1
    assert "UNAVAILABLE" in output


async def test_mutual_tls_passes_with_a_client_certificate_and_fails_without(
    mtls_server: GrpcServer, ca_file: Path, authority: Authority, tmp_path: Path
) -> None:
    cert, key = authority.client().write(tmp_path, "client")
    common = [f"--ca-file={ca_file}", "--server-name=localhost"]
    status, output = await probe(mtls_server, *common, f"--cert-file={cert}", f"--key-file={key}")
    assert status == 0, output
    status, output = await probe(mtls_server, *common)
    assert status == 1
    assert "UNAVAILABLE" in output
