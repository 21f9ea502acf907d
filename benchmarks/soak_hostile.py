"""The soak's hostile inputs, a few every minute: texts near the size limits, absurd and past deadlines (one of them
inside an otherwise ordinary batch), bad and Triton-reserved parameters, task ids in non-canonical forms, a
non-ASCII digit as a model version, and clients that open a watch and never read it.

Each answer is tallied by probe and status code. A refusal must carry a documented status; an accepted task joins
the ledger like any other and must end exactly once.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Awaitable, Sequence
from typing import Any

import grpc

from aimesh.v1 import ingest_pb2, ingest_pb2_grpc, notifier_pb2, notifier_pb2_grpc, task_pb2
from benchmarks.soak_load import SENTENCES, Tally

# README "Contracts": what SubmitTask and the notifier's lookups may answer to a caller's mistake.
SUBMIT_STATUSES = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED"}
LOOKUP_STATUSES = {"OK", "INVALID_ARGUMENT", "NOT_FOUND"}
# A watch of an id that never resolves waits; the probe's own deadline ends it.
WATCH_STATUSES = LOOKUP_STATUSES | {"DEADLINE_EXCEEDED"}
# A watch whose client never reads may be ended by the server in any documented way; only a crash is wrong.
UNREAD_STATUSES = {"open", "OK", "CANCELLED", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "UNAVAILABLE"}
UNREAD_HOLD_S = 45.0
NEAR_LIMIT_BYTES = [100, 600, 2_000, 20_000]  # below AIMESH_MAX_TEXT_BYTES
# Issue 11's poison outcome: a text whose task record fits a Kafka record and whose echoed result, a few dozen bytes
# larger, does not (999,770 bytes there). The band is narrow and moves with the records' other fields, so each round
# sweeps it in 25-byte steps, shifted by 5 bytes a round.
BAND_UNDER_BYTES = range(150, 300, 25)
# The warm-up's burst of near-limit texts: enough for several requests of the largest size on each `sleep` instance.
LARGEST_REQUESTS = 24
LARGEST_REQUESTS_DELAY_MS = 300
FAR_FUTURE_S = 10**13  # issue 11: once overflowed the worker's Triton queue timeout

BAD_PARAMETERS: list[tuple[str, dict[str, str]]] = [
    ("summarize", {"sentences": "abc"}),
    ("summarize", {"sentences": "0"}),
    ("sleep", {"delay_ms": "-1"}),
    ("sleep", {"delay_ms": "99999999"}),
    ("generate", {"max_tokens": "100000"}),
    ("generate", {"temperature": "nan"}),
    ("sentiment", {"priority": "1"}),
    ("sentiment", {"timeout": "1"}),
    ("embed", {"sequence_id": "5"}),
    ("sentiment", {"binary_data_output": "true"}),
    ("sentiment", {"x" * 10_000: "1"}),
    ("summarize", {"sentences": "٣"}),  # a non-ASCII digit
]


def non_canonical(task_id: str) -> list[str]:
    """The same UUID as braces, urn, upper case and bare hex: equal to ``task_id`` to a UUID parser, not as text."""
    value = uuid.UUID(task_id)
    return [f"{{{task_id}}}", value.urn, task_id.upper(), value.hex]


class Hostile:
    """One round of probes a minute, each on the harness's own raw gRPC stubs (no retries, short deadlines)."""

    def __init__(
        self,
        ingest_address: str,
        notifier_address: str,
        metadata: tuple[tuple[str, str], ...],
        tally: Tally,
        rng: random.Random,
        *,
        max_text_bytes: int,
    ) -> None:
        self._channels = [grpc.aio.insecure_channel(a) for a in (ingest_address, notifier_address)]
        self._unread_address = notifier_address
        self._ingest = ingest_pb2_grpc.IngestServiceStub(self._channels[0])
        self._notifier = notifier_pb2_grpc.NotifierServiceStub(self._channels[1])
        self._metadata = metadata
        self._tally = tally
        self._rng = rng
        self._max_text_bytes = max_text_bytes
        self._unread: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        for task in list(self._unread):
            task.cancel()
        await asyncio.gather(*self._unread, return_exceptions=True)
        for channel in self._channels:
            await channel.close()

    async def round(self, index: int, recent_ids: Sequence[str]) -> None:
        if index == 0:
            await self._largest_requests()
        large = await self._oversize_texts(index)
        await self._deadlines(index)
        for model, parameters in self._rng.sample(BAD_PARAMETERS, 3):
            await self._submit(f"parameters {model} {sorted(parameters)[0][:20]}", self._request(model, parameters))
        await self._submit("model version non-ASCII digit", self._request("sentiment", model_version="٣"))
        if recent_ids:
            await self._non_canonical_ids(self._rng.choice(list(recent_ids)))
            self._start_unread(large, list(recent_ids)[-50:])

    # --- probes ---------------------------------------------------------------------------------------------
    async def _largest_requests(self) -> None:
        """Near-limit texts all at once (the warm-up's round): Triton requests of the largest size the worker sends
        (AIMESH_MAX_REQUEST_BYTES), several in flight on every ``sleep`` instance, so that the Python backend's
        shared-memory regions reach their high-water mark before the window rather than at a chance moment in it."""
        text = "x" * (self._max_text_bytes - NEAR_LIMIT_BYTES[-1])
        parameters = {"delay_ms": str(LARGEST_REQUESTS_DELAY_MS)}
        await asyncio.gather(
            *[
                self._submit("largest requests (warm-up)", self._request("sleep", parameters, text=text))
                for _ in range(LARGEST_REQUESTS)
            ]
        )

    async def _oversize_texts(self, index: int) -> list[str]:
        """Over the text limit, and sizes just under it whose record, or echoed result, may not fit a Kafka record;
        the ids of those accepted."""
        limit = self._max_text_bytes
        await self._submit("text over the limit", self._request("sleep", text="x" * (limit + 1)))
        accepted = []
        for under in NEAR_LIMIT_BYTES:
            task_id = await self._submit(f"text of limit-{under}", self._request("sleep", text="x" * (limit - under)))
            accepted += [task_id] if task_id else []
        for under in BAND_UNDER_BYTES:
            text = "x" * (limit - under - index * 5 % 25)
            task_id = await self._submit(
                "text of limit-150..300 (result may not fit)", self._request("sleep", text=text)
            )
            accepted += [task_id] if task_id else []
        return accepted

    async def _deadlines(self, index: int) -> None:
        absurd = self._request("sentiment")
        absurd.deadline.seconds = FAR_FUTURE_S
        await self._submit("deadline 10^13 s", absurd)
        past = self._request("sentiment")
        past.deadline.seconds = int(time.time()) - 3600
        await self._submit("deadline past", past)
        rows = [self._request("sentiment") for _ in range(15)]
        rows.insert(index % 16, absurd)
        await self._submit_batch("batch with one deadline 10^13 s", rows)

    async def _non_canonical_ids(self, task_id: str) -> None:
        forms = non_canonical(task_id)
        for form in forms:
            request = notifier_pb2.GetTaskRequest(task_id=form)
            await self._call(
                "get non-canonical id", self._notifier.GetTask(request, **self._options(5)), LOOKUP_STATUSES
            )
        watch = notifier_pb2.WatchTaskRequest(task_id=self._rng.choice(forms))
        await self._call(
            "watch non-canonical id", self._drain(self._notifier.WatchTask(watch, **self._options(3))), WATCH_STATUSES
        )
        cancel = notifier_pb2.CancelTaskRequest(task_id=self._rng.choice(forms))
        await self._call(
            "cancel non-canonical id", self._notifier.CancelTask(cancel, **self._options(5)), LOOKUP_STATUSES
        )

    def _start_unread(self, large: list[str], recent_ids: list[str]) -> None:
        task = asyncio.ensure_future(self._unread_watches(large, recent_ids))
        self._unread.add(task)
        task.add_done_callback(self._unread.discard)

    async def _unread_watches(self, large: list[str], recent_ids: list[str]) -> None:
        """A client that, on a connection of its own, opens watches it never reads for ``UNREAD_HOLD_S``: of a task
        with a result of about 1 MB (more than a stream's flow-control window, so the server's send blocks), of a
        512-token stream, and of many tasks on one WatchTasks."""
        long = self._request("generate", {"max_tokens": "512", "token_delay_ms": "0"})
        streamed = await self._submit("unread watch: its task", long)
        async with grpc.aio.insecure_channel(self._unread_address) as channel:
            stub = notifier_pb2_grpc.NotifierServiceStub(channel)
            many = self._watch_many([*large, *recent_ids])
            calls = {"unread WatchTasks": stub.WatchTasks(many, metadata=self._metadata)}
            single = {
                "unread WatchTask of a 1 MB result": large[0] if large else None,
                "unread WatchTask of a stream": streamed,
            }
            for probe, task_id in single.items():
                if task_id:
                    request = notifier_pb2.WatchTaskRequest(task_id=task_id)
                    calls[probe] = stub.WatchTask(request, metadata=self._metadata)
            await asyncio.sleep(UNREAD_HOLD_S)
            for probe, call in calls.items():
                outcome = (await call.code()).name if call.done() else "open"
                self._record(probe, outcome, UNREAD_STATUSES)
                call.cancel()

    # --- plumbing ---------------------------------------------------------------------------------------------
    def _request(
        self, model: str, parameters: dict[str, str] | None = None, *, text: str = "", model_version: str = ""
    ) -> ingest_pb2.SubmitTaskRequest:
        return ingest_pb2.SubmitTaskRequest(
            model_name=model,
            model_version=model_version,
            input=task_pb2.TaskInput(text=text or self._rng.choice(SENTENCES)),
            parameters=parameters or {},
            idempotency_key=str(uuid.uuid4()),
        )

    @staticmethod
    def _watch_many(task_ids: list[str]) -> notifier_pb2.WatchTasksRequest:
        return notifier_pb2.WatchTasksRequest(tasks=[notifier_pb2.WatchTaskRequest(task_id=t) for t in task_ids])

    def _options(self, timeout_s: float) -> dict[str, Any]:
        return {"timeout": timeout_s, "metadata": self._metadata}

    async def _submit(self, probe: str, request: ingest_pb2.SubmitTaskRequest) -> str | None:
        reply = await self._call(probe, self._ingest.SubmitTask(request, **self._options(15)), SUBMIT_STATUSES)
        if reply is None:
            return None
        return self._tally.accept(reply.task_id, request.model_name)

    async def _submit_batch(self, probe: str, rows: list[ingest_pb2.SubmitTaskRequest]) -> None:
        request = ingest_pb2.SubmitTasksRequest(tasks=rows)
        reply = await self._call(probe, self._ingest.SubmitTasks(request, **self._options(15)), SUBMIT_STATUSES)
        if reply is not None:
            for row, answer in zip(rows, reply.tasks, strict=True):
                self._tally.accept(answer.task_id, row.model_name)

    @staticmethod
    async def _drain(call: Any) -> object:
        async for _ in call:
            pass
        return True

    async def _call(self, probe: str, call: Awaitable[Any], expected: set[str]) -> Any:
        try:
            reply = await call
        except grpc.aio.AioRpcError as e:
            self._record(probe, e.code().name, expected, e.details() or "")
            return None
        self._record(probe, "OK", expected)
        return reply

    def _record(self, probe: str, outcome: str, expected: set[str], details: str = "") -> None:
        self._tally.hostile[(probe, outcome)] += 1
        if outcome not in expected:
            self._tally.unexpected_hostile.append(f"{probe}: {outcome} {details[:200]}")
