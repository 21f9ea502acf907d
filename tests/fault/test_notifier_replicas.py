"""Partitioned notifier replicas on the real stack: a replica killed while clients watch through it costs them
a reconnect, not an update; every replica answers for every task; a restarted replica resumes its state."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from integration.mesh_client import MeshClient

from aimesh import events
from aimesh.devstack.stack import Stack
from aimesh.v1 import notifier_pb2, notifier_pb2_grpc, result_pb2

from .conftest import NOTIFIER_REPLICAS

pytestmark = pytest.mark.fault

TASKS = 24
# A streaming task long enough to be mid-stream when the replica dies: a token every 150 ms, 30 of them.
GENERATE = {"max_tokens": "30", "seed": "11", "token_delay_ms": "150"}


class Watcher:
    """Watches one task through one replica, and on any failure resumes through the next replica with the last
    sequence it saw, as a client of a round-robin address would."""

    def __init__(self, channels: list[grpc.aio.Channel], task_id: str, first: int) -> None:
        self.stubs = [notifier_pb2_grpc.NotifierServiceStub(c) for c in channels]
        self.task_id = task_id
        self.replica = first
        self.states: list[notifier_pb2.TaskState] = []
        self.resumes = 0

    async def run(self, deadline_s: float) -> None:
        while time.monotonic() < deadline_s:
            after = self.states[-1].sequence if self.states else 0
            request = notifier_pb2.WatchTaskRequest(task_id=self.task_id, after_sequence=after)
            try:
                async for response in self.stubs[self.replica].WatchTask(request, timeout=60):
                    self.states.append(response.state)
                return
            except grpc.aio.AioRpcError as e:
                if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                    raise
                self.resumes += 1
                self.replica = (self.replica + 1) % len(self.stubs)
                await asyncio.sleep(0.2)
        raise AssertionError(f"{self.task_id} not finished in time: {[s.sequence for s in self.states]}")


def assert_each_update_once(watcher: Watcher) -> None:
    sequences = [s.sequence for s in watcher.states]
    assert sequences, f"{watcher.task_id}: no update"
    assert sequences == list(range(sequences[0], sequences[0] + len(sequences))), (watcher.task_id, sequences)
    assert events.is_terminal(watcher.states[-1].status), (watcher.task_id, sequences)
    assert watcher.states[-1].status == result_pb2.TASK_STATUS_SUCCEEDED


async def get_everywhere(channels: list[grpc.aio.Channel], task_ids: list[str]) -> dict[int, int]:
    """How many of ``task_ids`` each replica answers SUCCEEDED for, retrying UNAVAILABLE (partitions moving) for up
    to 60 s as a client would."""
    answered = {}
    deadline = time.monotonic() + 60
    for index, channel in enumerate(channels):
        stub = notifier_pb2_grpc.NotifierServiceStub(channel)
        ok = 0
        for task_id in task_ids:
            while True:
                try:
                    got = await stub.GetTask(notifier_pb2.GetTaskRequest(task_id=task_id), timeout=10)
                    break
                except grpc.aio.AioRpcError as e:
                    if e.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.5)
            ok += got.state.status == result_pb2.TASK_STATUS_SUCCEEDED
        answered[index] = ok
    return answered


async def test_a_killed_replicas_watchers_resume_elsewhere_and_miss_nothing(stack: Stack, client: MeshClient) -> None:
    addresses = stack.notifier_addresses
    assert len(addresses) == NOTIFIER_REPLICAS
    channels = [grpc.aio.insecure_channel(a) for a in addresses]
    try:
        task_ids = [await client.submit("generate", f"replica test {i}", parameters=GENERATE) for i in range(TASKS)]
        watchers = [Watcher(channels, t, i % len(addresses)) for i, t in enumerate(task_ids)]
        deadline = time.monotonic() + 120
        running = [asyncio.create_task(w.run(deadline)) for w in watchers]
        await asyncio.sleep(1.5)  # mid-stream
        stack.kill_replica("notifier", 1)
        await asyncio.gather(*running)
        for watcher in watchers:
            assert_each_update_once(watcher)
        assert sum(w.resumes for w in watchers) >= TASKS // len(addresses)  # those on the dead replica, at least
        survivors = [channels[0], channels[2]]
        assert await get_everywhere(survivors, task_ids) == {0: TASKS, 1: TASKS}
        stack.restart_replica("notifier", 1)
        assert await get_everywhere(channels, task_ids) == dict.fromkeys(range(len(addresses)), TASKS)
    finally:
        for channel in channels:
            await channel.close()
