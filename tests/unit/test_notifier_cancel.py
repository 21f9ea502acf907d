"""CancelTask at the notifier's gRPC edge, in process on port 0 with API keys on; the Kafka producer is the seam
(a fake that records what would be published, or fails as a broker that does not acknowledge)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import pytest
from grpc_status import rpc_status

from aimesh import events
from aimesh.auth import Authenticator, hash_key
from aimesh.errors import BrokerUnavailable
from aimesh.grpc_edge import GrpcServer
from aimesh.kafka import Headers
from aimesh.metrics import NotifierMetrics
from aimesh.notifier.service import Cancellations, NotifierServicer
from aimesh.notifier.store import TaskStore
from aimesh.v1 import notifier_pb2, notifier_pb2_grpc, result_pb2, task_pb2

KEYS = Authenticator.from_entries([("acme", hash_key("acme-key")), ("globex", hash_key("globex-key"))])
ACME = (("authorization", "Bearer acme-key"),)
GLOBEX = (("authorization", "Bearer globex-key"),)
TOPIC = "cancels"
WAIT_S = 0.4  # the servicer's wait for a task not read yet, short for the tests


@dataclass
class FakeProducer:
    """Records each record it is given; ``fail`` makes the broker refuse, ``hang`` never acknowledge."""

    sent: list[tuple[str, str, bytes, Headers]] = field(default_factory=list)
    fail: bool = False
    hang: bool = False

    async def produce(self, topic: str, *, key: str, value: bytes, headers: Headers | None = None) -> object:
        if self.hang:
            await asyncio.sleep(3600)
        await asyncio.sleep(0)
        if self.fail:
            raise BrokerUnavailable("delivery failed: Local: Message timed out")
        self.sent.append((topic, key, value, list(headers or [])))
        return None


@dataclass
class Notifier:
    stub: notifier_pb2_grpc.NotifierServiceStub
    store: TaskStore
    producer: FakeProducer
    ready: asyncio.Event
    metrics: NotifierMetrics


@pytest.fixture
async def notifier() -> AsyncIterator[Notifier]:
    store, producer, ready, metrics = TaskStore(retention_s=60), FakeProducer(), asyncio.Event(), NotifierMetrics()
    ready.set()
    servicer = NotifierServicer(
        store,
        ready=ready,
        metrics=metrics,
        cancels=Cancellations(producer, TOPIC, publish_timeout_s=0.2),
        cancel_wait_s=WAIT_S,
    )
    server = GrpcServer("127.0.0.1:0", ["aimesh.v1.NotifierService"], auth=KEYS)
    server.add(notifier_pb2_grpc.add_NotifierServiceServicer_to_server, servicer)
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield Notifier(notifier_pb2_grpc.NotifierServiceStub(channel), store, producer, ready, metrics)
    await server.stop(0)


def submitted(store: TaskStore, tenant: str = "acme") -> str:
    task_id = str(uuid.uuid4())
    store.apply_task(task_pb2.AITaskEvent(schema_version=1, task_id=task_id, model_name="sleep", tenant=tenant))
    return task_id


def cancel(n: Notifier, task_id: str, metadata=ACME):  # type: ignore[no-untyped-def]
    return n.stub.CancelTask(notifier_pb2.CancelTaskRequest(task_id=task_id), metadata=metadata)


async def refused(n: Notifier, task_id: str, metadata=ACME) -> grpc.aio.AioRpcError:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await cancel(n, task_id, metadata)
    return info.value


def cancels(n: Notifier, outcome: str) -> float:
    return n.metrics.cancel_requests.labels(outcome)._value.get()  # type: ignore[attr-defined, no-any-return]


async def test_a_queued_task_is_cancelled_by_publishing_a_durable_cancel_event(notifier: Notifier) -> None:
    task_id = submitted(notifier.store)
    reply = await cancel(notifier, task_id)
    assert reply.outcome == notifier_pb2.CANCEL_OUTCOME_REQUESTED
    assert reply.state.task_id == task_id and reply.state.status == result_pb2.TASK_STATUS_QUEUED
    [(topic, key, value, headers)] = notifier.producer.sent
    event = events.decode_cancel(value)
    assert (topic, key, event.task_id, event.tenant) == (TOPIC, task_id, task_id, "acme")
    assert abs(events.timestamp_s(event.requested_at) - time.time()) < 5
    assert (events.CONTENT_TYPE_HEADER, events.CANCEL_CONTENT_TYPE) in headers
    again = await cancel(notifier, task_id)  # idempotent: the same answer (and a harmless second record)
    assert again.outcome == notifier_pb2.CANCEL_OUTCOME_REQUESTED and again.state.status == reply.state.status
    assert cancels(notifier, "requested") == 2


async def test_an_ended_task_is_left_alone_and_its_state_answered(notifier: Notifier) -> None:
    task_id = submitted(notifier.store)
    notifier.store.apply_result(
        result_pb2.AIResultEvent(schema_version=1, task_id=task_id, status=result_pb2.TASK_STATUS_SUCCEEDED)
    )
    for _ in range(2):
        reply = await cancel(notifier, task_id)
        assert reply.outcome == notifier_pb2.CANCEL_OUTCOME_ALREADY_ENDED
        assert reply.state.status == result_pb2.TASK_STATUS_SUCCEEDED and reply.state.sequence == 3
    assert notifier.producer.sent == [] and cancels(notifier, "already_ended") == 2


async def test_a_cancel_right_after_submitting_waits_for_the_task_record(notifier: Notifier) -> None:
    task_id = str(uuid.uuid4())
    call = asyncio.ensure_future(cancel(notifier, task_id))
    await asyncio.sleep(WAIT_S / 4)
    notifier.store.apply_task(
        task_pb2.AITaskEvent(schema_version=1, task_id=task_id, model_name="sleep", tenant="acme")
    )
    reply = await call
    assert reply.outcome == notifier_pb2.CANCEL_OUTCOME_REQUESTED and len(notifier.producer.sent) == 1
    assert notifier.store.watcher_count() == 0


async def test_unknown_and_other_tenants_tasks_get_the_same_not_found_in_the_same_time(notifier: Notifier) -> None:
    theirs, nobodys = submitted(notifier.store, "globex"), str(uuid.uuid4())
    started = time.monotonic()
    unknown = await refused(notifier, nobodys)
    unknown_s = time.monotonic() - started
    started = time.monotonic()
    other = await refused(notifier, theirs)
    other_s = time.monotonic() - started
    assert unknown.code() == other.code() == grpc.StatusCode.NOT_FOUND
    assert other.details() == (unknown.details() or "").replace(nobodys, theirs)
    assert WAIT_S * 0.9 < unknown_s < WAIT_S * 4 and WAIT_S * 0.9 < other_s < WAIT_S * 4
    assert notifier.producer.sent == [] and cancels(notifier, "not_found") == 2
    assert notifier.store.get(theirs, "globex") is not None  # untouched
    assert notifier.store.watcher_count() == 0


async def test_bad_ids_the_starting_notifier_and_a_silent_broker_get_their_statuses(notifier: Notifier) -> None:
    for bad in ("", "not-a-uuid"):
        assert (await refused(notifier, bad)).code() == grpc.StatusCode.INVALID_ARGUMENT
    task_id = submitted(notifier.store)
    notifier.ready.clear()
    assert (await refused(notifier, task_id)).code() == grpc.StatusCode.UNAVAILABLE
    notifier.ready.set()
    notifier.producer.fail = True
    error = await refused(notifier, task_id)
    assert error.code() == grpc.StatusCode.UNAVAILABLE and "retry" in (error.details() or "")
    status = rpc_status.from_call(error)
    assert status is not None and status.details  # ErrorInfo BROKER_UNAVAILABLE
    notifier.producer.fail, notifier.producer.hang = False, True
    started = time.monotonic()
    assert (await refused(notifier, task_id)).code() == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - started < 3
    assert cancels(notifier, "unavailable") == 2
    assert (await refused(notifier, task_id, metadata=())).code() == grpc.StatusCode.UNAUTHENTICATED
