import asyncio

from aimesh.notifier.store import DENIED, ENDED, TaskStore, Update, WatchItem
from aimesh.v1 import result_pb2, task_pb2

TASK_ID = "7b0c4c5e-3d1a-4a59-9d57-1f1c2f6b8a10"


def task() -> task_pb2.AITaskEvent:
    event = task_pb2.AITaskEvent(schema_version=1, task_id=TASK_ID, model_name="sentiment")
    event.submitted_at.GetCurrentTime()
    return event


def result(status: int, worker: str = "w1") -> result_pb2.AIResultEvent:
    event = result_pb2.AIResultEvent(schema_version=1, task_id=TASK_ID, status=status, worker_id=worker)
    event.produced_at.GetCurrentTime()
    return event


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_watchers_see_each_change_in_order_and_late_watchers_get_the_result() -> None:
    store = TaskStore(retention_s=60)
    queue = store.watch(TASK_ID)
    assert queue.empty()  # unknown yet: waited for
    store.apply_task(task())
    store.apply_result(result(result_pb2.TASK_STATUS_RUNNING))
    store.apply_result(result(result_pb2.TASK_STATUS_SUCCEEDED))
    seen = [queue.get_nowait().state.status for _ in range(queue.qsize())]
    assert seen == [result_pb2.TASK_STATUS_QUEUED, result_pb2.TASK_STATUS_RUNNING, result_pb2.TASK_STATUS_SUCCEEDED]
    late = store.watch(TASK_ID)
    assert late.get_nowait().state.status == result_pb2.TASK_STATUS_SUCCEEDED


async def test_first_terminal_result_wins_and_states_never_go_backwards() -> None:
    store = TaskStore(retention_s=60)
    repeats = [
        store.apply_result(result(result_pb2.TASK_STATUS_SUCCEEDED, worker="first")),
        store.apply_result(result(result_pb2.TASK_STATUS_FAILED, worker="second")),  # a rerun's: counted as a repeat
        store.apply_result(result(result_pb2.TASK_STATUS_RUNNING, worker="third")),  # stale, not a repeated result
    ]
    assert repeats == [False, True, False]
    store.apply_task(task())  # the task record read after its result
    state = store.get(TASK_ID)
    assert state is not None
    assert state.status == result_pb2.TASK_STATUS_SUCCEEDED
    assert state.result.worker_id == "first"
    assert state.model_name == "sentiment"


async def test_cancelled_watch_frees_unknown_tasks_and_retention_forgets_old_ones() -> None:
    clock = Clock()
    store = TaskStore(retention_s=10, clock=clock)
    queue = store.watch("11111111-1111-1111-1111-111111111111")
    store.unwatch("11111111-1111-1111-1111-111111111111", queue)
    assert store.watcher_count() == 0
    store.apply_task(task())
    assert len(store) == 1
    clock.now = 11
    assert store.expire() == 1
    assert store.get(TASK_ID) is None


# --- sequence numbers, resume and partial outputs ----------------------------------------------------------

QUEUED, RUNNING = result_pb2.TASK_STATUS_QUEUED, result_pb2.TASK_STATUS_RUNNING
SUCCEEDED, CANCELLED = result_pb2.TASK_STATUS_SUCCEEDED, result_pb2.TASK_STATUS_CANCELLED


def numbered(status: int, sequence: int, text: str = "", *, partial: bool = False) -> result_pb2.AIResultEvent:
    event = result(status)
    event.sequence = sequence
    event.partial = partial
    if text:
        event.output.tensors.add(name="TEXT", datatype="BYTES", shape=[1], string_data=[text])
    return event


def stream(tokens: list[str]) -> list[result_pb2.AIResultEvent]:
    """What the worker publishes for a streaming model: RUNNING, one partial output per token, the whole text."""
    partials = [numbered(RUNNING, 3 + i, token, partial=True) for i, token in enumerate(tokens)]
    return [numbered(RUNNING, 2), *partials, numbered(SUCCEEDED, 3 + len(tokens), "".join(tokens))]


def drain(queue: asyncio.Queue[WatchItem]) -> list[Update]:
    items = [queue.get_nowait() for _ in range(queue.qsize())]
    assert all(isinstance(i, Update) for i in items)
    return [i for i in items if isinstance(i, Update)]


def text(updates: list[Update]) -> str:
    return "".join(u.state.result.output.tensors[0].string_data[0] for u in updates if u.state.result.partial)


async def test_every_update_carries_its_sequence_and_a_resumed_watch_misses_and_repeats_nothing() -> None:
    store = TaskStore(retention_s=60)
    live = store.watch(TASK_ID)
    store.apply_task(task())
    events = stream([" a", " b", " c", " d"])
    for event in events[:3]:  # RUNNING, " a", " b"
        store.apply_result(event)
    first = drain(live)
    assert [u.state.sequence for u in first] == [1, 2, 3, 4]
    assert [u.state.status for u in first[:2]] == [QUEUED, RUNNING] and text(first) == " a b"
    store.unwatch(TASK_ID, live)  # the client drops the stream after sequence 4 ...
    for event in events[3:5]:
        store.apply_result(event)
    resumed = store.watch(TASK_ID, after_sequence=first[-1].state.sequence)  # ... and resumes
    for event in events[5:]:
        store.apply_result(event)
    rest = drain(resumed)
    assert [u.state.sequence for u in rest] == [5, 6, 7]
    assert text(first + rest) == " a b c d"
    assert rest[-1].state.status == SUCCEEDED and not rest[-1].state.result.partial


async def test_a_fresh_watch_gets_the_current_state_and_mid_stream_every_partial_output_so_far() -> None:
    store = TaskStore(retention_s=60)
    store.apply_task(task())
    events = stream([" x", " y", " z"])
    store.apply_result(events[0])
    assert [u.state.sequence for u in drain(store.watch(TASK_ID))] == [2]  # RUNNING: the current state alone
    for event in events[1:3]:
        store.apply_result(event)
    late = drain(store.watch(TASK_ID))  # in the middle of the stream: the text so far, then the live tokens
    assert [u.state.sequence for u in late] == [3, 4] and text(late) == " x y"
    for event in events[3:]:
        store.apply_result(event)
    done = drain(store.watch(TASK_ID))
    assert [(u.state.sequence, u.state.status) for u in done] == [(6, SUCCEEDED)]
    assert done[0].state.result.output.tensors[0].string_data == [" x y z"]
    everything = drain(store.watch(TASK_ID, after_sequence=0 + 1))  # after QUEUED: the whole history
    assert [u.state.sequence for u in everything] == [2, 3, 4, 5, 6]


async def test_a_rerun_after_a_crash_delivers_no_sequence_twice_and_nothing_goes_backwards() -> None:
    store = TaskStore(retention_s=60)
    store.apply_task(task())
    watcher = store.watch(TASK_ID)
    events = stream([" p", " q", " r"])
    for event in events[:3]:  # RUNNING, " p", " q"; then the worker dies
        store.apply_result(event)
    for event in events:  # the rerun publishes it all again, the same tokens, and finishes
        store.apply_result(event)
    store.apply_result(numbered(RUNNING, 2))  # a late duplicate after the end
    store.apply_result(numbered(CANCELLED, 9))  # a second terminal: the first one won
    seen = drain(watcher)
    assert [u.state.sequence for u in seen] == [1, 2, 3, 4, 5, 6]
    assert text(seen) == " p q r" and seen[-1].state.status == SUCCEEDED
    state = store.get(TASK_ID)
    assert state is not None and state.sequence == 6 and state.status == SUCCEEDED


async def test_a_rerun_that_ends_sooner_still_ends_the_task_numbered_after_what_was_delivered() -> None:
    store = TaskStore(retention_s=60)
    store.apply_task(task())
    watcher = store.watch(TASK_ID)
    for event in stream([" a", " b", " c", " d"])[:5]:  # RUNNING and four tokens (up to 6); then the worker dies
        store.apply_result(event)
    store.apply_result(numbered(RUNNING, 2))  # the rerun ...
    store.apply_result(numbered(CANCELLED, 3 + 1, " a"))  # ... is cancelled after one token: the worker says 4
    seen = drain(watcher)
    assert [u.state.sequence for u in seen] == [1, 2, 3, 4, 5, 6, 7]
    assert seen[-1].state.status == CANCELLED
    state = store.get(TASK_ID)
    assert state is not None and state.status == CANCELLED and state.sequence == 7


async def test_results_without_sequences_are_placed_by_their_status() -> None:
    store = TaskStore(retention_s=60)
    watcher = store.watch(TASK_ID)
    store.apply_task(task())
    store.apply_result(result(RUNNING))
    store.apply_result(result(RUNNING))  # repeated: not delivered again
    store.apply_result(result(SUCCEEDED))
    store.apply_result(result(SUCCEEDED))  # a repeated terminal: ignored
    seen = drain(watcher)
    assert [(u.state.status, u.state.sequence) for u in seen] == [(QUEUED, 1), (RUNNING, 2), (SUCCEEDED, 3)]
    # A legacy terminal result straight after QUEUED, and one read before anything else, are both 3.
    other = "5a1c1e10-0000-4000-8000-000000000001"
    store.apply_result(result_pb2.AIResultEvent(schema_version=1, task_id=other, status=SUCCEEDED, tenant="default"))
    state = store.get(other)
    assert state is not None and state.sequence == 3


async def test_a_watch_resumed_after_the_end_ends_at_once_and_one_ahead_waits() -> None:
    store = TaskStore(retention_s=60)
    store.apply_task(task())
    for event in stream([" k"]):
        store.apply_result(event)
    assert store.watch(TASK_ID, after_sequence=4).get_nowait() is ENDED  # it saw the terminal update, 4
    assert store.watch(TASK_ID, after_sequence=99).get_nowait() is ENDED
    assert store.watcher_count() == 0
    pending = "5a1c1e10-0000-4000-8000-000000000002"
    early = store.watch(pending, after_sequence=2)
    queued = task()
    queued.task_id = pending
    store.apply_task(queued)
    assert early.empty()  # QUEUED (1) is before its resume point
    running = numbered(RUNNING, 2)
    running.task_id = pending
    store.apply_result(running)
    assert early.empty()
    done = numbered(SUCCEEDED, 3)
    done.task_id = pending
    store.apply_result(done)
    assert [u.state.sequence for u in drain(early)] == [3]


async def test_history_is_bounded_per_task_and_expires_with_the_task() -> None:
    clock = Clock()
    store = TaskStore(retention_s=10, max_updates_per_task=4, clock=clock)
    store.apply_task(task())
    tokens = [f" t{i}" for i in range(6)]
    for event in stream(tokens):
        store.apply_result(event)
    # Kept: the last four updates (the three latest partial outputs and the terminal one), sequences 6..9.
    queue = store.watch(TASK_ID, after_sequence=1)
    resumed = drain(queue)
    assert [u.state.sequence for u in resumed] == [6, 7, 8, 9]
    assert text(resumed) == " t3 t4 t5"
    store.unwatch(TASK_ID, queue)
    clock.now = 11
    assert store.expire() == 1 and store.get(TASK_ID) is None


async def test_updates_kept_before_the_task_record_was_read_get_what_it_brings() -> None:
    store = TaskStore(retention_s=60)
    record = task()
    for event in stream([" m", " n"])[:3]:  # read before the task record (the topics are read independently)
        event.tenant = "default"
        store.apply_result(event)
    store.apply_task(record)
    replayed = drain(store.watch(TASK_ID, after_sequence=1))
    assert [u.state.sequence for u in replayed] == [2, 3, 4]
    assert all(u.state.submitted_at == record.submitted_at and u.state.model_name == "sentiment" for u in replayed)


async def test_partial_outputs_are_seen_only_by_the_tasks_tenant() -> None:
    store = TaskStore(retention_s=60)
    mine, theirs = store.watch(TASK_ID, "acme", after_sequence=1), store.watch(TASK_ID, "globex", after_sequence=1)
    for event in stream([" s"])[:2]:  # RUNNING and a partial output, read before the task record
        store.apply_result(event)
    assert mine.empty() and theirs.empty()  # the tenant is not known yet: held back
    record = task()
    record.tenant = "acme"
    store.apply_task(record)
    assert [u.state.sequence for u in drain(mine)] == [2, 3]
    assert theirs.get_nowait() is DENIED and theirs.empty()


async def test_one_queue_can_watch_many_tasks_each_from_its_own_resume_point() -> None:
    store = TaskStore(retention_s=60)
    queue: asyncio.Queue[tuple[str, WatchItem]] = asyncio.Queue()
    ids = [f"5a1c1e10-0000-4000-8000-00000000001{i}" for i in range(3)]
    for i, task_id in enumerate(ids):
        record = task()
        record.task_id = task_id
        store.apply_task(record)
        store.subscribe(task_id, queue, lambda item, t=task_id: queue.put_nowait((t, item)), after_sequence=i)
    for task_id in ids:
        done = result(SUCCEEDED)
        done.task_id = task_id
        store.apply_result(done)
    got = [queue.get_nowait() for _ in range(queue.qsize())]
    pairs = [(t, item.state.sequence) for t, item in got if isinstance(item, Update)]
    assert pairs == [(ids[0], 1), (ids[0], 3), (ids[1], 3), (ids[2], 3)]  # QUEUED only to the one from 0
    for task_id in ids:
        store.unsubscribe(task_id, queue)
    assert store.watcher_count() == 0
