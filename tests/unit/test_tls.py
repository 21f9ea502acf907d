"""TLS and mutual TLS on the gRPC edge, with certificates the tests make: an in-process server on port 0."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from certificates import Authority
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aimesh.grpc_edge import GrpcServer, ServerTls
from aimesh.settings import NotifierSettings

CHECK = health_pb2.HealthCheckRequest()


@pytest.fixture(scope="module")
def authority() -> Authority:
    return Authority()


async def serve(tls: ServerTls) -> GrpcServer:
    server = GrpcServer("127.0.0.1:0", ["aimesh.v1.NotifierService"], tls=tls)
    await server.start()
    return server


@pytest.fixture
async def tls_server(tmp_path: Path, authority: Authority) -> AsyncIterator[GrpcServer]:
    cert, key = authority.server().write(tmp_path, "server")
    server = await serve(ServerTls(cert, key))
    yield server
    await server.stop(0)


@pytest.fixture
async def mtls_server(tmp_path: Path, authority: Authority) -> AsyncIterator[GrpcServer]:
    cert, key = authority.server().write(tmp_path, "server")
    ca = tmp_path / "clients-ca.crt"
    ca.write_bytes(authority.cert_pem)
    server = await serve(ServerTls(cert, key, client_ca_file=ca))
    yield server
    await server.stop(0)


async def check(channel: grpc.aio.Channel) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(CHECK, timeout=5)
    return reply.status


async def test_tls_is_accepted_and_plaintext_refused(tls_server: GrpcServer, authority: Authority) -> None:
    target = f"127.0.0.1:{tls_server.port}"
    credentials = grpc.ssl_channel_credentials(root_certificates=authority.cert_pem)
    async with grpc.aio.secure_channel(target, credentials) as channel:
        assert await check(channel) == health_pb2.HealthCheckResponse.SERVING
    async with grpc.aio.insecure_channel(target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await check(channel)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_server_certificate_from_another_ca_is_refused_by_the_client(tls_server: GrpcServer) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=Authority("someone else").cert_pem)
    async with grpc.aio.secure_channel(f"127.0.0.1:{tls_server.port}", credentials) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await check(channel)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_needs_a_client_certificate_the_ca_signed(
    mtls_server: GrpcServer, authority: Authority
) -> None:
    target = f"127.0.0.1:{mtls_server.port}"
    client = authority.client()
    signed = grpc.ssl_channel_credentials(authority.cert_pem, private_key=client.key, certificate_chain=client.cert)
    async with grpc.aio.secure_channel(target, signed) as channel:
        assert await check(channel) == health_pb2.HealthCheckResponse.SERVING

    stranger = Authority("someone else").client()
    refused = [
        grpc.ssl_channel_credentials(authority.cert_pem),  # no client certificate
        grpc.ssl_channel_credentials(authority.cert_pem, private_key=stranger.key, certificate_chain=stranger.cert),
    ]
    for credentials in refused:
        async with grpc.aio.secure_channel(target, credentials) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await check(channel)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_tls_settings_come_in_pairs(tmp_path: Path) -> None:
    assert ServerTls.from_settings(NotifierSettings()) is None
    settings = NotifierSettings(tls_cert_file="s.crt", tls_key_file="s.key", tls_client_ca_file="ca.crt")
    assert ServerTls.from_settings(settings) == ServerTls(Path("s.crt"), Path("s.key"), Path("ca.crt"))
    for partial in ({"tls_cert_file": "s.crt"}, {"tls_key_file": "s.key"}, {"tls_client_ca_file": "ca.crt"}):
        with pytest.raises(ValueError, match="AIMESH_TLS"):
            NotifierSettings(**partial)
