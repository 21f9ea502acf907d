"""Tenants and transport security on the real mesh: an ingest (TLS) and a notifier (mutual TLS) with API keys,
started beside the session mesh on its Kafka, Triton and workers, driven through the client library.

Another tenant's task is answered on every notifier method exactly as a task that does not exist; a missing or
unknown key is UNAUTHENTICATED on every method; plaintext and (for the notifier) certificate-less connections
are refused.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from unit.certificates import Authority

from aimesh.auth import hash_key, new_key
from aimesh.client import AsyncClient, ClientError
from aimesh.client.tls import ClientTls
from aimesh.devstack.ports import free_ports
from aimesh.devstack.stack import Stack
from aimesh.v1 import notifier_pb2, result_pb2

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@dataclass(frozen=True)
class SecureMesh:
    ingest: str
    notifier: str
    keys: dict[str, str]  # tenant -> API key
    server_ca: Path
    client_tls: ClientTls  # the CA and a client certificate

    def client(self, tenant: str | None, *, tls: ClientTls | None = None, key: str | None = None) -> AsyncClient:
        api_key = key if key is not None else self.keys[tenant] if tenant else None
        return AsyncClient(self.ingest, self.notifier, api_key=api_key, tls=tls or self.client_tls, timeout_s=20)


@pytest.fixture(scope="module")
def secure(mesh: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureMesh]:
    folder = tmp_path_factory.mktemp("secure")
    authority = Authority()
    ca = folder / "ca.crt"
    ca.write_bytes(authority.cert_pem)
    server_cert, server_key = authority.server().write(folder, "server")
    client_cert, client_key = authority.client().write(folder, "client")
    keys = {"acme": new_key(), "globex": new_key()}
    keys_file = folder / "keys.txt"
    keys_file.write_text("".join(f"{tenant}:{hash_key(key)}\n" for tenant, key in keys.items()))
    ingest_port, notifier_port = free_ports(2)
    common = {
        "AIMESH_AUTH": "on",
        "AIMESH_API_KEYS_FILE": str(keys_file),
        "AIMESH_TLS_CERT_FILE": str(server_cert),
        "AIMESH_TLS_KEY_FILE": str(server_key),
    }
    ingest = f"127.0.0.1:{ingest_port}"
    notifier = f"127.0.0.1:{notifier_port}"
    mesh.start_service("ingest-secure", "aimesh.ingest", {**common, "AIMESH_INGEST_ADDRESS": ingest})
    mesh.start_service(
        "notifier-secure",
        "aimesh.notifier",
        {**common, "AIMESH_NOTIFIER_ADDRESS": notifier, "AIMESH_TLS_CLIENT_CA_FILE": str(ca)},
    )
    client_tls = ClientTls(ca_file=ca, cert_file=client_cert, key_file=client_key)
    try:
        mesh.wait_grpc_healthy(ingest, "ingest-secure", credentials=client_tls.credentials())
        mesh.wait_grpc_healthy(notifier, "notifier-secure", credentials=client_tls.credentials())
        yield SecureMesh(ingest, notifier, keys, ca, client_tls)
    finally:
        for name in ("ingest-secure", "notifier-secure"):
            mesh.services.pop(name).stop()


async def _code_of(call: object) -> grpc.StatusCode | None:
    try:
        await call  # type: ignore[misc]
    except ClientError as e:
        return e.code
    return None


async def _watch_code(
    client: AsyncClient, task_id: str, *, many: bool = False, timeout_s: float | None = None
) -> grpc.StatusCode | None:
    try:
        if many:
            async for _ in client.watch_many([task_id], timeout_s=timeout_s):
                pass
        else:
            async for _ in client.watch(task_id, timeout_s=timeout_s):
                pass
    except ClientError as e:
        return e.code
    return None


async def test_another_tenants_task_is_not_found_on_every_method_exactly_as_an_unknown_one(
    secure: SecureMesh,
) -> None:
    async with secure.client("acme") as acme, secure.client("globex") as globex:
        task_id = await acme.submit("sentiment", "a secret of acme's")
        done = await acme.result(task_id, timeout_s=60)
        assert done.status == result_pb2.TASK_STATUS_SUCCEEDED
        unknown = str(uuid.uuid4())
        for target in (task_id, unknown):
            errors: dict[str, tuple[grpc.StatusCode | None, str]] = {}
            for method, call in (
                ("GetTask", globex.get(target)),
                ("CancelTask", globex.cancel(target)),
            ):
                try:
                    await call
                    errors[method] = (None, "")
                except ClientError as e:
                    errors[method] = (e.code, e.message.replace(target, "<id>"))
            assert errors["GetTask"][0] == grpc.StatusCode.NOT_FOUND, (target, errors)
            assert errors["CancelTask"] == errors["GetTask"], (target, errors)
            # A watch waits for an unknown task (it may not be read yet), and for another tenant's alike.
            for many in (False, True):
                code = await _watch_code(globex, target, many=many, timeout_s=1.0)
                assert code == grpc.StatusCode.DEADLINE_EXCEEDED, (target, many, code)
            if target == task_id:
                denied = errors
            else:
                assert errors == denied, "another tenant's task must look exactly like one that does not exist"
        # The owner still sees it, and the other tenant's cancel changed nothing.
        state = await acme.get(task_id)
        assert state.status == result_pb2.TASK_STATUS_SUCCEEDED
        cancel = await acme.cancel(task_id)
        assert cancel.outcome == notifier_pb2.CANCEL_OUTCOME_ALREADY_ENDED


async def test_a_missing_or_unknown_key_is_unauthenticated_on_every_method(secure: SecureMesh) -> None:
    some_task = str(uuid.uuid4())
    for key in ("", "aimesh_not-a-key"):
        async with secure.client(None, key=key or None) as anonymous:
            calls = {
                "SubmitTask": _code_of(anonymous.submit("sentiment", "who am I")),
                "SubmitTasks": _code_of(anonymous.submit_many([])),
                "GetTask": _code_of(anonymous.get(some_task)),
                "CancelTask": _code_of(anonymous.cancel(some_task)),
            }
            codes = {method: await call for method, call in calls.items()}
            codes["WatchTask"] = await _watch_code(anonymous, some_task)
            codes["WatchTasks"] = await _watch_code(anonymous, some_task, many=True)
            assert set(codes.values()) == {grpc.StatusCode.UNAUTHENTICATED}, (key, codes)


def test_plaintext_and_certificate_less_connections_are_refused(secure: SecureMesh) -> None:
    for address in (secure.ingest, secure.notifier):
        with grpc.insecure_channel(address) as channel:
            with pytest.raises(grpc.RpcError) as refused:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, address
    server_only = grpc.ssl_channel_credentials(root_certificates=secure.server_ca.read_bytes())
    with grpc.secure_channel(secure.ingest, server_only) as channel:  # TLS ingest: no client certificate needed
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with grpc.secure_channel(secure.notifier, server_only) as channel:  # mutual TLS notifier: refused without one
        with pytest.raises(grpc.RpcError) as refused:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
