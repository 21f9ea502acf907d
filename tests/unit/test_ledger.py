"""The worker's ledger: only a partition's contiguous finished head is published, with the offset after it."""

from aimesh.worker.ledger import Ledger, Outcome, OutRecord

TP = ("tasks", 0)


def outcome(name: str) -> Outcome:
    return Outcome((OutRecord("results", name.encode(), name.encode(), []),))


def test_out_of_order_finishes_wait_for_the_earlier_offset() -> None:
    ledger = Ledger()
    ledger.assign([TP])
    part = ledger.fetched(TP, 10)
    assert part is not None and ledger.fetched(TP, 11) is part and ledger.fetched(TP, 12) is part
    assert ledger.finished(part, 11, outcome("b")) and ledger.finished(part, 12, outcome("c"))
    assert ledger.ready() == []  # 10 still runs: publishing 11 now could publish it twice after a crash
    assert ledger.pending() == 3
    ledger.finished(part, 10, outcome("a"))
    (ready,) = ledger.ready()
    assert ready.next_offset == 13
    assert [o.records[0].key for o in ready.outcomes] == [b"a", b"b", b"c"]
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
    ledger.committed(taken)  # only what that transaction carried is dropped
    (ready,) = ledger.ready()
    assert ready.next_offset == 2 and [o.records[0].key for o in ready.outcomes] == [b"b"]


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


def test_a_finished_outcome_can_be_replaced_until_its_partition_is_released() -> None:
    ledger = Ledger()
    ledger.assign([TP])
    part = ledger.fetched(TP, 7)
    assert part is not None and ledger.fetched(TP, 8) is part
    assert not ledger.replace(part, 7, outcome("early"))  # still running: nothing to replace
    ledger.finished(part, 7, outcome("big"))
    ledger.finished(part, 8, outcome("next"))
    assert ledger.replace(part, 7, outcome("small"))
    (ready,) = ledger.ready()
    assert ready.offsets == (7, 8) and [o.records[0].key for o in ready.outcomes] == [b"small", b"next"]
    ledger.release([TP])
    assert not ledger.replace(part, 7, outcome("late"))
