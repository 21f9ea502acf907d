"""The task slots a worker process shares between its priority classes.

A worker process runs one ``Worker`` per priority class, each consuming its own tasks topic in its own consumer
group (so every class is spread evenly over the processes: one group over both topics let the cooperative-sticky
assignor hand one process all the interactive partitions and another all the batch ones). They share ``Slots``:
at most ``size`` tasks run at once in the process, and a batch task takes a slot only while no interactive record
waits for one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

PriorityClass = Literal["interactive", "batch"]
CLASSES: tuple[PriorityClass, ...] = ("interactive", "batch")  # the order free slots are offered in


class Slots:
    """Event loop only, except ``pending``, which consumer threads write and read (one key each)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.running = 0
        self._waiting: dict[PriorityClass, int] = dict.fromkeys(CLASSES, 0)
        self._fillers: dict[PriorityClass, Callable[[], None]] = {}
        self._offering = False
        # Tasks each class's Worker holds unpublished (running or finished): the process's in-flight gauge.
        self.pending: dict[PriorityClass, int] = dict.fromkeys(CLASSES, 0)

    def register(self, priority_class: PriorityClass, fill: Callable[[], None]) -> None:
        """``fill`` starts backlog records of ``priority_class`` while ``may_start`` allows."""
        self._fillers[priority_class] = fill

    def may_start(self, priority_class: PriorityClass) -> bool:
        if self.running >= self.size:
            return False
        return priority_class == "interactive" or self._waiting["interactive"] == 0

    def take(self) -> None:
        self.running += 1

    def release(self) -> None:
        self.running -= 1
        self.offer()

    def waiting(self, priority_class: PriorityClass, records: int) -> None:
        """``records`` of ``priority_class`` wait for a slot; when the interactive ones are all started, the batch
        class may have the slots left."""
        self._waiting[priority_class] = records
        if priority_class == "interactive" and records == 0 and self.running < self.size:
            self.offer()

    def offer(self) -> None:
        """Let each class fill free slots, interactive first."""
        if self._offering:  # a fill that releases or waits calls back in: the loop below goes on anyway
            return
        self._offering = True
        try:
            for priority_class in CLASSES:
                fill = self._fillers.get(priority_class)
                if fill is not None and self.running < self.size:
                    fill()
        finally:
            self._offering = False
