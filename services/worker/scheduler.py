"""Which fetched task runs next, on the event loop: one backlog per priority class (the tasks topic is interactive, the
batch tasks topic batch), a free slot always going to an interactive task first, and batch tasks never holding the
last quarter of the slots, so an interactive task never waits for batch ones to finish before reaching Triton
(whose request priority then lets it jump its queue)."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, Literal

from aimesh.kafka import Record

from .ledger import Partition

log = logging.getLogger(__name__)

PriorityClass = Literal["interactive", "batch"]
CLASSES: tuple[PriorityClass, ...] = ("interactive", "batch")  # in the order free slots are given


def class_of(topic: str, batch_tasks_topic: str) -> PriorityClass:
    """The priority class of records of ``topic``."""
    return "batch" if batch_tasks_topic and topic == batch_tasks_topic else "interactive"


class Scheduler:
    """Runs ``process(record, partition)`` for each enqueued record, at most ``max_in_flight`` at once (none once
    ``stopped`` is set). ``backlog_sizes`` may be read from any thread (the consumer thread pauses fetching on it)."""

    def __init__(
        self,
        process: Callable[[Record, Partition], Coroutine[Any, Any, None]],
        max_in_flight: int,
        batch_tasks_topic: str,
        stopped: threading.Event,
    ) -> None:
        self._process = process
        self._max_in_flight = max_in_flight
        self._batch_tasks_topic = batch_tasks_topic
        self._stopped = stopped
        self._backlogs: dict[PriorityClass, deque[tuple[Record, Partition]]] = {c: deque() for c in CLASSES}
        self.backlog_sizes: dict[PriorityClass, int] = dict.fromkeys(CLASSES, 0)
        self._tasks: dict[asyncio.Task[None], Partition] = {}
        # Running tasks taken from the batch backlog: they may hold all but a quarter of the slots.
        self._batch_running: set[asyncio.Task[None]] = set()
        self._batch_slots = max_in_flight - max_in_flight // 4

    @property
    def running(self) -> int:
        return len(self._tasks)

    def enqueue(self, record: Record, partition: Partition) -> None:
        self._backlogs[class_of(record.topic, self._batch_tasks_topic)].append((record, partition))
        self._fill()

    def cancel_tasks_of(self, partitions: list[Partition]) -> None:
        """Stop the running tasks of released partitions, and drop their backlog: their new owner runs them."""
        for task, partition in list(self._tasks.items()):
            if any(partition is p for p in partitions):
                task.cancel()
        for c in CLASSES:
            self._backlogs[c] = deque((r, p) for r, p in self._backlogs[c] if not p.released)
            self.backlog_sizes[c] = len(self._backlogs[c])

    async def drain(self, grace_s: float) -> None:
        """Drop the backlogs (never started: left uncommitted, they run again on the partitions' next owner) and
        give running tasks ``grace_s`` to finish; cancel the rest. Call once ``stopped`` is set."""
        log.info("draining %d in-flight tasks for up to %.1fs", len(self._tasks), grace_s)
        for c in CLASSES:
            self._backlogs[c].clear()
            self.backlog_sizes[c] = 0
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace_s)
            for task in pending:
                task.cancel()
            if pending:
                log.warning("%d tasks did not finish in the grace period; they will run again", len(pending))
                await asyncio.wait(pending)

    def _fill(self) -> None:
        """Start backlog records while fewer than max_in_flight tasks run: interactive ones first, batch ones only
        when no interactive record waits and fewer than ``_batch_slots`` batch tasks run."""
        interactive, batch = self._backlogs["interactive"], self._backlogs["batch"]
        while len(self._tasks) < self._max_in_flight and not self._stopped.is_set():
            if interactive:
                backlog = interactive
            elif batch and len(self._batch_running) < self._batch_slots:
                backlog = batch
            else:
                break
            record, partition = backlog.popleft()
            if partition.released:
                continue  # its partition moved on while it waited: the new owner runs it
            task = asyncio.create_task(self._process(record, partition), name=f"task@{record.where()}")
            self._tasks[task] = partition
            if backlog is batch:
                self._batch_running.add(task)
            task.add_done_callback(self._task_done)
        for c in CLASSES:
            self.backlog_sizes[c] = len(self._backlogs[c])

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)
        self._batch_running.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s crashed", task.get_name(), exc_info=task.exception())
        self._fill()
