"""The worker's ledger: every finished outcome is ready at once; the committed offset stays the lowest one not yet
published, and the published offsets above it travel in the commit's metadata."""

import random

from aimesh.finished_offsets import decode
from aimesh.worker.ledger import Ledger, Outcome, OutRecord

TP = ("tasks", 0)


def outcome(name: str) -> Outcome:
    return Outcome((OutRecord("results", name.encode(), name.encode(), []),))


def keys(ready: object) -> list[bytes | None]:
    return [o.records[0].key for o in ready.outcomes]  # type: ignore[attr-defined]


def test_a_task_finished_after_a_running_one_is_published_at_once_and_recorded_in_the_metadata() -> None:
    ledger = Ledger()
    ledger.assign([TP])
    part = ledger.fetched(TP, 10)
    assert part is not None and ledger.fetched(TP, 11) is part and ledger.fetched(TP, 12) is part
    assert ledger.finished(part, 12, outcome("c"))
    (ready,) = ledger.ready()
    # 10 still runs: the committed offset stays there, and 12 is recorded as published above it.
    assert ready.offsets == (12,) and keys(ready) == [b"c"]
    assert ready.next_offset == 10 and decode(10, ready.metadata) == {12}
    ledger.committed([ready])
    assert ledger.pending() == 2  # 10 and 11 still run; 12 is published
    assert ledger.ready() == []
    ledger.finished(part, 11, outcome("b"))
    (ready,) = ledger.ready()
    assert ready.offsets == (11,) and ready.next_offset == 10 and decode(10, ready.metadata) == {11, 12}
    ledger.committed([ready])
    ledger.finished(part, 10, outcome("a"))
    (ready,) = ledger.ready()
    assert ready.offsets == (10,) and ready.next_offset == 13 and ready.metadata == ""
    ledger.committed([ready])
    assert ledger.pending() == 0 and ledger.ready() == []
    assert ledger.committed_offsets() == {TP: 13}


def test_a_head_finished_while_a_transaction_runs_is_kept_for_the_next() -> None:
    ledger = Ledger()
    ledger.assign([TP])
    part = ledger.fetched(TP, 0)
    assert part is not None
    ledger.finished(part, 0, outcome("a"))
    taken = ledger.ready()
    ledger.fetched(TP, 1)
    ledger.finished(part, 1, outcome("b"))
    ledger.committed(taken)  # only what that transaction carried is published
    (ready,) = ledger.ready()
    assert ready.next_offset == 2 and keys(ready) == [b"b"]


def test_a_new_owner_skips_exactly_the_offsets_the_committed_metadata_records() -> None:
    first = Ledger()
    first.assign([TP])
    part = first.fetched(TP, 20)
    assert part is not None
    for offset in range(21, 26):
        first.fetched(TP, offset)
    for offset in (22, 23, 25):
        first.finished(part, offset, outcome(str(offset)))
    (ready,) = first.ready()
    first.committed([ready])
    # The partition moves with 20, 21 and 24 unfinished: the next owner reads the commit and its metadata.
    second = Ledger()
    second.assign([TP], {TP: (ready.next_offset, ready.metadata)})
    run = [offset for offset in range(20, 27) if second.fetched(TP, offset) is not None]
    assert run == [20, 21, 24, 26]
    assert second.pending() == 4
    assert second.fetched(TP, 21) is None
    # The skipped ones count as published: once the others finish, the committed offset passes them all.
    third = Ledger()
    third.assign([TP], {TP: (ready.next_offset, ready.metadata)})
    parts = {offset: third.fetched(TP, offset) for offset in range(20, 27)}
    for offset in (20, 21, 24, 26):
        p = parts[offset]
        assert p is not None
        third.finished(p, offset, outcome(str(offset)))
    (ready,) = third.ready()
    assert ready.offsets == (20, 21, 24, 26) and ready.next_offset == 27 and ready.metadata == ""


def test_skipped_offsets_count_as_published_once_the_offsets_below_them_finish() -> None:
    ledger = Ledger()
    ledger.assign([TP], {TP: (5, "")})
    assert ledger.ready() == []  # nothing fetched yet
    skipping = Ledger()
    first = Ledger()
    first.assign([TP])
    part = first.fetched(TP, 5)
    assert part is not None and first.fetched(TP, 6) is part
    first.finished(part, 6, outcome("six"))
    (ready,) = first.ready()
    skipping.assign([TP], {TP: (ready.next_offset, ready.metadata)})
    running = skipping.fetched(TP, 5)
    assert running is not None and skipping.fetched(TP, 6) is None
    assert skipping.ready() == []  # 5 runs: the committed offset cannot move
    skipping.finished(running, 5, outcome("five"))
    (done,) = skipping.ready()
    assert done.offsets == (5,) and done.next_offset == 7


def test_when_the_metadata_would_be_too_large_the_lowest_offsets_that_fit_go_first() -> None:
    ledger = Ledger(max_metadata_bytes=40)
    ledger.assign([TP])
    part = ledger.fetched(TP, 0)
    assert part is not None
    for offset in range(1, 400):
        ledger.fetched(TP, offset)
    rng = random.Random(5)
    scattered = sorted(rng.sample(range(2, 400), 120))  # irregular runs: 40 bytes cannot record them all
    for offset in scattered:
        ledger.finished(part, offset, outcome(str(offset)))
    (ready,) = ledger.ready()
    assert 0 < len(ready.offsets) < len(scattered)
    assert list(ready.offsets) == scattered[: len(ready.offsets)]
    assert len(ready.metadata) <= 40 and decode(0, ready.metadata) == set(ready.offsets)
    ledger.committed([ready])
    assert ledger.ready() == []  # the record is full: the rest waits for the offsets below it
    unfinished = [o for o in range(400) if o not in scattered]
    for offset in unfinished[:20]:
        ledger.finished(part, offset, outcome(str(offset)))
    (rest,) = ledger.ready()
    assert rest.next_offset > ready.next_offset
    assert set(unfinished[:20]) <= set(rest.offsets)


def test_released_partitions_drop_their_work_and_refuse_late_outcomes() -> None:
    ledger = Ledger()
    ledger.assign([TP, ("tasks", 1)])
    part = ledger.fetched(TP, 5)
    assert part is not None
    (released,) = ledger.release([TP])
    assert released is part and part.released
    assert not ledger.finished(part, 5, outcome("late"))  # its new owner runs it again
    assert ledger.fetched(TP, 6) is None  # a fetch that raced the revocation is not run
    assert ledger.owned() == [("tasks", 1)]
    ledger.assign([TP])  # assigned again later: a fresh start from the committed offset
    again = ledger.fetched(TP, 5)
    assert again is not None and again is not part


def test_offsets_already_seen_are_not_run_twice() -> None:
    ledger = Ledger()
    ledger.assign([TP])
    assert ledger.fetched(TP, 3) is not None
    assert ledger.fetched(TP, 3) is None
    assert ledger.fetched(TP, 2) is None
    assert ledger.ready([("tasks", 9)]) == []


def test_a_finished_outcome_can_be_replaced_until_it_is_published() -> None:
    ledger = Ledger()
    ledger.assign([TP])
    part = ledger.fetched(TP, 7)
    assert part is not None and ledger.fetched(TP, 8) is part
    assert not ledger.replace(part, 7, outcome("early"))  # still running: nothing to replace
    ledger.finished(part, 7, outcome("big"))
    ledger.finished(part, 8, outcome("next"))
    assert ledger.replace(part, 7, outcome("small"))
    (ready,) = ledger.ready()
    assert ready.offsets == (7, 8) and keys(ready) == [b"small", b"next"]
    ledger.committed([ready])
    assert not ledger.replace(part, 8, outcome("late"))
    assert not ledger.finished(part, 8, outcome("again"))


def test_past_the_cap_of_published_offsets_later_tasks_wait_for_the_running_one() -> None:
    ledger = Ledger(max_published_ahead=3)
    ledger.assign([TP])
    part = ledger.fetched(TP, 0)
    assert part is not None
    for offset in range(1, 11):
        ledger.fetched(TP, offset)
        ledger.finished(part, offset, outcome(str(offset)))
    (ready,) = ledger.ready()
    assert ready.offsets == (1, 2, 3) and ready.next_offset == 0
    ledger.committed([ready])
    assert ledger.ready() == []  # 0 still runs, and three are published above it already
    assert ledger.pending() == 8
    ledger.finished(part, 0, outcome("0"))
    (rest,) = ledger.ready()
    assert rest.offsets == (0, *range(4, 11)) and rest.next_offset == 11
