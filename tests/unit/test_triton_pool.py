"""Several Triton servers behind one worker (``triton_pool``), against fake servers at the TritonInference seam: how
requests spread, how an unreachable server is marked down, routed around and brought back, what happens when all
are down, and that one entry (or a dns:/// name) is a single TritonInference as before."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from test_worker_poison_outcomes import FakeProgress, options
from triton_fakes import echoed
from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE, KeepAliveOptions
from tritonclient.utils import InferenceServerException

from aimesh import events
from aimesh.kafka import Record
from aimesh.metrics import WorkerMetrics
from aimesh.retry import RetryPolicy
from aimesh.v1 import result_pb2, task_pb2
from aimesh.worker import inference
from aimesh.worker.cancellation import Cancellations
from aimesh.worker.health import TritonHealth
from aimesh.worker.inference import Inference, InferenceFailed, ModelInfo, Token, TritonInference
from aimesh.worker.runner import TaskRunner
from aimesh.worker.triton_pool import BACKOFF_INITIAL_S, BACKOFF_MAX_S, TritonPool, connect, endpoints_of


def unreachable() -> InferenceFailed:
    return InferenceFailed(
        result_pb2.ERROR_CODE_UNAVAILABLE, "failed to connect to all addresses", retryable=True, unreachable=True
    )


class FakeServer:
    """One Triton server at the TritonInference seam. While ``down`` every call and probe fails as unreachable;
    ``ready`` is what its probe answers when it is not down; requests wait for ``hold`` while it is set up.
    ``stream`` yields ``tokens``, cut as unreachable after ``cut_after`` of them if that is set. ``back_after``: a
    down server comes back once it has refused that many calls."""

    def __init__(self, url: str, tokens: tuple[str, ...] = ("a", "b", "c")) -> None:
        self.url = url
        self.down = False
        self.ready = True
        self.error: InferenceFailed | None = None
        self.hold: asyncio.Event | None = None
        self.tokens = tokens
        self.cut_after: int | None = None
        self.calls = 0  # every call (infer_batch, stream, model_info), answered or not
        self.back_after: int | None = None
        self.requests: list[list[str]] = []  # those it answered
        self.probes = 0
        self.closed = False

    async def is_ready(self, timeout_s: float = 2.0) -> bool:
        self.probes += 1
        return self.ready and not self.down

    def _call(self) -> None:
        self.calls += 1
        if self.down and self.back_after is not None and self.calls > self.back_after:
            self.down = False
        if self.down:
            raise unreachable()

    async def infer_batch(self, model_name: str, texts: list[str], **_: object) -> list[Inference]:
        self._call()
        if self.error is not None:
            raise self.error
        if self.hold is not None:
            await self.hold.wait()
        self.requests.append(list(texts))
        return echoed(texts)

    async def model_info(self, model_name: str, model_version: str = "", *, timeout_s: float = 10.0) -> ModelInfo:
        self._call()
        return ModelInfo(decoupled=model_name == "generate", priority_levels=0)

    async def stream(self, model_name: str, text: str, **_: object) -> AsyncGenerator[Token, None]:
        self._call()
        for i, piece in enumerate(self.tokens):
            if self.cut_after is not None and i == self.cut_after:
                raise unreachable()
            yield Token(f"{self.url}:{piece}", i == len(self.tokens) - 1, "1")

    async def close(self) -> None:
        self.closed = True


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def pool_of(*servers: FakeServer, metrics: WorkerMetrics | None = None, clock: Clock | None = None) -> TritonPool:
    return TritonPool(servers, metrics=metrics, clock=clock or Clock())  # type: ignore[arg-type]


async def infer(pool: TritonPool, text: str = "x") -> str:
    [answer] = await pool.infer_batch("sleep", [text], timeout_s=5.0)
    return answer.output.tensors[0].string_data[0]


def exposed(metrics: WorkerMetrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())
        for s in family.samples
    }


def up(metrics: WorkerMetrics, endpoint: str) -> float:
    return exposed(metrics)[("aimesh_worker_triton_endpoint_up", frozenset({("endpoint", endpoint)}))]


def requests(metrics: WorkerMetrics, endpoint: str, outcome: str) -> float:
    labels = frozenset({("endpoint", endpoint), ("outcome", outcome)})
    return exposed(metrics)[("aimesh_worker_triton_endpoint_requests_total", labels)]


# --- spreading ------------------------------------------------------------------------------------------------


async def test_requests_one_at_a_time_alternate_and_concurrent_ones_split_evenly() -> None:
    a, b = FakeServer("a:8001"), FakeServer("b:8001")
    pool = pool_of(a, b)
    for i in range(4):
        assert await infer(pool, f"t{i}") == f"t{i}"
    assert (a.requests, b.requests) == ([["t0"], ["t2"]], [["t1"], ["t3"]])

    a.hold, b.hold = asyncio.Event(), asyncio.Event()
    batches = [asyncio.ensure_future(infer(pool, f"c{i}")) for i in range(6)]
    await asyncio.sleep(0)  # every request picks its endpoint before the first is answered
    a.hold.set()
    b.hold.set()
    assert await asyncio.gather(*batches) == [f"c{i}" for i in range(6)]
    assert len(a.requests) == len(b.requests) == 2 + 3


async def test_an_endpoint_with_a_request_outstanding_gets_no_new_one_while_another_is_idle() -> None:
    a, b = FakeServer("a:8001"), FakeServer("b:8001")
    pool = pool_of(a, b)
    a.hold = asyncio.Event()
    slow = asyncio.ensure_future(infer(pool, "slow"))
    await asyncio.sleep(0)
    assert a.calls == 1
    for i in range(3):  # round robin would have given a the second of these
        assert await infer(pool, f"t{i}") == f"t{i}"
    assert b.requests == [["t0"], ["t1"], ["t2"]]
    a.hold.set()
    assert await slow == "slow" and a.requests == [["slow"]]


# --- marking down, routing around, coming back ----------------------------------------------------------------


async def test_a_request_refused_by_an_unreachable_endpoint_is_answered_by_another_and_the_endpoint_marked_down() -> (
    None
):
    metrics = WorkerMetrics()
    a, b = FakeServer("a:8001"), FakeServer("b:8001")
    pool = pool_of(a, b, metrics=metrics)
    assert up(metrics, "a:8001") == up(metrics, "b:8001") == 1
    a.down = True
    assert await infer(pool, "first") == "first"  # no error: it went to b
    assert (a.calls, b.requests) == (1, [["first"]])
    assert up(metrics, "a:8001") == 0 and up(metrics, "b:8001") == 1
    assert requests(metrics, "a:8001", "unreachable") == 1 and requests(metrics, "b:8001", "ok") == 1

    for i in range(3):
        assert await infer(pool, f"t{i}") == f"t{i}"
    assert a.calls == 1 and len(b.requests) == 4  # nothing more sent to the down endpoint
    assert await pool.model_info("sleep") == ModelInfo(decoupled=False, priority_levels=0)


async def test_a_down_endpoint_is_probed_after_its_backoff_doubling_and_comes_back_when_ready() -> None:
    clock, metrics = Clock(), WorkerMetrics()
    a, b = FakeServer("a:8001"), FakeServer("b:8001")
    pool = pool_of(a, b, metrics=metrics, clock=clock)
    a.down = True
    await infer(pool)  # a fails: down, first probe after BACKOFF_INITIAL_S

    clock.now += BACKOFF_INITIAL_S / 2
    assert await pool.is_ready() is True
    assert (a.probes, b.probes) == (0, 1)  # the up endpoint is probed, the down one waits for its backoff
    clock.now += BACKOFF_INITIAL_S / 2
    assert await pool.is_ready() is True
    assert a.probes == 1  # due: probed, still down; the next probe waits twice as long
    clock.now += 2 * BACKOFF_INITIAL_S - 0.01
    await pool.is_ready()
    assert a.probes == 1

    a.down = False
    clock.now += 0.01
    await pool.is_ready()
    assert a.probes == 2 and up(metrics, "a:8001") == 1
    for i in range(4):
        await infer(pool, f"back{i}")
    assert a.requests == [["back0"], ["back2"]] or a.requests == [["back1"], ["back3"]]


async def test_the_backoff_is_capped_and_a_successful_call_resets_it() -> None:
    clock = Clock()
    a, b = FakeServer("a:8001"), FakeServer("b:8001")
    pool = pool_of(a, b, clock=clock)
    a.down = True
    await infer(pool)
    for _ in range(10):  # ten failed probes, each when due
        clock.now += BACKOFF_MAX_S
        await pool.is_ready()
    assert a.probes == 10
    a.down = False
    clock.now += BACKOFF_MAX_S  # never longer than the cap, however many failures
    await pool.is_ready()
    assert a.probes == 11
    await infer(pool)
    await infer(pool)  # one of these reached a, resetting its failures
    assert len(a.requests) == 1

    a.down = True
    await infer(pool)
    await infer(pool)
    clock.now += BACKOFF_INITIAL_S
    await pool.is_ready()
    assert a.probes == 12  # probed again after the initial backoff, not the capped one


async def test_a_server_whose_probe_says_not_ready_is_taken_out_before_a_call_fails_on_it() -> None:
    a, b = FakeServer("a:8001"), FakeServer("b:8001")
    pool = pool_of(a, b)
    a.ready = False  # shutting down gracefully: it still answers, but says it is not ready
    assert await pool.is_ready() is True
    for i in range(3):
        await infer(pool, f"t{i}")
    assert a.calls == 0 and len(b.requests) == 3


async def test_with_every_endpoint_down_the_error_reaches_the_caller_and_every_check_probes_all() -> None:
    clock = Clock()
    a, b = FakeServer("a:8001"), FakeServer("b:8001")
    pool = pool_of(a, b, clock=clock)
    a.down = b.down = True
    with pytest.raises(InferenceFailed) as failed:
        await infer(pool)
    assert failed.value.retryable and failed.value.unreachable
    assert (a.calls, b.calls) == (1, 1)  # each tried once

    with pytest.raises(InferenceFailed):
        await infer(pool)
    assert a.calls + b.calls == 3  # with none up, a request still goes to one of them, as to a single server

    assert await pool.is_ready() is False
    assert (a.probes, b.probes) == (1, 1)  # before any backoff passed: with none up, all are probed
    b.down = False
    assert await pool.is_ready() is True  # the outage ends at the first check that finds one ready
    assert await infer(pool, "after") == "after" and b.requests == [["after"]]


async def test_a_request_while_all_are_marked_down_brings_back_the_endpoint_that_answers_it() -> None:
    metrics = WorkerMetrics()
    a, b = FakeServer("a:8001"), FakeServer("b:8001")
    pool = pool_of(a, b, metrics=metrics)
    a.down = b.down = True
    with pytest.raises(InferenceFailed):
        await infer(pool)
    a.down = b.down = False
    assert await infer(pool, "x") == "x"
    assert up(metrics, "a:8001") + up(metrics, "b:8001") == 1


async def test_errors_other_than_unreachable_are_not_routed_around() -> None:
    a, b = FakeServer("a:8001"), FakeServer("b:8001")
    metrics = WorkerMetrics()
    pool = pool_of(a, b, metrics=metrics)
    for error in (
        InferenceFailed(result_pb2.ERROR_CODE_INVALID_INPUT, "bad parameter", retryable=False),
        InferenceFailed(result_pb2.ERROR_CODE_DEADLINE_EXCEEDED, "Deadline Exceeded", retryable=True),
        InferenceFailed(result_pb2.ERROR_CODE_UNAVAILABLE, "overloaded", retryable=True),  # RESOURCE_EXHAUSTED
    ):
        a.error = error
        b.error = error
        with pytest.raises(InferenceFailed) as failed:
            await infer(pool)
        assert failed.value is error
    assert a.calls + b.calls == 3  # one try each: the server answered, another would answer the same
    assert up(metrics, "a:8001") == up(metrics, "b:8001") == 1
    assert requests(metrics, "a:8001", "error") + requests(metrics, "b:8001", "error") == 3


# --- streams ------------------------------------------------------------------------------------------------


async def tokens_of(pool: TritonPool) -> list[str]:
    stream = pool.stream("generate", "hi", timeout_s=5.0, stop=asyncio.Event())
    return [token.text async for token in stream]


async def test_a_stream_stays_on_one_endpoint_and_moves_only_before_its_first_response() -> None:
    a, b = FakeServer("a:8001"), FakeServer("b:8001")
    pool = pool_of(a, b)
    assert await tokens_of(pool) == ["a:8001:a", "a:8001:b", "a:8001:c"]

    b.down = True  # b's turn, but unreachable before any response: the stream moves to a
    assert await tokens_of(pool) == ["a:8001:a", "a:8001:b", "a:8001:c"]
    assert b.calls == 1

    b.down = False
    a.cut_after = 1  # cut after its first response: the error reaches the worker, whose retry runs it again
    seen: list[str] = []
    with pytest.raises(InferenceFailed) as failed:
        async for token in pool.stream("generate", "hi", timeout_s=5.0, stop=asyncio.Event()):
            seen.append(token.text)
    assert seen == ["a:8001:a"] and failed.value.unreachable
    assert b.calls == 1  # not continued on another server
    assert await tokens_of(pool) == ["b:8001:a", "b:8001:b", "b:8001:c"]  # a is down now


async def test_a_stream_closed_early_frees_its_endpoint() -> None:
    a, b = FakeServer("a:8001"), FakeServer("b:8001")
    pool = pool_of(a, b)
    stream = pool.stream("generate", "hi", timeout_s=5.0, stop=asyncio.Event())
    assert (await anext(stream)).text == "a:8001:a"
    await stream.aclose()
    assert [e.outstanding for e in pool.endpoints] == [0, 0]


# --- the worker on a pool -------------------------------------------------------------------------------------


def make_runner(pool: TritonPool, metrics: WorkerMetrics) -> TaskRunner:
    return TaskRunner.of(
        options(),
        triton=pool,
        progress=FakeProgress(),  # type: ignore[arg-type]
        health=TritonHealth(pool.is_ready, interval_s=1.0),
        cancellations=Cancellations(3600.0),
        metrics=metrics,
        retry=RetryPolicy(initial_s=0.001, max_s=0.01, budget_s=5.0),
        group="test",
    )


def task_record(task_id: str) -> Record:
    task = task_pb2.AITaskEvent(
        schema_version=events.SCHEMA_VERSION,
        task_id=task_id,
        model_name="sleep",
        input=task_pb2.TaskInput(text=task_id),
    )
    return Record("aimesh.tasks", 0, 0, task_id.encode(), task.SerializeToString(), [])


def retried(metrics: WorkerMetrics) -> float:
    return sum(v for (name, _), v in exposed(metrics).items() if name == "aimesh_worker_retries_total")


async def test_a_task_whose_first_endpoint_is_dead_succeeds_without_a_retry() -> None:
    a, b = FakeServer("a:8001"), FakeServer("b:8001")
    a.down = True
    metrics = WorkerMetrics()
    outcome = await make_runner(pool_of(a, b, metrics=metrics), metrics).handle(task_record("t1"))
    [record] = [r for r in outcome.records if r.topic == "aimesh.results"]
    assert events.decode_result(record.value).status == result_pb2.TASK_STATUS_SUCCEEDED
    assert (a.requests, b.requests) == ([], [["t1"]])  # the model's configuration query found a down already
    assert retried(metrics) == 0  # routed around inside the pool: no retry, no backoff, no budget spent


async def test_with_every_endpoint_down_a_task_retries_as_with_one_server_and_succeeds_when_one_is_back() -> None:
    a, b = FakeServer("a:8001"), FakeServer("b:8001")
    a.down = b.down = True
    b.back_after = 2  # refuses the first try and the first retry
    metrics = WorkerMetrics()
    outcome = await make_runner(pool_of(a, b, metrics=metrics), metrics).handle(task_record("t1"))
    [record] = [r for r in outcome.records if r.topic == "aimesh.results"]
    assert events.decode_result(record.value).status == result_pb2.TASK_STATUS_SUCCEEDED
    assert retried(metrics) >= 2 and b.requests == [["t1"]]


# --- AIMESH_TRITON_URL ------------------------------------------------------------------------------------------


def test_one_entry_is_one_server_as_before_and_a_list_is_a_pool() -> None:
    single = connect("127.0.0.1:8001")
    assert type(single) is TritonInference and single.url == "127.0.0.1:8001" and single.channel_args is None
    assert type(connect("triton")) is TritonInference  # one entry is passed on as written
    pool = connect(" triton-0:8001, triton-1:8001 ,[::1]:8001")
    assert isinstance(pool, TritonPool)
    assert [e.url for e in pool.endpoints] == ["triton-0:8001", "triton-1:8001", "[::1]:8001"]
    assert all(type(e.triton) is TritonInference for e in pool.endpoints)
    [args] = {json.dumps(e.triton.channel_args) for e in pool.endpoints}  # type: ignore[attr-defined]
    assert dict(json.loads(args))["grpc.max_reconnect_backoff_ms"] == BACKOFF_MAX_S * 1000


@pytest.mark.parametrize(
    "url", ["", "a:8001,,b:8001", "a:8001,a:8001", "a,b:8001", "a:8001,b:0", "dns:///triton:8001,b:8001"]
)
def test_a_list_that_is_not_distinct_host_port_entries_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match="AIMESH_TRITON_URL"):
        endpoints_of(url)


async def test_a_dns_target_gets_one_channel_with_round_robin_and_tritonclients_other_options(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made: list[tuple[str, Any]] = []

    class Client:
        def __init__(self, url: str, channel_args: Any = None) -> None:
            made.append((url, channel_args))

        async def close(self) -> None:
            pass

    monkeypatch.setattr(inference.triton_aio, "InferenceServerClient", Client)
    async with connect("dns:///triton-headless.ml.svc.cluster.local:8001") as triton:
        assert type(triton) is TritonInference
    [(url, args)] = made
    assert url == "dns:///triton-headless.ml.svc.cluster.local:8001"
    options = dict(args)
    config = json.loads(options.pop("grpc.service_config"))
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    [method] = config["methodConfig"]
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    keepalive = KeepAliveOptions()
    assert options == {  # what tritonclient sets when given no channel_args, which replace them
        "grpc.max_send_message_length": MAX_GRPC_MESSAGE_SIZE,
        "grpc.max_receive_message_length": MAX_GRPC_MESSAGE_SIZE,
        "grpc.keepalive_time_ms": keepalive.keepalive_time_ms,
        "grpc.keepalive_timeout_ms": keepalive.keepalive_timeout_ms,
        "grpc.keepalive_permit_without_calls": keepalive.keepalive_permit_without_calls,
        "grpc.http2.max_pings_without_data": keepalive.http2_max_pings_without_data,
        "grpc.max_reconnect_backoff_ms": BACKOFF_MAX_S * 1000,
    }


@pytest.mark.parametrize(
    ("status", "unreachable"),
    [("StatusCode.UNAVAILABLE", True), ("StatusCode.RESOURCE_EXHAUSTED", False), ("StatusCode.INTERNAL", False)],
)
async def test_only_unavailable_marks_a_call_unreachable(status: str, unreachable: bool) -> None:
    class Client:
        async def infer(self, *args: Any, **kwargs: Any) -> Any:
            raise InferenceServerException("no", status=status)

    triton = TritonInference("fake:8001")
    triton._client = Client()  # type: ignore[assignment]
    with pytest.raises(InferenceFailed) as failed:
        await triton.infer_batch("sleep", ["x"], timeout_s=1.0)
    assert failed.value.unreachable is unreachable


async def test_closing_the_pool_closes_every_server() -> None:
    a, b = FakeServer("a:8001"), FakeServer("b:8001")
    async with pool_of(a, b):
        pass
    assert a.closed and b.closed
