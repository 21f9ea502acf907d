import asyncio

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from aimesh.errors import BrokerUnavailable
from aimesh.ingest.idempotency import Accepted, IdempotencyKeys


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_repeated_key_returns_first_task_without_submitting_again() -> None:
    keys = IdempotencyKeys(ttl_s=60)
    calls = 0

    async def submit() -> Accepted:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        return Accepted(f"task-{calls}", Timestamp())

    first, second, third = await asyncio.gather(
        keys.submit_once("k", submit), keys.submit_once("k", submit), keys.submit_once("k", submit)
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
        await keys.submit_once("k", fail)

    async def ok() -> Accepted:
        return Accepted("task-2", Timestamp())

    assert await keys.submit_once("k", ok) == (Accepted("task-2", Timestamp()), False)


async def test_keys_expire_after_ttl() -> None:
    clock = Clock()
    keys = IdempotencyKeys(ttl_s=10, clock=clock)
    keys.remember("k", Accepted("t", Timestamp()))
    clock.now = 9.9
    assert keys.lookup("k") is not None
    clock.now = 10.1
    assert keys.lookup("k") is None
    assert len(keys) == 0
