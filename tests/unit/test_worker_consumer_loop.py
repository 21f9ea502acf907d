"""The consumer thread's pause/resume decision for one priority class (``consumer_loop.should_pause``): hysteresis
on the class's backlog, and a hold that pauses whatever the backlog."""

from __future__ import annotations

import pytest

from aimesh.worker.consumer_loop import should_pause

MAX_BACKLOG = 100


@pytest.mark.parametrize(
    ("paused", "backlog", "expected"),
    [
        (False, 99, False),  # fetching, room left: go on
        (False, 100, True),  # fetching, backlog full: pause
        (True, 51, True),  # paused: stays paused until the backlog is half empty
        (True, 50, False),  # half empty: resume
        (False, 60, False),  # fetching between half and full: go on (no flapping around one threshold)
    ],
)
def test_a_class_pauses_at_a_full_backlog_and_resumes_at_half(paused: bool, backlog: int, expected: bool) -> None:
    assert should_pause(paused=paused, backlog=backlog, max_backlog=MAX_BACKLOG, hold=False) is expected


@pytest.mark.parametrize("paused", [False, True])
def test_a_hold_pauses_whatever_the_backlog(paused: bool) -> None:
    assert should_pause(paused=paused, backlog=0, max_backlog=MAX_BACKLOG, hold=True)
