"""The asyncio client against in-process fake servers: retries that honour RetryInfo, one idempotency key across
retries, watches that resume after a dropped stream, error mapping, API keys and TLS."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from certificates import Authority
from client_fakes import FAST, OTHER, TASK, UNAVAILABLE, Failure, Fakes, backlog_too_long, state, story
from google.protobuf.duration_pb2 import Duration
from google.rpc import code_pb2, error_details_pb2

from aimesh.auth import Authenticator, hash_key
from aimesh.client import AsyncClient, ClientError, ClientTls, RetryPolicy, TaskSpec
from aimesh.grpc_edge import ServerTls
from aimesh.v1 import ingest_pb2, notifier_pb2, result_pb2, task_pb2


def submits(fakes: Fakes) -> list[ingest_pb2.SubmitTaskRequest]:
    return [r for r in fakes.ingest.requests if isinstance(r, ingest_pb2.SubmitTaskRequest)]


async def test_submit_sends_the_task_as_asked(fakes: Fakes, client: AsyncClient) -> None:
    before = time.time()
    task_id = await client.submit(
        "summarize", "Some text.", parameters={"sentences": "2"}, deadline=timedelta(seconds=30), priority="batch"
    )
    [request] = submits(fakes)
    assert task_id and request.model_name == "summarize" and request.input.text == "Some text."
    assert dict(request.parameters) == {"sentences": "2"}
    assert request.priority == task_pb2.PRIORITY_BATCH
    assert before + 29 <= request.deadline.seconds <= time.time() + 31
    assert len(request.idempotency_key) == 36  # one made for the caller
    with pytest.raises(ValueError, match="priority"):
        await client.submit("summarize", "x", priority="urgent")  # type: ignore[arg-type]


async def test_submit_waits_as_long_as_retry_info_says_and_reuses_its_idempotency_key(
    fakes: Fakes, client: AsyncClient
) -> None:
    fakes.ingest.failures = [backlog_too_long(0.4), UNAVAILABLE]
    started = time.monotonic()
    task_id = await client.submit("sentiment", "great")
    elapsed = time.monotonic() - started
    requests = submits(fakes)
    assert len(requests) == 3
    assert elapsed >= 0.4  # the server's delay, not the 10 ms backoff
    assert len({r.idempotency_key for r in requests}) == 1 and requests[0].idempotency_key
    assert len({r.deadline.SerializeToString() for r in requests}) == 1
    assert task_id


async def test_the_callers_idempotency_key_is_sent_and_a_repeat_returns_the_first_task(
    fakes: Fakes, client: AsyncClient
) -> None:
    first = await client.submit_task(TaskSpec("sentiment", "great", idempotency_key="order-17"))
    again = await client.submit_task(TaskSpec("sentiment", "great", idempotency_key="order-17"))
    assert [r.idempotency_key for r in submits(fakes)] == ["order-17", "order-17"]
    assert again.task_id == first.task_id and again.duplicate and not first.duplicate


async def test_a_batch_keeps_each_tasks_key_across_a_retry(fakes: Fakes, client: AsyncClient) -> None:
    fakes.ingest.failures = [UNAVAILABLE]
    specs = [TaskSpec("sentiment", f"text {i}") for i in range(3)]
    answers = await client.submit_many(specs)
    first, second = fakes.ingest.requests
    assert isinstance(first, ingest_pb2.SubmitTasksRequest) and isinstance(second, ingest_pb2.SubmitTasksRequest)
    keys = [t.idempotency_key for t in first.tasks]
    assert len(set(keys)) == 3 and keys == [t.idempotency_key for t in second.tasks]
    assert len({a.task_id for a in answers}) == 3


async def test_retries_are_bounded(fakes: Fakes, client: AsyncClient) -> None:
    fakes.ingest.failures = [UNAVAILABLE] * 10
    with pytest.raises(ClientError) as info:
        await client.submit("sentiment", "great")
    assert info.value.code == grpc.StatusCode.UNAVAILABLE and info.value.retryable
    assert len(submits(fakes)) == FAST.max_attempts


async def test_a_retry_delay_past_the_calls_timeout_is_not_waited_for(fakes: Fakes, client: AsyncClient) -> None:
    fakes.ingest.failures = [backlog_too_long(5.0)]
    started = time.monotonic()
    with pytest.raises(ClientError) as info:
        await client.submit("sentiment", "great", timeout_s=1.0)
    assert time.monotonic() - started < 1.0
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info.value.reason == "BACKLOG_TOO_LONG" and info.value.retry_delay_s == pytest.approx(5.0)
    assert len(submits(fakes)) == 1


async def test_errors_carry_code_message_and_details_and_are_not_retried_unless_retryable(
    fakes: Fakes, client: AsyncClient
) -> None:
    bad = error_details_pb2.BadRequest(
        field_violations=[error_details_pb2.BadRequest.FieldViolation(field="input.text", description="empty")]
    )
    too_big = Failure(code_pb2.RESOURCE_EXHAUSTED, "message larger than the limit")  # no RetryInfo: final
    fakes.ingest.failures = [Failure(code_pb2.INVALID_ARGUMENT, "input.text: empty", [bad]), too_big]
    with pytest.raises(ClientError) as info:
        await client.submit("sentiment", "")
    error = info.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.message == "input.text: empty"
    assert error.field_violations == [("input.text", "empty")] and not error.retryable
    assert str(error) == "INVALID_ARGUMENT: input.text: empty"
    with pytest.raises(ClientError) as info:
        await client.submit("sentiment", "x")
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and not info.value.retryable
    assert len(submits(fakes)) == 2

    with pytest.raises(ClientError) as info:
        await client.get(TASK)
    assert info.value.code == grpc.StatusCode.NOT_FOUND and info.value.reason == "TASK_NOT_FOUND"
    assert str(info.value) == f"NOT_FOUND: task {TASK} not found [TASK_NOT_FOUND]"


async def test_get_and_cancel(fakes: Fakes, client: AsyncClient) -> None:
    fakes.notifier.updates[TASK] = story(TASK)[:2]
    fakes.notifier.updates[OTHER] = story(OTHER)
    fakes.notifier.failures = [UNAVAILABLE]  # the notifier still starting: retried
    assert (await client.get(TASK)).status == result_pb2.TASK_STATUS_RUNNING
    requested = await client.cancel(TASK)
    assert requested.outcome == notifier_pb2.CANCEL_OUTCOME_REQUESTED and fakes.notifier.cancelled == [TASK]
    ended = await client.cancel(OTHER)
    assert ended.outcome == notifier_pb2.CANCEL_OUTCOME_ALREADY_ENDED
    assert ended.state.status == result_pb2.TASK_STATUS_SUCCEEDED


async def test_watch_resumes_after_dropped_streams_with_no_gap_and_no_repeat(fakes: Fakes, client: AsyncClient) -> None:
    fakes.notifier.updates[TASK] = story(TASK)  # sequences 1..7
    fakes.notifier.drops = [(2, UNAVAILABLE), (0, UNAVAILABLE), (3, UNAVAILABLE)]
    seen = [s.sequence async for s in client.watch(TASK)]
    assert seen == [1, 2, 3, 4, 5, 6, 7]
    assert [r.after_sequence for r in fakes.notifier.watch_requests] == [0, 2, 2, 5]


async def test_watch_drops_repeats_from_a_server_that_ignores_after_sequence(fakes: Fakes, client: AsyncClient) -> None:
    fakes.notifier.updates[TASK] = story(TASK)
    fakes.notifier.ignore_after_sequence = True
    fakes.notifier.drops = [(4, UNAVAILABLE)]
    seen = [s.sequence async for s in client.watch(TASK, after_sequence=1)]
    assert seen == [2, 3, 4, 5, 6, 7]


async def test_watch_watches_again_when_the_server_ends_an_idle_stream(fakes: Fakes, client: AsyncClient) -> None:
    fakes.notifier.updates[TASK] = story(TASK)
    idle = Failure(code_pb2.DEADLINE_EXCEEDED, "no update for 300 s")
    fakes.notifier.drops = [(1, idle)] + [(0, UNAVAILABLE)] * (FAST.max_attempts - 1) + [(1, idle)]
    seen = [s.sequence async for s in client.watch(TASK)]
    assert seen == [1, 2, 3, 4, 5, 6, 7]


async def test_a_watch_gives_up_after_the_retry_budget_without_progress(fakes: Fakes, client: AsyncClient) -> None:
    fakes.notifier.updates[TASK] = story(TASK)
    fakes.notifier.drops = [(1, UNAVAILABLE)] + [(0, UNAVAILABLE)] * 10
    seen = []
    with pytest.raises(ClientError) as info:
        async for update in client.watch(TASK):
            seen.append(update.sequence)
    assert seen == [1] and info.value.code == grpc.StatusCode.UNAVAILABLE
    # Reading update 2: the stream that dropped was the first try, then max_attempts - 1 new streams.
    assert len(fakes.notifier.watch_requests) == FAST.max_attempts


async def test_result_waits_for_the_terminal_state_or_times_out(fakes: Fakes, client: AsyncClient) -> None:
    fakes.notifier.updates[TASK] = story(TASK, ["a", "b"])
    final = await client.result(TASK)
    assert final.status == result_pb2.TASK_STATUS_SUCCEEDED and final.sequence == 5
    assert final.result.output.tensors[0].string_data == ["ab"]

    fakes.notifier.updates[OTHER] = [state(OTHER, 1, result_pb2.TASK_STATUS_QUEUED)]
    fakes.notifier.hang = True
    started = time.monotonic()
    with pytest.raises(ClientError) as info:
        await client.result(OTHER, timeout_s=0.5)
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0.5 <= time.monotonic() - started < 3


async def test_breaking_out_of_a_watch_cancels_its_stream(fakes: Fakes, client: AsyncClient) -> None:
    fakes.notifier.updates[TASK] = story(TASK)
    fakes.notifier.hang = True
    watch = client.watch(TASK)
    async for update in watch:
        assert update.sequence == 1
        break
    await watch.aclose()  # type: ignore[attr-defined]
    assert (await client.get(TASK)).task_id == TASK  # the client still works


async def test_watch_many_resumes_each_task_from_its_own_sequence(fakes: Fakes, client: AsyncClient) -> None:
    fakes.notifier.updates[TASK] = story(TASK, ["x"])  # 1..4
    fakes.notifier.updates[OTHER] = story(OTHER, [])  # 1..3
    fakes.notifier.drops = [(4, UNAVAILABLE)]  # after TASK's 2, 3, 4 and OTHER's 1
    seen = [(s.task_id, s.sequence) async for s in client.watch_many({TASK: 1, OTHER: 0})]
    assert seen == [(TASK, 2), (TASK, 3), (TASK, 4), (OTHER, 1), (OTHER, 2), (OTHER, 3)]
    requests = [(r.task_id, r.after_sequence) for r in fakes.notifier.watch_requests]
    assert requests == [(TASK, 1), (OTHER, 0), (OTHER, 1)]  # TASK had ended: not watched again


async def test_the_api_key_travels_as_a_bearer_token() -> None:
    fakes = Fakes(auth=Authenticator.from_entries([("acme", hash_key("s3cret"))]))
    await fakes.start()
    try:
        async with AsyncClient(fakes.ingest_address, fakes.notifier_address, api_key="s3cret") as client:
            assert await client.submit("sentiment", "great")
        assert fakes.ingest.metadata[0]["authorization"] == "Bearer s3cret"
        async with AsyncClient(fakes.ingest_address, fakes.notifier_address, api_key="wrong") as client:
            with pytest.raises(ClientError) as info:
                await client.submit("sentiment", "great")
        assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await fakes.stop()


async def test_mutual_tls(tmp_path: Path) -> None:
    authority = Authority()
    cert, key = authority.server().write(tmp_path, "server")
    ca = tmp_path / "ca.crt"
    ca.write_bytes(authority.cert_pem)
    client_cert, client_key = authority.client().write(tmp_path, "client")
    fakes = Fakes(tls=ServerTls(cert, key, client_ca_file=ca))
    await fakes.start()
    try:
        tls = ClientTls(ca_file=ca, cert_file=client_cert, key_file=client_key)
        async with AsyncClient(fakes.ingest_address, fakes.notifier_address, tls=tls) as client:
            assert await client.submit("sentiment", "great")
        no_cert = RetryPolicy.never()
        async with AsyncClient(fakes.ingest_address, tls=ClientTls(ca_file=ca), retry=no_cert) as client:
            with pytest.raises(ClientError) as info:
                await client.submit("sentiment", "great")
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        await fakes.stop()
    with pytest.raises(ValueError, match="both"):
        ClientTls(cert_file=client_cert)


def test_retry_info_is_read_from_the_status_details() -> None:
    error = ClientError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "busy",
        [error_details_pb2.RetryInfo(retry_delay=Duration(seconds=2, nanos=500_000_000))],
    )
    assert error.retry_delay_s == 2.5 and error.retryable and error.reason == ""
