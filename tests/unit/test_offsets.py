from aimesh.worker.offsets import OffsetTracker

P0 = ("tasks", 0)
P1 = ("tasks", 1)


def test_commit_stops_at_the_lowest_unfinished_offset() -> None:
    tracker = OffsetTracker()
    tracker.assign([P0])
    for offset in (10, 11, 12):
        assert tracker.started(P0, offset)
    tracker.finished(P0, 11)
    tracker.finished(P0, 12)
    assert tracker.to_commit() == {P0: 10}
    tracker.finished(P0, 10)
    assert tracker.to_commit() == {P0: 13}
    tracker.committed({P0: 13})
    assert tracker.to_commit() == {}


def test_unowned_partitions_are_refused_and_revoke_returns_what_is_committable() -> None:
    tracker = OffsetTracker()
    assert not tracker.started(P1, 5)
    tracker.assign([P0, P1])
    tracker.started(P0, 0)
    tracker.started(P1, 7)
    tracker.finished(P1, 7)
    assert tracker.revoke([P1]) == {P1: 8}
    assert tracker.owned() == [P0]
    tracker.finished(P1, 7)  # a late completion for a revoked partition is ignored
    assert tracker.in_flight() == 1
