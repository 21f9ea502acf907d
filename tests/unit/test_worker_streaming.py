"""The worker's streaming, cancellation and priority logic, against a fake Triton at the TritonInference seam and a
fake progress producer (no Kafka, no Triton)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import pytest
from test_worker_poison_outcomes import options
from triton_fakes import echoed

from aimesh import events
from aimesh.kafka import Record
from aimesh.metrics import WorkerMetrics
from aimesh.retry import RetryPolicy
from aimesh.v1 import result_pb2, task_pb2
from aimesh.worker import runner as runner_module
from aimesh.worker.cancellation import Cancellations
from aimesh.worker.health import TritonHealth
from aimesh.worker.inference import Inference, InferenceFailed, ModelInfo, Token
from aimesh.worker.ledger import Ledger, Outcome
from aimesh.worker.results import derived_seed
from aimesh.worker.runner import TaskRunner
from aimesh.worker.scheduler import Scheduler

TASKS, BATCH, RESULTS = "aimesh.tasks", "aimesh.tasks.batch", "aimesh.results"
TASK_ID = "6f1c2a4e-3b7d-4e8a-9c0f-1a2b3c4d5e6f"


class FakeTriton:
    """``generate`` streams ``tokens``; ``sleep`` (priority levels) and ``plain`` (none) echo their text.

    ``cut_after``: the first stream attempts are cut by UNAVAILABLE after that many tokens (once per entry).
    ``hold_after``: after that many tokens the stream waits until ``stop`` is set (a long generation)."""

    url = "fake:8001"

    def __init__(
        self,
        tokens: list[str],
        *,
        cut_after: list[int] | None = None,
        hold_after: int | None = None,
        delay_s: float = 0.0,
    ) -> None:
        self.tokens = tokens
        self.cut_after = list(cut_after or [])
        self.hold_after = hold_after
        self.delay_s = delay_s
        self.streams: list[dict[str, str]] = []
        self.stopped = 0
        self.requests: list[tuple[str, list[str], int]] = []

    async def is_ready(self) -> bool:
        return True

    async def model_info(self, model: str, version: str = "") -> ModelInfo:
        if model == "ghost":
            raise InferenceFailed(result_pb2.ERROR_CODE_MODEL_NOT_FOUND, "unknown model 'ghost'", retryable=False)
        return ModelInfo(decoupled=model == "generate", priority_levels=2 if model == "sleep" else 0)

    async def infer_batch(self, model: str, texts: list[str], *, priority: int = 0, **_: object) -> list[Inference]:
        self.requests.append((model, list(texts), priority))
        await asyncio.sleep(self.delay_s)
        if model == "ghost":
            raise InferenceFailed(result_pb2.ERROR_CODE_MODEL_NOT_FOUND, "unknown model 'ghost'", retryable=False)
        return echoed(texts)

    async def stream(
        self,
        model: str,
        text: str,
        *,
        parameters: dict[str, str],
        timeout_s: float,
        stop: asyncio.Event,
        **_: object,
    ) -> AsyncGenerator[Token, None]:
        self.streams.append(dict(parameters))
        cut = self.cut_after.pop(0) if self.cut_after else None
        started = time.monotonic()
        for i, piece in enumerate(self.tokens):
            if cut is not None and i == cut:
                raise InferenceFailed(result_pb2.ERROR_CODE_UNAVAILABLE, "Socket closed", retryable=True)
            if self.hold_after is not None and i == self.hold_after:
                try:
                    await asyncio.wait_for(stop.wait(), max(0.0, timeout_s - (time.monotonic() - started)))
                except TimeoutError:
                    raise InferenceFailed(
                        result_pb2.ERROR_CODE_DEADLINE_EXCEEDED, "Deadline Exceeded", retryable=True
                    ) from None
            if stop.is_set():
                self.stopped += 1
                return
            await asyncio.sleep(0)
            yield Token(piece, i == len(self.tokens) - 1, "1")


class FakeProgress:
    """Records what the worker sends through its non-transactional producer, in order."""

    def __init__(self) -> None:
        self.sent: list[result_pb2.AIResultEvent] = []

    def produce_detached(self, topic: str, *, key: str, value: bytes, headers: Any = None) -> None:
        assert topic == RESULTS
        event = events.decode_result(value)
        assert event.task_id == key
        self.sent.append(event)

    def produce_nowait(self, topic: str, *, key: str, value: bytes, headers: Any = None) -> asyncio.Future[None]:
        self.produce_detached(topic, key=key, value=value, headers=headers)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future


def make_runner(triton: FakeTriton, progress: FakeProgress) -> TaskRunner:
    return TaskRunner.of(
        options(batch_tasks_topic=BATCH),
        triton=triton,  # type: ignore[arg-type]
        progress=progress,  # type: ignore[arg-type]
        health=TritonHealth(triton.is_ready, interval_s=1.0),
        cancellations=Cancellations(3600.0),
        metrics=WorkerMetrics(),
        retry=RetryPolicy(initial_s=0.001, max_s=0.01, budget_s=5.0),
        group="test",
    )


def task_record(
    model: str = "generate",
    *,
    task_id: str = TASK_ID,
    topic: str = TASKS,
    tenant: str = "acme",
    parameters: dict[str, str] | None = None,
    deadline_s: float | None = None,
    offset: int = 0,
) -> Record:
    task = task_pb2.AITaskEvent(
        schema_version=events.SCHEMA_VERSION,
        task_id=task_id,
        model_name=model,
        input=task_pb2.TaskInput(text="Kafka"),
        parameters=parameters or {},
        tenant=tenant,
    )
    task.submitted_at.GetCurrentTime()
    if deadline_s is not None:
        task.deadline.FromNanoseconds(int((time.time() + deadline_s) * 1e9))
    return Record(topic, 0, offset, task_id.encode(), task.SerializeToString(), [])


def terminal(outcome: Outcome) -> result_pb2.AIResultEvent:
    [record] = [r for r in outcome.records if r.topic == RESULTS]
    result = events.decode_result(record.value)
    assert events.is_terminal(result.status)
    return result


def text_of(event: result_pb2.AIResultEvent) -> str:
    [tensor] = event.output.tensors
    assert (tensor.name, tensor.datatype) == ("TEXT", "BYTES")
    return "".join(tensor.string_data)


async def test_each_token_is_a_partial_update_in_order_and_the_result_holds_the_whole_text() -> None:
    triton, progress = FakeTriton([" to", " a", " notifier"]), FakeProgress()
    result = terminal(await make_runner(triton, progress).handle(task_record()))

    assert [(e.status, e.sequence, e.partial) for e in progress.sent] == [
        (result_pb2.TASK_STATUS_RUNNING, events.RUNNING_SEQUENCE, False),
        (result_pb2.TASK_STATUS_RUNNING, 3, True),
        (result_pb2.TASK_STATUS_RUNNING, 4, True),
        (result_pb2.TASK_STATUS_RUNNING, 5, True),
    ]
    assert [text_of(e) for e in progress.sent[1:]] == [" to", " a", " notifier"]
    assert all(e.tenant == "acme" and e.task_id == TASK_ID for e in progress.sent)
    assert result.status == result_pb2.TASK_STATUS_SUCCEEDED
    assert result.sequence == 6 and not result.partial
    assert text_of(result) == " to a notifier"


async def test_a_task_without_a_seed_gets_one_derived_from_its_id_and_a_given_seed_is_kept() -> None:
    triton, progress = FakeTriton([" x"]), FakeProgress()
    runner = make_runner(triton, progress)
    await runner.handle(task_record())
    await runner.handle(task_record(parameters={"seed": "7", "max_tokens": "3"}))
    assert triton.streams == [{"seed": str(derived_seed(TASK_ID))}, {"seed": "7", "max_tokens": "3"}]
    assert derived_seed(TASK_ID) == derived_seed(TASK_ID) != derived_seed(TASK_ID.replace("6", "7"))
    assert 0 <= derived_seed(TASK_ID) < 2**63


async def test_a_stream_with_no_text_ends_with_sequence_3_and_unary_results_too() -> None:
    triton, progress = FakeTriton([""]), FakeProgress()
    runner = make_runner(triton, progress)
    streamed = terminal(await runner.handle(task_record()))
    assert (streamed.status, streamed.sequence, text_of(streamed)) == (result_pb2.TASK_STATUS_SUCCEEDED, 3, "")
    unary = terminal(await runner.handle(task_record("plain", offset=1)))
    assert (unary.status, unary.sequence) == (result_pb2.TASK_STATUS_SUCCEEDED, events.FIRST_PARTIAL_SEQUENCE)
    assert [e.sequence for e in progress.sent] == [2, 2]  # RUNNING twice, no partial for an empty token


async def test_a_stream_cut_by_unavailable_is_retried_from_the_start_under_the_same_sequences() -> None:
    triton, progress = FakeTriton([" a", " b", " c"], cut_after=[2]), FakeProgress()
    result = terminal(await make_runner(triton, progress).handle(task_record()))
    partials = [(e.sequence, text_of(e)) for e in progress.sent if e.partial]
    assert partials == [(3, " a"), (4, " b"), (3, " a"), (4, " b"), (5, " c")]
    assert len(triton.streams) == 2 and triton.streams[0] == triton.streams[1]  # same seed: same tokens
    assert (result.status, result.sequence, text_of(result)) == (result_pb2.TASK_STATUS_SUCCEEDED, 6, " a b c")


async def test_a_stream_that_reaches_the_deadline_expires_with_the_text_so_far() -> None:
    triton, progress = FakeTriton([" a", " b", " c"], hold_after=2), FakeProgress()
    result = terminal(await make_runner(triton, progress).handle(task_record(deadline_s=0.3)))
    assert result.status == result_pb2.TASK_STATUS_EXPIRED
    assert result.error.code == result_pb2.ERROR_CODE_DEADLINE_EXCEEDED
    assert result.sequence == 5  # partials 3 and 4 went out
    assert text_of(result) == " a b"


async def test_a_cancelled_task_is_never_run_and_ends_cancelled() -> None:
    triton, progress = FakeTriton([" a"]), FakeProgress()
    runner = make_runner(triton, progress)
    runner.cancellations.add(TASK_ID, "acme")
    result = terminal(await runner.handle(task_record()))
    assert result.status == result_pb2.TASK_STATUS_CANCELLED
    assert "cancelled by the client" in result.error.message
    assert result.sequence == events.FIRST_PARTIAL_SEQUENCE
    assert triton.streams == [] and progress.sent == []  # not run, not even announced RUNNING
    assert [r.topic for r in (await runner.handle(task_record(offset=1))).records] == [RESULTS]  # no dead letter


async def test_a_cancellation_from_another_tenant_is_ignored() -> None:
    triton, progress = FakeTriton([" a"]), FakeProgress()
    runner = make_runner(triton, progress)
    runner.cancellations.add(TASK_ID, "mallory")
    runner.stop_stream(TASK_ID, "mallory")
    result = terminal(await runner.handle(task_record()))
    assert result.status == result_pb2.TASK_STATUS_SUCCEEDED


async def test_a_running_stream_is_cancelled_in_triton_and_ends_cancelled_with_the_text_so_far() -> None:
    triton, progress = FakeTriton([" a", " b", " c", " d"], hold_after=2), FakeProgress()
    runner = make_runner(triton, progress)
    handled = asyncio.create_task(runner.handle(task_record()))
    while len([e for e in progress.sent if e.partial]) < 2:  # noqa: ASYNC110 - polling a fake's record
        await asyncio.sleep(0.01)
    runner.cancellations.add(TASK_ID, "acme")
    runner.stop_stream(TASK_ID, "acme")  # what the reader thread schedules on the loop
    result = terminal(await asyncio.wait_for(handled, 5))
    assert triton.stopped == 1
    assert result.status == result_pb2.TASK_STATUS_CANCELLED
    assert (result.sequence, text_of(result)) == (5, " a b")
    assert "while it ran" in result.error.message


async def test_a_unary_task_cancelled_while_it_waits_to_join_a_request_is_not_sent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    triton, progress = FakeTriton([], delay_s=0.2), FakeProgress()
    # One request outstanding per model: later tasks wait in the queue.
    monkeypatch.setattr(runner_module, "MAX_CONCURRENT_REQUESTS", 1)
    runner = make_runner(triton, progress)
    ids = [f"00000000-0000-4000-8000-00000000000{i}" for i in range(6)]
    records = [task_record("plain", task_id=i, offset=n) for n, i in enumerate(ids)]
    handled = [asyncio.create_task(runner.handle(records[0]))]
    await asyncio.sleep(0.05)  # the first task's request is out; the others start together and wait
    handled += [asyncio.create_task(runner.handle(r)) for r in records[1:]]
    await asyncio.sleep(0.05)
    runner.cancellations.add(ids[5], "acme")
    results = [terminal(o) for o in await asyncio.gather(*handled)]
    assert [r.status for r in results] == [result_pb2.TASK_STATUS_SUCCEEDED] * 5 + [result_pb2.TASK_STATUS_CANCELLED]
    assert [texts for _, texts, _ in triton.requests] == [["Kafka"], ["Kafka"] * 4]


@pytest.mark.parametrize(
    ("model", "topic", "priority"), [("sleep", TASKS, 1), ("sleep", BATCH, 2), ("plain", BATCH, 0)]
)
async def test_triton_request_priority_follows_the_task_class_for_models_with_priority_levels(
    model: str, topic: str, priority: int
) -> None:
    triton, progress = FakeTriton([]), FakeProgress()
    await make_runner(triton, progress).handle(task_record(model, topic=topic))
    assert [p for _, _, p in triton.requests] == [priority]


@dataclass
class Gated:
    """A scheduler owning partition 0 of both tasks topics whose tasks record their topic as they start, then wait
    for ``gate``."""

    scheduler: Scheduler
    ledger: Ledger
    started: list[str]
    gate: asyncio.Event

    def enqueue(self, topic: str, count: int) -> None:
        """Hand the scheduler records at offsets 0..count-1 of ``topic``'s partition 0, as the consumer thread
        would."""
        for offset in range(count):
            partition = self.ledger.fetched((topic, 0), offset)
            assert partition is not None
            self.scheduler.enqueue(task_record("sleep", topic=topic, offset=offset), partition)


def gated(*, max_in_flight: int) -> Gated:
    started: list[str] = []
    gate = asyncio.Event()

    async def process(record: Record, partition: object) -> None:
        started.append(record.topic)
        await gate.wait()

    ledger = Ledger()
    ledger.assign([(TASKS, 0), (BATCH, 0)])
    scheduler = Scheduler(process, max_in_flight=max_in_flight, batch_tasks_topic=BATCH, stopped=threading.Event())
    return Gated(scheduler, ledger, started, gate)


async def test_free_slots_go_to_interactive_tasks_before_batch_ones() -> None:
    tasks = gated(max_in_flight=1)
    started = tasks.started
    tasks.enqueue(BATCH, 3)
    tasks.enqueue(TASKS, 2)
    assert tasks.scheduler.backlog_sizes == {"interactive": 2, "batch": 2}
    tasks.gate.set()
    while len(started) < 5:  # noqa: ASYNC110 - polling what the fake recorded
        await asyncio.sleep(0.01)
    # The first batch task took the free slot before any interactive one arrived; after that interactive first.
    assert started == [BATCH, TASKS, TASKS, BATCH, BATCH]


async def test_batch_tasks_leave_a_quarter_of_the_slots_to_interactive_ones() -> None:
    tasks = gated(max_in_flight=8)
    started = tasks.started
    tasks.enqueue(BATCH, 10)
    await asyncio.sleep(0.01)
    assert started == [BATCH] * 6  # 8 slots, 2 of them kept for interactive tasks
    tasks.enqueue(TASKS, 3)
    await asyncio.sleep(0.01)
    assert started == [BATCH] * 6 + [TASKS] * 2  # at once, though 4 batch tasks still wait
    tasks.gate.set()
    while len(started) < 13:  # noqa: ASYNC110 - polling what the fake recorded
        await asyncio.sleep(0.01)
    assert sorted(started[8:]) == sorted([TASKS] + [BATCH] * 4)


async def test_a_model_triton_has_no_configuration_for_fails_through_the_unary_call() -> None:
    triton, progress = FakeTriton([]), FakeProgress()
    outcome = await make_runner(triton, progress).handle(task_record("ghost"))
    result = terminal(outcome)
    assert (result.status, result.error.code) == (result_pb2.TASK_STATUS_FAILED, result_pb2.ERROR_CODE_MODEL_NOT_FOUND)
    assert [m for m, _, _ in triton.requests] == ["ghost"]  # the infer call ran (and its span with it)
    assert [r.topic for r in outcome.records] == [RESULTS, "aimesh.tasks.dlq"]
