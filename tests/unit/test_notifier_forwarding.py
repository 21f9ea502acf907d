"""Partitioned notifier replicas answering for each other: three notifiers' gRPC edges in process on free ports
with API keys on, each over its own store (fed directly: the Kafka feed is the seam), and a directory of which
replica owns which task that the tests move (the seam of the consumer group's assignment)."""

from __future__ import annotations

import asyncio
import ipaddress
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from certificates import Authority, Pem
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from opentelemetry.instrumentation.grpc import aio_server_interceptor
from test_notifier_cancel import FakeProducer

from aimesh.auth import Authenticator, hash_key
from aimesh.client.tls import ClientTls
from aimesh.grpc_edge import GrpcServer, ServerTls
from aimesh.notifier.forwarding import FORWARDED_HEADER, Forwarder, OwnerBackoff, peer_tls
from aimesh.notifier.ownership import partition_of
from aimesh.notifier.service import Cancellations, NotifierServicer, StreamLimits
from aimesh.notifier.store import TaskStore
from aimesh.settings import NotifierSettings
from aimesh.v1 import notifier_pb2, notifier_pb2_grpc, result_pb2, task_pb2

KEYS = Authenticator.from_entries([("acme", hash_key("acme-key")), ("globex", hash_key("globex-key"))])
ACME = (("authorization", "Bearer acme-key"),)
QUEUED, RUNNING = result_pb2.TASK_STATUS_QUEUED, result_pb2.TASK_STATUS_RUNNING
SUCCEEDED = result_pb2.TASK_STATUS_SUCCEEDED
BUDGET_S = 0.3  # how long a forwarder waits for an owner, short for the tests
PARTITIONS = 4
LIMITS = StreamLimits(max_per_connection=3, max_per_tenant=6, idle_timeout_s=10.0)


@dataclass
class Directory:
    """Which replica owns each task (None: nobody known), where each replica listens, and the tasks whose
    partition their owner is still reading."""

    owners: dict[str, str | None] = field(default_factory=dict)
    addresses: dict[str, str] = field(default_factory=dict)
    not_ready: set[str] = field(default_factory=set)


@dataclass
class View:
    """One replica's Ownership over the shared directory."""

    directory: Directory
    name: str

    def is_local(self, task_id: str) -> bool:
        return self.directory.owners.get(task_id) == self.name

    def is_ready(self, task_id: str) -> bool:
        return task_id not in self.directory.not_ready

    def owner_address(self, task_id: str) -> str | None:
        owner = self.directory.owners.get(task_id)
        return None if owner is None else self.directory.addresses.get(owner)


@dataclass
class Replica:
    name: str
    store: TaskStore
    server: GrpcServer
    producer: FakeProducer
    forwarder: Forwarder

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"


@dataclass
class Cluster:
    directory: Directory
    replicas: dict[str, Replica]
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    def stub(self, name: str) -> notifier_pb2_grpc.NotifierServiceStub:
        """A new client connection to replica ``name``."""
        # Its own subchannel pool: a connection of its own, as another client process would have.
        channel = grpc.aio.insecure_channel(
            self.replicas[name].address, options=[("grpc.use_local_subchannel_pool", 1)]
        )
        self.channels.append(channel)
        return notifier_pb2_grpc.NotifierServiceStub(channel)

    def task(self, owner: str, *others: str, tenant: str = "acme") -> str:
        """A task ``owner`` owns, submitted: its record is read by ``owner`` (and ``others``, holding the same
        history, as a replica that rebuilt the partition would)."""
        task_id = str(uuid.uuid4())
        self.directory.owners[task_id] = owner
        record = task_pb2.AITaskEvent(schema_version=1, task_id=task_id, model_name="generate", tenant=tenant)
        for name in (owner, *others):
            self.replicas[name].store.apply_task(record)
        return task_id

    def apply(self, task_id: str, sequence: int, status: int = RUNNING, *names: str) -> None:
        partial = status == RUNNING and sequence > 2
        event = result_pb2.AIResultEvent(
            schema_version=1, task_id=task_id, status=status, sequence=sequence, partial=partial, tenant="acme"
        )
        for name in names:
            self.replicas[name].store.apply_result(event)


def ready() -> asyncio.Event:
    event = asyncio.Event()
    event.set()
    return event


async def start_replica(name: str, directory: Directory) -> Replica:
    store, producer = TaskStore(retention_s=60), FakeProducer()
    forwarder = Forwarder(backoff=OwnerBackoff(initial_s=0.02, max_s=0.05, budget_s=BUDGET_S))
    servicer = NotifierServicer(
        store,
        ready=ready(),
        limits=LIMITS,
        cancels=Cancellations(producer, "cancels", publish_timeout_s=0.5),
        cancel_wait_s=0.2,
        ownership=View(directory, name),
        forwarder=forwarder,
    )
    # OpenTelemetry's interceptor in front, as with tracing on: it iterates streaming behaviours itself.
    server = GrpcServer(
        "127.0.0.1:0", ["aimesh.v1.NotifierService"], auth=KEYS, interceptors=[aio_server_interceptor()]
    )
    server.add(notifier_pb2_grpc.add_NotifierServiceServicer_to_server, servicer)
    await server.start()
    directory.addresses[name] = f"127.0.0.1:{server.port}"
    return Replica(name, store, server, producer, forwarder)


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    directory = Directory()
    replicas = {name: await start_replica(name, directory) for name in "abc"}
    cluster = Cluster(directory, replicas)
    yield cluster
    for channel in cluster.channels:
        await channel.close()
    for replica in replicas.values():
        await replica.server.stop(0)
        await replica.forwarder.close()


def answer(error: grpc.aio.AioRpcError) -> tuple[grpc.StatusCode, str | None, object]:
    """Everything a client can see of an error: code, message and the rich status details."""
    return error.code(), error.details(), rpc_status.from_call(error)


def reasons(error: grpc.aio.AioRpcError) -> tuple[str, float | None]:
    """The error's ErrorInfo reason, and its RetryInfo delay (None: none)."""
    reason, retry_s = "", None
    status = rpc_status.from_call(error)
    for detail in status.details if status is not None else ():
        info, retry = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            reason = info.reason
        elif detail.Unpack(retry):
            retry_s = retry.retry_delay.ToNanoseconds() / 1e9
    return reason, retry_s


async def get_error(stub: notifier_pb2_grpc.NotifierServiceStub, task_id: str, metadata=ACME) -> grpc.aio.AioRpcError:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.GetTask(notifier_pb2.GetTaskRequest(task_id=task_id), metadata=metadata)
    return info.value


async def watch_error(stub: notifier_pb2_grpc.NotifierServiceStub, task_id: str, metadata=ACME) -> grpc.aio.AioRpcError:  # type: ignore[no-untyped-def]
    stream = stub.WatchTask(notifier_pb2.WatchTaskRequest(task_id=task_id), metadata=metadata)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for update in stream:
            pytest.fail(f"an update came: {update}")
    return info.value


async def sequences(stream, count: int) -> list[int]:  # type: ignore[no-untyped-def]
    """The sequences of the next ``count`` updates of ``stream``."""
    return [(await stream.read()).state.sequence for _ in range(count)]


async def rest(stream) -> list[int]:  # type: ignore[no-untyped-def]
    """The sequences of the updates of ``stream`` until it ends, which must be OK."""
    seen = []
    while (update := await stream.read()) != grpc.aio.EOF:
        seen.append(update.state.sequence)
    assert await stream.code() == grpc.StatusCode.OK
    return seen


# --- GetTask and CancelTask -----------------------------------------------------------------------------------


async def test_get_and_cancel_through_a_non_owner_answer_as_the_owner(cluster: Cluster) -> None:
    task_id = cluster.task("a")
    cluster.apply(task_id, 2, RUNNING, "a")
    through_b = await cluster.stub("b").GetTask(notifier_pb2.GetTaskRequest(task_id=task_id), metadata=ACME)
    direct = await cluster.stub("a").GetTask(notifier_pb2.GetTaskRequest(task_id=task_id), metadata=ACME)
    assert through_b == direct and through_b.state.status == RUNNING

    cancelled = await cluster.stub("c").CancelTask(notifier_pb2.CancelTaskRequest(task_id=task_id), metadata=ACME)
    assert cancelled.outcome == notifier_pb2.CANCEL_OUTCOME_REQUESTED and cancelled.state.sequence == 2
    # The owner published it, as the tenant the caller's key names; the forwarding replica published nothing.
    assert [key for _, key, _, _ in cluster.replicas["a"].producer.sent] == [task_id]
    assert not cluster.replicas["c"].producer.sent
    cancel = task_pb2.AICancelEvent.FromString(cluster.replicas["a"].producer.sent[0][2])
    assert cancel.tenant == "acme"


async def test_errors_of_the_owner_are_relayed_unchanged(cluster: Cluster) -> None:
    task_id = cluster.task("a")
    cluster.apply(task_id, 3, SUCCEEDED, "a")
    ended = await cluster.stub("b").CancelTask(notifier_pb2.CancelTaskRequest(task_id=task_id), metadata=ACME)
    assert ended.outcome == notifier_pb2.CANCEL_OUTCOME_ALREADY_ENDED
    cluster.replicas["a"].producer.fail = True
    running = cluster.task("a")
    through_b = await get_cancel_error(cluster.stub("b"), running)
    direct = await get_cancel_error(cluster.stub("a"), running)
    assert answer(through_b) == answer(direct)
    assert through_b.code() == grpc.StatusCode.UNAVAILABLE and reasons(through_b)[0] == "BROKER_UNAVAILABLE"
    unauthenticated = await get_error(cluster.stub("b"), running, metadata=(("authorization", "Bearer nope"),))
    assert unauthenticated.code() == grpc.StatusCode.UNAUTHENTICATED


async def get_cancel_error(stub: notifier_pb2_grpc.NotifierServiceStub, task_id: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.CancelTask(notifier_pb2.CancelTaskRequest(task_id=task_id), metadata=ACME)
    return info.value


async def test_not_found_through_a_forwarder_is_the_same_for_an_unknown_and_another_tenants_task(
    cluster: Cluster,
) -> None:
    task_id = str(uuid.uuid4())
    cluster.directory.owners[task_id] = "a"
    unknown = await get_error(cluster.stub("b"), task_id)
    unknown_cancel = await get_cancel_error(cluster.stub("b"), task_id)
    cluster.replicas["a"].store.apply_task(task_pb2.AITaskEvent(schema_version=1, task_id=task_id, tenant="globex"))
    theirs = await get_error(cluster.stub("b"), task_id)
    theirs_cancel = await get_cancel_error(cluster.stub("b"), task_id)
    assert unknown.code() == grpc.StatusCode.NOT_FOUND
    assert answer(unknown) == answer(theirs) == answer(await get_error(cluster.stub("a"), task_id))
    assert unknown_cancel.code() == grpc.StatusCode.NOT_FOUND and answer(unknown_cancel) == answer(theirs_cancel)
    mine = cluster.task("a")
    assert (await cluster.stub("b").GetTask(notifier_pb2.GetTaskRequest(task_id=mine), metadata=ACME)).state


async def test_an_owner_unknown_or_unreachable_past_the_bound_answers_rebalancing(cluster: Cluster) -> None:
    nobody = str(uuid.uuid4())
    cluster.directory.owners[nobody] = None
    for error in (await get_error(cluster.stub("b"), nobody), await watch_error(cluster.stub("b"), nobody)):
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert reasons(error) == ("NOTIFIER_REBALANCING", 1.0)
    gone = cluster.task("c")
    await cluster.replicas["c"].server.stop(0)
    for error in (await get_error(cluster.stub("b"), gone), await watch_error(cluster.stub("b"), gone)):
        assert error.code() == grpc.StatusCode.UNAVAILABLE and reasons(error)[0] == "NOTIFIER_REBALANCING"


@dataclass
class Settling(View):
    """An ownership that knows no owner for the first ``unknown_for`` questions (a rebalance settling)."""

    unknown_for: int = 3
    asked: int = 0

    def owner_address(self, task_id: str) -> str | None:
        self.asked += 1
        return None if self.asked <= self.unknown_for else super().owner_address(task_id)


async def test_a_call_waits_for_an_owner_to_become_known(cluster: Cluster) -> None:
    settling = Settling(cluster.directory, "d")
    servicer = NotifierServicer(
        TaskStore(retention_s=60),
        ready=asyncio.Event(),
        ownership=settling,
        forwarder=Forwarder(backoff=OwnerBackoff(initial_s=0.01, max_s=0.02, budget_s=5.0)),
    )
    server = GrpcServer("127.0.0.1:0", ["aimesh.v1.NotifierService"], auth=KEYS)
    server.add(notifier_pb2_grpc.add_NotifierServiceServicer_to_server, servicer)
    await server.start()
    try:
        task_id = cluster.task("a")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = notifier_pb2_grpc.NotifierServiceStub(channel)
            reply = await stub.GetTask(notifier_pb2.GetTaskRequest(task_id=task_id), metadata=ACME)
            assert reply.state.status == QUEUED and settling.asked == 4
            settling.asked = 0
            stream = stub.WatchTask(notifier_pb2.WatchTaskRequest(task_id=task_id), metadata=ACME)
            assert await sequences(stream, 1) == [1] and settling.asked == 4
            stream.cancel()
    finally:
        await server.stop(0)


async def test_a_forwarded_call_to_a_replica_that_does_not_own_the_task_answers_unavailable(
    cluster: Cluster,
) -> None:
    task_id = cluster.task("c")
    forwarded = (*ACME, (FORWARDED_HEADER, "1"))
    stub = cluster.stub("a")
    get = await get_error(stub, task_id, metadata=forwarded)
    watch = await watch_error(stub, task_id, metadata=forwarded)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.CancelTask(notifier_pb2.CancelTaskRequest(task_id=task_id), metadata=forwarded)
    for error in (get, watch, info.value):
        assert error.code() == grpc.StatusCode.UNAVAILABLE and reasons(error)[0] == "NOTIFIER_REBALANCING"
    assert not cluster.replicas["c"].producer.sent  # never a second hop


async def test_a_task_of_a_partition_not_read_yet_answers_unavailable(cluster: Cluster) -> None:
    task_id = cluster.task("a")
    cluster.directory.not_ready.add(task_id)
    direct, through_b = await get_error(cluster.stub("a"), task_id), await get_error(cluster.stub("b"), task_id)
    assert direct.code() == grpc.StatusCode.UNAVAILABLE and reasons(direct)[0] == "NOTIFIER_STARTING"
    assert answer(through_b) == answer(direct)
    cluster.directory.not_ready.clear()
    assert (await cluster.stub("b").GetTask(notifier_pb2.GetTaskRequest(task_id=task_id), metadata=ACME)).state


# --- WatchTask and WatchTasks ---------------------------------------------------------------------------------


async def test_a_watch_through_a_forwarder_continues_at_the_new_owner_when_the_owner_dies(cluster: Cluster) -> None:
    task_id = cluster.task("a", "c")
    cluster.apply(task_id, 2, RUNNING, "a", "c")
    stream = cluster.stub("b").WatchTask(notifier_pb2.WatchTaskRequest(task_id=task_id), metadata=ACME)
    assert await sequences(stream, 1) == [2]
    cluster.apply(task_id, 3, RUNNING, "a", "c")
    assert await sequences(stream, 1) == [3]
    cluster.apply(task_id, 4, RUNNING, "a", "c")  # read by both; the client has not taken it yet
    # The partition moves to c (which read the same history), and a dies.
    cluster.directory.owners[task_id] = "c"
    await cluster.replicas["a"].server.stop(0)
    cluster.apply(task_id, 5, RUNNING, "c")
    cluster.apply(task_id, 6, SUCCEEDED, "c")
    assert await rest(stream) == [4, 5, 6]  # no gap, no repeat


async def test_a_watch_follows_a_task_whose_partition_moved_away(cluster: Cluster) -> None:
    task_id = cluster.task("a", "c")
    at_a = cluster.stub("a").WatchTask(notifier_pb2.WatchTaskRequest(task_id=task_id), metadata=ACME)
    through_b = cluster.stub("b").WatchTask(notifier_pb2.WatchTaskRequest(task_id=task_id), metadata=ACME)
    assert await sequences(at_a, 1) == [1] and await sequences(through_b, 1) == [1]
    cluster.apply(task_id, 2, RUNNING, "a", "c")
    assert await sequences(at_a, 1) == [2] and await sequences(through_b, 1) == [2]
    # a is assigned other partitions: the directory says c, and a's store hands MOVED to the task's watchers.
    cluster.directory.owners[task_id] = "c"
    assert cluster.replicas["a"].store.moved({partition_of(task_id, PARTITIONS)}, PARTITIONS) == 2
    cluster.apply(task_id, 3, RUNNING, "c")
    cluster.apply(task_id, 4, SUCCEEDED, "c")
    assert await rest(at_a) == [3, 4]  # a relays it from c
    assert await rest(through_b) == [3, 4]  # b follows it from c, after a ended its call


async def test_watch_tasks_mixing_local_and_remote_tasks_ends_once_all_have_ended(cluster: Cluster) -> None:
    local, remote, ended = cluster.task("b"), cluster.task("a"), cluster.task("c")
    cluster.apply(ended, 3, SUCCEEDED, "c")
    request = notifier_pb2.WatchTasksRequest(
        tasks=[
            notifier_pb2.WatchTaskRequest(task_id=local),
            notifier_pb2.WatchTaskRequest(task_id=remote),
            notifier_pb2.WatchTaskRequest(task_id=ended, after_sequence=3),  # resumed after its end
        ]
    )
    stream = cluster.stub("b").WatchTasks(request, metadata=ACME)
    seen = {(u.state.task_id, u.state.sequence) for u in [await stream.read(), await stream.read()]}
    assert seen == {(local, 1), (remote, 1)}
    cluster.apply(remote, 3, SUCCEEDED, "a")
    got = await stream.read()
    assert (got.state.task_id, got.state.status) == (remote, SUCCEEDED)
    cluster.apply(local, 3, SUCCEEDED, "b")
    last = await stream.read()
    assert (last.state.task_id, last.state.status) == (local, SUCCEEDED)
    assert await stream.read() == grpc.aio.EOF and await stream.code() == grpc.StatusCode.OK
    for replica in cluster.replicas.values():
        assert replica.store.watcher_count() == 0


async def test_forwarded_watches_count_against_the_tenant_cap_but_not_the_connection_cap(cluster: Cluster) -> None:
    streams = []
    for _ in range(2):  # two clients of b, each at its connection cap (3), all six tasks a's
        request = notifier_pb2.WatchTasksRequest(
            tasks=[notifier_pb2.WatchTaskRequest(task_id=cluster.task("a")) for _ in range(3)]
        )
        streams.append(stream := cluster.stub("b").WatchTasks(request, metadata=ACME))
        assert await sequences(stream, 3) == [1, 1, 1]  # a took them all over b's one connection
    seventh = cluster.task("a")
    refused = await watch_error(cluster.stub("a"), seventh)  # a seventh of the tenant at a
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "tenant" in (refused.details() or "")
    # Through c (where the tenant holds nothing) a refuses it too, and c's client gets a's answer.
    assert answer(await watch_error(cluster.stub("c"), seventh)) == answer(refused)
    for stream in streams:
        stream.cancel()


# --- TLS between replicas -------------------------------------------------------------------------------------


class ReplicaAuthority(Authority):
    def replica(self) -> Pem:
        """A certificate for 127.0.0.1 good for a server and a client alike (a replica is both to the others)."""
        key = ec.generate_private_key(ec.SECP256R1())
        usages = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
        cert = (
            self._builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "replica")]), key.public_key())
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(usages, critical=False)
            .sign(self._key, hashes.SHA256())
        )
        return Pem(
            cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
        )


async def test_replicas_serving_mutual_tls_forward_to_each_other_over_it(tmp_path: Path) -> None:
    authority = ReplicaAuthority()
    cert, key = authority.replica().write(tmp_path, "replica")
    ca = tmp_path / "ca.crt"
    ca.write_bytes(authority.cert_pem)
    settings = NotifierSettings(tls_cert_file=str(cert), tls_key_file=str(key), tls_client_ca_file=str(ca))
    directory, stores, servers, forwarders = Directory(), [], [], []
    for name in "ab":
        stores.append(store := TaskStore(retention_s=60))
        forwarders.append(forwarder := Forwarder.from_settings(settings))
        servicer = NotifierServicer(store, ready=ready(), ownership=View(directory, name), forwarder=forwarder)
        tls = ServerTls.from_settings(settings)
        servers.append(server := GrpcServer("127.0.0.1:0", ["aimesh.v1.NotifierService"], auth=KEYS, tls=tls))
        server.add(notifier_pb2_grpc.add_NotifierServiceServicer_to_server, servicer)
        await server.start()
        directory.addresses[name] = f"127.0.0.1:{server.port}"
    try:
        task_id = str(uuid.uuid4())
        directory.owners[task_id] = "a"
        stores[0].apply_task(task_pb2.AITaskEvent(schema_version=1, task_id=task_id, tenant="acme"))
        client = ClientTls(ca_file=ca, cert_file=cert, key_file=key)
        async with grpc.aio.secure_channel(directory.addresses["b"], client.credentials()) as channel:
            stub = notifier_pb2_grpc.NotifierServiceStub(channel)
            reply = await stub.GetTask(notifier_pb2.GetTaskRequest(task_id=task_id), metadata=ACME)
        assert reply.state.status == QUEUED  # a's answer, over mutual TLS from b
        assert peer_tls(NotifierSettings()) is None  # replicas serving plaintext call each other so
    finally:
        for server in servers:
            await server.stop(0)
        for forwarder in forwarders:
            await forwarder.close()


class CountingStore(TaskStore):
    """A store that tells when it has been subscribed to ``wanted`` times."""

    def __init__(self, wanted: int) -> None:
        super().__init__(retention_s=60)
        self.subscribed, self.wanted, self.reached = 0, wanted, asyncio.Event()

    def subscribe(self, *args: Any, **kwargs: Any) -> None:
        super().subscribe(*args, **kwargs)
        self.subscribed += 1
        if self.subscribed >= self.wanted:
            self.reached.set()


async def test_an_owner_ending_its_idle_stream_does_not_end_the_clients(cluster: Cluster) -> None:
    # d owns the task and ends streams idle for 0.2 s; b's idle timeout is 10 s.
    store = CountingStore(wanted=3)
    servicer = NotifierServicer(
        store, ready=ready(), limits=StreamLimits(idle_timeout_s=0.2), ownership=View(cluster.directory, "d")
    )
    server = GrpcServer("127.0.0.1:0", ["aimesh.v1.NotifierService"], auth=KEYS)
    server.add(notifier_pb2_grpc.add_NotifierServiceServicer_to_server, servicer)
    await server.start()
    try:
        cluster.directory.addresses["d"] = f"127.0.0.1:{server.port}"
        task_id = str(uuid.uuid4())
        cluster.directory.owners[task_id] = "d"
        store.apply_task(task_pb2.AITaskEvent(schema_version=1, task_id=task_id, tenant="acme"))
        stream = cluster.stub("b").WatchTask(notifier_pb2.WatchTaskRequest(task_id=task_id), metadata=ACME)
        assert await sequences(stream, 1) == [1]
        await asyncio.wait_for(store.reached.wait(), 5.0)  # b watched again twice, each after d's idle end
        store.apply_result(
            result_pb2.AIResultEvent(schema_version=1, task_id=task_id, status=SUCCEEDED, sequence=3, tenant="acme")
        )
        assert await rest(stream) == [3]
    finally:
        await server.stop(0)
