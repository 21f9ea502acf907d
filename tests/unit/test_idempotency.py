import asyncio
import uuid

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from aimesh.errors import BrokerUnavailable, PublishInDoubt
from aimesh.ingest.idempotency import Accepted, IdempotencyKeys, SentRecord, derived_task_id


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def never_in_doubt(record: SentRecord) -> Accepted:
    raise AssertionError(f"nothing was in doubt, yet {record} was resolved")


async def test_repeated_key_returns_first_task_without_submitting_again() -> None:
    keys = IdempotencyKeys(ttl_s=60)
    calls = 0

    async def submit() -> Accepted:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        return Accepted(f"task-{calls}", Timestamp())

    first, second, third = await asyncio.gather(
        keys.submit_once("k", submit, never_in_doubt),
        keys.submit_once("k", submit, never_in_doubt),
        keys.submit_once("k", submit, never_in_doubt),
    )
    assert calls == 1
    assert first == (Accepted("task-1", Timestamp()), False)
    assert second[0].task_id == third[0].task_id == "task-1"
    assert second[1] and third[1]


async def test_failed_submission_is_forgotten_so_a_retry_runs() -> None:
    keys = IdempotencyKeys(ttl_s=60)

    async def fail() -> Accepted:
        raise BrokerUnavailable("down")

    with pytest.raises(BrokerUnavailable):
        await keys.submit_once("k", fail, never_in_doubt)

    async def ok() -> Accepted:
        return Accepted("task-2", Timestamp())

    assert await keys.submit_once("k", ok, never_in_doubt) == (Accepted("task-2", Timestamp()), False)


async def test_keys_expire_after_ttl() -> None:
    clock = Clock()
    keys = IdempotencyKeys(ttl_s=10, clock=clock)
    keys.remember("k", Accepted("t", Timestamp()))
    clock.now = 9.9
    assert keys.lookup("k") is not None
    clock.now = 10.1
    assert keys.lookup("k") is None
    assert len(keys) == 0


def sent_record(task_id: str) -> SentRecord:
    delivery: asyncio.Future[object] = asyncio.get_running_loop().create_future()
    delivery.set_exception(BrokerUnavailable("delivery failed: Local: Message timed out"))
    delivery.exception()
    return SentRecord("tasks", "sleep", Accepted(task_id, Timestamp()), 0, delivery)


async def test_a_key_in_doubt_is_resolved_never_submitted_again() -> None:
    keys = IdempotencyKeys(ttl_s=60)
    submissions = 0
    record = sent_record("task-1")

    async def submit() -> Accepted:
        nonlocal submissions
        submissions += 1
        raise PublishInDoubt("delivery timed out", record=record)

    resolutions: list[SentRecord] = []

    async def still_unknown(doubt: SentRecord) -> Accepted:
        resolutions.append(doubt)
        raise PublishInDoubt("not found yet", record=doubt)

    async def landed(doubt: SentRecord) -> Accepted:
        resolutions.append(doubt)
        return doubt.accepted

    with pytest.raises(PublishInDoubt):
        await keys.submit_once("k", submit, still_unknown)
    with pytest.raises(PublishInDoubt):
        await keys.submit_once("k", submit, still_unknown)
    assert keys.in_doubt("k") is record
    assert await keys.submit_once("k", submit, landed) == (Accepted("task-1", Timestamp()), True)
    assert submissions == 1
    assert resolutions == [record, record]
    assert keys.in_doubt("k") is None and keys.lookup("k") == Accepted("task-1", Timestamp())


async def test_a_failed_resolution_keeps_the_key_in_doubt() -> None:
    keys = IdempotencyKeys(ttl_s=60)
    record = sent_record("task-1")

    async def submit() -> Accepted:
        raise PublishInDoubt("delivery timed out", record=record)

    async def broken(doubt: SentRecord) -> Accepted:
        raise RuntimeError("lookup crashed")

    with pytest.raises(PublishInDoubt):
        await keys.submit_once("k", submit, broken)
    with pytest.raises(RuntimeError):
        await keys.submit_once("k", submit, broken)
    assert keys.in_doubt("k") is record


def test_a_task_id_derived_from_tenant_and_key_is_the_same_in_every_replica() -> None:
    task_id = derived_task_id("acme", "order-17")
    assert task_id == derived_task_id("acme", "order-17")
    parsed = uuid.UUID(task_id)
    assert parsed.version == 5 and str(parsed) == task_id  # canonical, lower-case
    assert derived_task_id("globex", "order-17") != task_id
    assert derived_task_id("acme", "order-18") != task_id


def test_tenant_and_key_are_joined_unambiguously() -> None:
    assert derived_task_id("a", "b/c") != derived_task_id("a/b", "c")
    assert derived_task_id("ab", "c") != derived_task_id("a", "bc")
    assert derived_task_id("1:a", "b") != derived_task_id("1", "a1:b")
