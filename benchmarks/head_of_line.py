"""Head of line: how long fast tasks take when slow tasks were fetched before them on the same partitions.

Each round starts a fresh mesh (two workers). A burst of fast ``sentiment`` tasks, each submitted and watched to its
terminal update by a client of its own, is timed twice: alone, then right after one slow ``sleep`` task was written
onto every tasks partition (so every fast task has a slow one below it in its partition). The figure is the ratio of
the fast tasks' p99 behind slow ones to their p99 alone, in the same round.
"""

from __future__ import annotations

import argparse
import asyncio
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from confluent_kafka import Producer

from aimesh import events
from aimesh.v1 import task_pb2
from benchmarks import sections
from benchmarks.common import MeshClient, Section, bench_stack, log, median, quantile, spread

TITLE = sections.HEAD_OF_LINE
SLOW_MS = 8000
TARGET_RATIO = 2.0
METHOD = (
    "Each round starts a fresh mesh with two workers. A burst of fast `sentiment` tasks (each submitted with "
    "`SubmitTask` and followed on its own `WatchTask` stream to the terminal update) is timed alone; then one "
    f"`sleep` task of {SLOW_MS} ms is written straight onto every partition of the tasks topic and the same burst "
    "is timed again, so that every fast task has a slow one fetched before it in its partition. Reported: the "
    "fast tasks' p50 and p99 both ways, and the ratio of the p99s, per round (the median quoted)."
)


def slow_heads(stack: Any) -> None:
    producer = Producer({"bootstrap.servers": stack.kafka_bootstrap, "enable.idempotence": True})
    for partition in range(stack.settings.tasks_partitions):
        task = task_pb2.AITaskEvent(
            schema_version=events.SCHEMA_VERSION,
            task_id=str(uuid.uuid4()),
            model_name="sleep",
            input=task_pb2.TaskInput(text=f"slow {partition}"),
            parameters={"delay_ms": str(SLOW_MS)},
            tenant="bench",
        )
        task.submitted_at.GetCurrentTime()
        producer.produce(
            stack.topics.tasks_topic, key=task.task_id, value=task.SerializeToString(), partition=partition
        )
    assert producer.flush(30) == 0


async def burst(stack: Any, tasks: int) -> list[float]:
    async with MeshClient(stack) as mesh:
        return list(await asyncio.gather(*(mesh.run("sentiment") for _ in range(tasks))))


def measure(tasks: int) -> dict[str, Any]:
    with bench_stack() as stack:
        asyncio.run(burst(stack, tasks))  # warm-up: every model loaded, every connection open
        alone = asyncio.run(burst(stack, tasks))
        slow_heads(stack)
        behind = asyncio.run(burst(stack, tasks))
    log(
        f"  fast tasks alone p99 {quantile(alone, 0.99):.0f} ms; behind {SLOW_MS} ms tasks p99 "
        f"{quantile(behind, 0.99):.0f} ms"
    )
    return {"alone_ms": alone, "behind_ms": behind}


def run_rounds(args: argparse.Namespace) -> list[dict[str, Any]]:
    rounds = []
    for i in range(args.rounds):
        rounds.append(measure(args.hol_tasks))
        log(f"head-of-line round {i + 1}/{args.rounds} done")
    return rounds


def report(rounds: Sequence[dict[str, Any]], args: argparse.Namespace, plots: Path) -> Section:
    def per_round(key: str, q: float) -> list[float]:
        return [quantile(r[key], q) for r in rounds]

    ratios = [b / a for a, b in zip(per_round("alone_ms", 0.99), per_round("behind_ms", 0.99), strict=True)]
    ratio = median(ratios)
    lines = [
        f"{args.hol_tasks} concurrent fast tasks per burst, median of {len(rounds)} rounds (min-max). Milliseconds.",
        "",
        "| fast tasks | p50 | p99 |",
        "|---|---|---|",
        f"| alone | {spread(per_round('alone_ms', 0.5))} | {spread(per_round('alone_ms', 0.99))} |",
        f"| behind a {SLOW_MS} ms task on every partition | {spread(per_round('behind_ms', 0.5))} "
        f"| {spread(per_round('behind_ms', 0.99))} |",
        "",
        f"p99 behind / p99 alone: {ratio:.2f} (rounds: {', '.join(f'{r:.2f}' for r in ratios)}); target at most "
        f"{TARGET_RATIO:g}: {'met' if ratio <= TARGET_RATIO else 'not met'}.",
    ]
    return Section(TITLE, METHOD, "\n".join(lines))
