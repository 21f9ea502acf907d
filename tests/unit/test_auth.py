"""API keys and tenants: the keys configuration, the key-minting command, and the interceptor in front of an
in-process ingest on port 0 (the producer replaced at its seam)."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from test_ingest_service import RecordingProducer, req, start_ingest

from aimesh import auth
from aimesh.auth import AuthConfigError, Authenticator, Unauthenticated, hash_key
from aimesh.events import decode_task
from aimesh.settings import IngestSettings
from aimesh.v1 import ingest_pb2_grpc

ACME_KEY = auth.new_key()
GLOBEX_KEY = auth.new_key()
KEYS = Authenticator.from_entries([("acme", hash_key(ACME_KEY)), ("globex", hash_key(GLOBEX_KEY))])


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


@pytest.fixture
async def ingest() -> AsyncIterator[tuple[grpc.aio.Channel, RecordingProducer]]:
    server, producer = await start_ingest(auth=KEYS)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield channel, producer
    await server.stop(0)


# --- keys configuration -------------------------------------------------------------------------------------


def test_key_entries_come_from_the_file_and_the_environment(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text(f"# acme's keys\nacme:{hash_key('a1')}\n\nacme:{hash_key('a2')}  # rotated in\n")
    settings = IngestSettings(auth="on", api_keys_file=str(keys_file), api_keys=f"globex:{hash_key('g1')}")
    authenticator = Authenticator.from_settings(settings)
    assert [authenticator.tenant_of(bearer(k)) for k in ("a1", "a2", "g1")] == ["acme", "acme", "globex"]
    assert authenticator.tenant_of((("Authorization", "bearer  a1 "),)) == "acme"  # scheme in any case


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ((), "required"),
        ((("authorization", "Basic a1"),), "required"),
        ((("authorization", "Bearer "),), "required"),
        ((("authorization", "Bearer a1"), ("authorization", "Bearer a1")), "required"),
        ((("authorization", "Bearer not-a-key"),), "not valid"),
    ],
)
def test_a_missing_or_unknown_key_is_unauthenticated(metadata: tuple[tuple[str, str], ...], message: str) -> None:
    authenticator = Authenticator.from_entries([("acme", hash_key("a1"))])
    with pytest.raises(Unauthenticated, match=message):
        authenticator.tenant_of(metadata)


def test_bad_keys_configuration_stops_the_service_at_start(tmp_path: Path) -> None:
    with pytest.raises(AuthConfigError, match="no API keys"):
        Authenticator.from_settings(IngestSettings(auth="on", api_keys="", api_keys_file=""))
    with pytest.raises(AuthConfigError, match="sha256hex"):
        Authenticator.from_settings(IngestSettings(auth="on", api_keys="acme:not-a-hash"))
    with pytest.raises(AuthConfigError, match="acme and globex"):
        Authenticator.from_entries([("acme", hash_key("k")), ("globex", hash_key("k"))])
    with pytest.raises(AuthConfigError, match="cannot read"):
        Authenticator.from_settings(IngestSettings(auth="on", api_keys_file=str(tmp_path / "missing")))
    off = Authenticator.from_settings(IngestSettings(auth="off", default_tenant="dev"))
    assert off.tenant_of(()) == "dev"


def test_new_key_prints_the_key_once_and_its_hash_line(monkeypatch: pytest.MonkeyPatch) -> None:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        assert auth.main(["new-key", "acme"]) == 0
    key = err.getvalue().rsplit(" ", 1)[-1].strip()
    line = out.getvalue().strip()
    assert key.startswith("aimesh_") and len(key) > 40
    assert Authenticator.from_entries(auth.parse_entries(line, source="stdout")).tenant_of(bearer(key)) == "acme"
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{key}\n"))
    hashed = io.StringIO()
    with redirect_stdout(hashed):
        assert auth.main(["hash-key", "acme"]) == 0
    assert hashed.getvalue().strip() == line


# --- the interceptor in front of a service ------------------------------------------------------------------


async def test_a_call_without_a_key_or_with_a_wrong_one_is_unauthenticated(ingest) -> None:
    channel, producer = ingest
    stub = ingest_pb2_grpc.IngestServiceStub(channel)
    for metadata in ((), bearer("aimesh_wrong"), (("authorization", ACME_KEY),)):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.SubmitTask(req(), metadata=metadata)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "key" in (info.value.details() or "")
    assert producer.records == []


async def test_a_task_records_the_tenant_of_its_key(ingest) -> None:
    channel, producer = ingest
    stub = ingest_pb2_grpc.IngestServiceStub(channel)
    await stub.SubmitTask(req(), metadata=bearer(ACME_KEY))
    await stub.SubmitTask(req(), metadata=bearer(GLOBEX_KEY))
    assert [decode_task(value).tenant for _, _, value, _ in producer.records] == ["acme", "globex"]


async def test_idempotency_keys_are_scoped_per_tenant(ingest) -> None:
    channel, producer = ingest
    stub = ingest_pb2_grpc.IngestServiceStub(channel)
    acme = await stub.SubmitTask(req(idempotency_key="order-1"), metadata=bearer(ACME_KEY))
    globex = await stub.SubmitTask(req(idempotency_key="order-1"), metadata=bearer(GLOBEX_KEY))
    again = await stub.SubmitTask(req(idempotency_key="order-1"), metadata=bearer(ACME_KEY))
    assert not globex.duplicate and globex.task_id != acme.task_id
    assert again.duplicate and again.task_id == acme.task_id
    assert len(producer.records) == 2


async def test_health_and_reflection_need_no_key(ingest) -> None:
    channel, _ = ingest
    health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    listed = [s.name async for reply in replies for s in reply.list_services_response.service]
    assert "aimesh.v1.IngestService" in listed


async def test_with_auth_off_every_task_is_the_default_tenants() -> None:
    server, producer = await start_ingest(auth=Authenticator.disabled("dev"))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = ingest_pb2_grpc.IngestServiceStub(channel)
            await asyncio.gather(stub.SubmitTask(req()), stub.SubmitTask(req(), metadata=bearer("anything")))
    finally:
        await server.stop(0)
    assert [decode_task(value).tenant for _, _, value, _ in producer.records] == ["dev", "dev"]
