"""The blocking client: the same behaviour as the asyncio one, from plain threads (the threaded_fakes run on a loop of
their own)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc
import pytest
from client_fakes import FAST, TASK, UNAVAILABLE, ThreadedFakes, backlog_too_long, story

from aimesh.client import Client, ClientError
from aimesh.v1 import ingest_pb2, notifier_pb2, result_pb2


@pytest.fixture
def client(threaded_fakes: ThreadedFakes) -> Iterator[Client]:
    with Client(threaded_fakes.ingest_address, threaded_fakes.notifier_address, retry=FAST, timeout_s=10) as c:
        yield c


def test_submit_retries_with_one_key_and_errors_surface(threaded_fakes: ThreadedFakes, client: Client) -> None:
    threaded_fakes.ingest.failures = [backlog_too_long(0.1), UNAVAILABLE]
    assert client.submit("sentiment", "great", parameters={"a": "1"})
    keys = {r.idempotency_key for r in threaded_fakes.ingest.requests if isinstance(r, ingest_pb2.SubmitTaskRequest)}
    assert len(threaded_fakes.ingest.requests) == 3 and len(keys) == 1
    with pytest.raises(ClientError) as info:
        client.get(TASK)
    assert info.value.code == grpc.StatusCode.NOT_FOUND


def test_watch_is_an_iterator_that_resumes(threaded_fakes: ThreadedFakes, client: Client) -> None:
    threaded_fakes.notifier.updates[TASK] = story(TASK)
    threaded_fakes.notifier.drops = [(3, UNAVAILABLE)]
    assert [s.sequence for s in client.watch(TASK)] == [1, 2, 3, 4, 5, 6, 7]
    assert client.result(TASK).status == result_pb2.TASK_STATUS_SUCCEEDED
    assert client.cancel(TASK).outcome == notifier_pb2.CANCEL_OUTCOME_ALREADY_ENDED


def test_leaving_a_watch_early_and_closing_twice(threaded_fakes: ThreadedFakes) -> None:
    threaded_fakes.notifier.updates[TASK] = story(TASK)
    threaded_fakes.notifier.hang = True
    client = Client(threaded_fakes.ingest_address, threaded_fakes.notifier_address, retry=FAST)
    for update in client.watch(TASK):
        assert update.sequence == 1
        break
    assert client.get(TASK).task_id == TASK
    threads = threading.active_count()
    client.close()
    client.close()
    assert threading.active_count() == threads - 1  # the loop thread is gone
