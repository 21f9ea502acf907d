"""The soak's ordinary load: tasks of every model and both priorities at a steady rate, through the client library,
some fired and forgotten, some watched to the end, some watched, dropped and resumed with ``after_sequence``, some
cancelled, some submitted as a batch and watched on one WatchTasks stream."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import timedelta

from aimesh import events
from aimesh.client import AsyncClient, ClientError, TaskSpec
from aimesh.v1 import notifier_pb2

# Weights of the models in the mix (README "Models"); generate costs a record per token, so it stays a minority.
MODELS = {"sentiment": 30, "sleep": 25, "summarize": 15, "embed": 15, "generate": 15}
SENTENCES = [
    "The release went smoothly and everyone was pleased.",
    "Kafka decouples the services, so a slow worker never blocks ingest.",
    "The outage was frustrating and the support team did not answer for hours.",
    "Workers pull tasks at their own pace and publish results in transactions.",
    "Nothing much happened on Tuesday.",
    "A terrible storm closed the harbour, but the ferries ran again by noon.",
]
SHORT_DEADLINE = timedelta(milliseconds=300)
# A short deadline may pass before ingest answers, or come before the backlog's estimated wait: documented refusals.
SHORT_DEADLINE_REFUSALS = {"FAILED_PRECONDITION", "RESOURCE_EXHAUSTED"}
# Admission control's documented answers to a mesh that cannot keep up (README "Admission control and quotas").
ADMISSION_REASONS = {"BACKLOG_TOO_LONG", "TENANT_RATE_LIMITED", "TENANT_CONCURRENCY_LIMITED"}
# Refusing load it cannot keep up with is admission control doing its job; at this modest rate it should be rare
# (another stack on the same two cores can cause some).
MAX_REFUSED_SHARE = 0.05
MAX_PENDING = 2000  # actions in flight at once: a stalled mesh shows as errors, not as an unbounded harness


@dataclass
class Tally:
    """What the soak did and saw; ``accepted`` is what the exactly-once check holds the mesh to."""

    accepted: dict[str, str] = field(default_factory=dict)  # task id -> model
    actions: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)  # ordinary calls that failed, by action and code
    error_examples: list[str] = field(default_factory=list)
    watch_gaps: list[str] = field(default_factory=list)  # resumed watches that missed, repeated or reordered one
    cancel_outcomes: Counter[str] = field(default_factory=Counter)
    hostile: Counter[tuple[str, str]] = field(default_factory=Counter)  # (probe, outcome)
    unexpected_hostile: list[str] = field(default_factory=list)
    expiry_lookups: Counter[str] = field(default_factory=Counter)  # forgotten / still_known
    refused: Counter[str] = field(default_factory=Counter)  # ordinary submits admission control turned away

    def accept(self, task_id: str, model: str) -> str:
        self.accepted[task_id] = model
        return task_id

    def error(self, action: str, error: ClientError) -> None:
        if error.code.name == "RESOURCE_EXHAUSTED" and error.reason in ADMISSION_REASONS:
            self.refused[error.reason] += 1
            return
        self.errors[f"{action}: {error.code.name} {error.reason}".rstrip()] += 1
        if len(self.error_examples) < 20:
            self.error_examples.append(f"{action}: {error.code.name} {error.message[:200]}")

    @property
    def submitted(self) -> int:
        """Ordinary tasks the load tried to submit."""
        return sum(n * (5 if action == "batch" else 1) for action, n in self.actions.items() if "refused" not in action)


def random_spec(rng: random.Random) -> TaskSpec:
    """An ordinary task: any model with valid parameters, either priority, mostly no deadline."""
    model = rng.choices(list(MODELS), weights=list(MODELS.values()))[0]
    text = " ".join(rng.choices(SENTENCES, k=rng.choice([1, 3, 8, 40])))
    parameters = {
        "summarize": lambda: {"sentences": str(rng.randint(1, 5))},
        "sleep": lambda: {"delay_ms": str(rng.choice([0, 5, 20, 50]))},
        "generate": lambda: {"max_tokens": str(rng.randint(4, 40)), "token_delay_ms": str(rng.choice([0, 2, 10]))},
    }.get(model, dict)()
    roll = rng.random()
    # A few short deadlines end EXPIRED when a batch or a restart delays them: a terminal state like any other.
    deadline = timedelta(seconds=60) if roll < 0.10 else SHORT_DEADLINE if roll < 0.15 else None
    priority = rng.choice(["interactive", "interactive", "batch"])
    return TaskSpec(model, text, parameters, deadline, priority)  # type: ignore[arg-type]


def is_short(spec: TaskSpec) -> bool:
    return spec.deadline == SHORT_DEADLINE


def slow_spec(rng: random.Random) -> TaskSpec:
    """A task that runs long enough to be cancelled while queued or running."""
    if rng.random() < 0.5:
        return TaskSpec("sleep", "cancel me", {"delay_ms": str(rng.randint(200, 600))}, priority="batch")
    return TaskSpec("generate", "Kafka", {"max_tokens": "60", "token_delay_ms": "20"})


class Load:
    """Runs ordinary actions at ``rate_per_s`` tasks per second until a moment, against ``client``."""

    def __init__(self, client: AsyncClient, tally: Tally, rng: random.Random, rate_per_s: float) -> None:
        self._client = client
        self._tally = tally
        self._rng = rng
        self._rate_per_s = rate_per_s
        self._pending: set[asyncio.Task[None]] = set()
        # (action, weight, tasks it submits)
        self._actions: list[tuple[Callable[[], Awaitable[None]], int, int]] = [
            (self.fire, 45, 1),
            (self.watch, 20, 1),
            (self.drop_and_resume, 10, 1),
            (self.cancel, 10, 1),
            (self.watch_batch, 3, 5),
        ]

    async def run(self, until: float) -> None:
        """Start actions on schedule until ``until`` (time.monotonic), then wait for those started."""
        next_at = time.monotonic()
        while next_at < until:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            action, _, tasks = self._rng.choices(self._actions, weights=[w for _, w, _ in self._actions])[0]
            if len(self._pending) < MAX_PENDING:
                self._spawn(action())
            else:
                self._tally.errors["harness: too many actions pending (the mesh stalled?)"] += 1
            next_at += tasks / self._rate_per_s
        await self.drain()

    async def drain(self) -> None:
        while self._pending:
            await asyncio.wait(set(self._pending))

    def _spawn(self, coroutine: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coroutine)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _submit(self, action: str, spec: TaskSpec) -> str | None:
        self._tally.actions[action] += 1
        try:
            reply = await self._client.submit_task(spec)
        except ClientError as e:
            if is_short(spec) and e.code.name in SHORT_DEADLINE_REFUSALS:
                self._tally.actions[f"short deadline refused ({e.code.name})"] += 1
            else:
                self._tally.error(f"{action} submit", e)
            return None
        return self._tally.accept(reply.task_id, spec.model)

    async def fire(self) -> None:
        await self._submit("fire", random_spec(self._rng))

    async def watch(self) -> None:
        task_id = await self._submit("watch", random_spec(self._rng))
        if task_id is not None:
            await self._follow("watch", task_id)

    async def _follow(self, action: str, task_id: str, after_sequence: int = 0) -> list[int]:
        """Watch ``task_id`` to its end; the sequences seen."""
        seen: list[int] = []
        try:
            async for state in self._client.watch(task_id, after_sequence=after_sequence, timeout_s=300):
                seen.append(state.sequence)
        except ClientError as e:
            self._tally.error(f"{action} watch", e)
        return seen

    async def drop_and_resume(self) -> None:
        """Read the first update or two, drop the stream, and resume after the last sequence seen: the updates seen must
        be those the notifier kept, each once, in order."""
        task_id = await self._submit("resume", random_spec(self._rng))
        if task_id is None:
            return
        first: list[int] = []
        ended = False
        try:
            async with contextlib.aclosing(self._client.watch(task_id, timeout_s=300)) as updates:
                async for state in updates:
                    first.append(state.sequence)
                    ended = events.is_terminal(state.status)
                    if ended or len(first) >= self._rng.randint(1, 2):
                        break
        except ClientError as e:
            self._tally.error("resume watch", e)
            return
        if ended or not first:
            return
        await asyncio.sleep(self._rng.uniform(0.05, 2.0))
        seen = first + await self._follow("resume", task_id, after_sequence=first[-1])
        # Sequence numbers may skip (a RUNNING update that arrives after the result is dropped, a task that ends
        # without running starts at 3); what a resume must not do is repeat, reorder or leave out an update the
        # notifier has: every kept update after the first one seen, watched again once the task ended, is the
        # reference (after_sequence 0 would mean "the current state" only).
        whole = first[:1] + await self._follow("resume", task_id, after_sequence=first[0])
        if seen != whole or any(b <= a for a, b in zip(seen, seen[1:], strict=False)):
            self._tally.watch_gaps.append(f"{task_id}: resumed {seen}, whole {whole}")

    async def cancel(self) -> None:
        task_id = await self._submit("cancel", slow_spec(self._rng))
        if task_id is None:
            return
        await asyncio.sleep(self._rng.uniform(0.0, 0.5))
        try:
            reply = await self._client.cancel(task_id)
        except ClientError as e:
            self._tally.error("cancel", e)
            return
        self._tally.cancel_outcomes[notifier_pb2.CancelOutcome.Name(reply.outcome)] += 1

    async def watch_batch(self) -> None:
        """Five tasks in one SubmitTasks call, followed on one WatchTasks stream to every task's end."""
        # No short deadline here: one row refused for it would refuse the whole batch.
        specs = [
            replace(spec, deadline=None) if is_short(spec) else spec
            for spec in (random_spec(self._rng) for _ in range(5))
        ]
        self._tally.actions["batch"] += 1
        try:
            replies = await self._client.submit_many(specs)
        except ClientError as e:
            self._tally.error("batch submit", e)
            return
        ids = [self._tally.accept(r.task_id, s.model) for r, s in zip(replies, specs, strict=True)]
        try:
            async for _ in self._client.watch_many(ids, timeout_s=300):
                pass
        except ClientError as e:
            self._tally.error("batch watch", e)
