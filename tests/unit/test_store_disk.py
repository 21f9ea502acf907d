"""The notifier's task state on disk (RocksDB): what survives a restart, what the memory cache holds, and what
expiry removes from disk."""

import uuid
from pathlib import Path

from aimesh.notifier.state_db import RocksStateDb
from aimesh.notifier.store import DENIED, TaskStore, Update
from aimesh.v1 import result_pb2, task_pb2

TENANT = "acme"


def ids(count: int) -> list[str]:
    return [str(uuid.UUID(int=i + 1)) for i in range(count)]


def task(task_id: str) -> task_pb2.AITaskEvent:
    event = task_pb2.AITaskEvent(schema_version=1, task_id=task_id, model_name="sentiment", tenant=TENANT)
    event.submitted_at.GetCurrentTime()
    return event


def result(task_id: str, status: int, sequence: int = 0, text: str = "") -> result_pb2.AIResultEvent:
    event = result_pb2.AIResultEvent(schema_version=1, task_id=task_id, status=status, sequence=sequence)
    if text:
        event.output.tensors.add(name="TEXT", datatype="BYTES", string_data=[text])
    return event


class Clock:
    now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def store_in(path: Path, clock: Clock | None = None, **kwargs: int) -> TaskStore:
    return TaskStore(60, db=RocksStateDb(path, cache_bytes=1 << 20), clock=clock or Clock(), **kwargs)


def run(store: TaskStore, task_id: str, partials: int = 0) -> None:
    store.apply_task(task(task_id))
    store.apply_result(result(task_id, result_pb2.TASK_STATUS_RUNNING, 2))
    for i in range(partials):
        store.apply_result(result(task_id, result_pb2.TASK_STATUS_RUNNING, 3 + i, text=f"token{i}"))
    store.apply_result(result(task_id, result_pb2.TASK_STATUS_SUCCEEDED, 3 + partials, text="done"))


def drain(store: TaskStore, task_id: str, after: int) -> list[int | str]:
    queue = store.watch(task_id, TENANT, after_sequence=after)
    items = [queue.get_nowait() for _ in range(queue.qsize())]
    store.unwatch(task_id, queue)
    return [item.state.sequence if isinstance(item, Update) else "ended" for item in items]


def test_a_reopened_store_answers_every_task_and_resumes_watchers_from_its_history(tmp_path: Path) -> None:
    first = store_in(tmp_path)
    tasks = ids(50)
    for task_id in tasks:
        run(first, task_id, partials=3)
    first.flush({("results", 0): 200, ("tasks", 1): 51})
    first.close()

    again = store_in(tmp_path)
    assert len(again) == 50
    assert again.saved_offsets() == {("results", 0): 200, ("tasks", 1): 51}
    state = again.get(tasks[7], TENANT)
    assert (
        state is not None
        and state.status == result_pb2.TASK_STATUS_SUCCEEDED
        and state.result.output.tensors[0].string_data == ["done"]
    )
    assert state.model_name == "sentiment" and state.HasField("submitted_at")
    assert again.get(tasks[7], "other-tenant") is None
    assert drain(again, tasks[7], after=2) == [3, 4, 5, 6]  # the partial outputs, then the result
    assert drain(again, tasks[7], after=6) == ["ended"]


def test_unwritten_changes_are_not_on_disk_and_flushed_ones_are(tmp_path: Path) -> None:
    store = store_in(tmp_path)
    written, unwritten = ids(2)
    run(store, written)
    store.flush()
    run(store, unwritten)
    store._db.close()  # a killed process: the last batch was never flushed
    again = store_in(tmp_path)
    assert again.get(written, TENANT) is not None
    assert again.get(unwritten, TENANT) is None
    assert len(again) == 1


def test_memory_holds_at_most_the_cache_size_besides_watched_tasks_and_evicted_ones_still_answer(
    tmp_path: Path,
) -> None:
    store = store_in(tmp_path, cache_tasks=10)
    tasks = ids(100)
    watched = store.watch(tasks[0], TENANT)
    for task_id in tasks:
        run(store, task_id)
        store.flush()
    assert store.cached() <= 11
    assert all(store.get(task_id, TENANT) is not None for task_id in tasks)
    assert store.cached() <= 11  # a lookup does not fill the cache
    statuses = [watched.get_nowait().state.status for _ in range(watched.qsize())]
    assert statuses[-1] == result_pb2.TASK_STATUS_SUCCEEDED


def test_a_live_task_evicted_from_memory_continues_from_disk_without_repeating_a_sequence(tmp_path: Path) -> None:
    store = store_in(tmp_path, cache_tasks=1)
    slow, *fast = ids(5)
    store.apply_task(task(slow))
    store.apply_result(result(slow, result_pb2.TASK_STATUS_RUNNING, 2))
    store.flush()
    for task_id in fast:
        run(store, task_id)
        store.flush()
    store.apply_result(result(slow, result_pb2.TASK_STATUS_RUNNING, 2))  # a repeat: changes nothing
    store.apply_result(result(slow, result_pb2.TASK_STATUS_SUCCEEDED, 3))
    store.flush()
    assert drain(store, slow, after=0) == [3]
    assert drain(store, slow, after=1) == [2, 3]


def test_expiry_removes_a_task_from_disk_too_and_spares_watched_ones(tmp_path: Path) -> None:
    clock = Clock()
    store = store_in(tmp_path, clock)
    old, watched, recent = ids(3)
    run(store, old, partials=2)
    run(store, watched)
    queue = store.watch(watched, TENANT)
    clock.now += 50
    run(store, recent)
    clock.now += 20
    assert store.expire() == 1
    assert store.get(old, TENANT) is None and store.get(watched, TENANT) is not None
    store.unwatch(watched, queue)
    store.close()
    again = store_in(tmp_path, clock)
    assert again.get(old, TENANT) is None and len(again) == 2
    leftovers = [key for key, _ in again._db.items(b"", b"\xff") if old.encode() in key]
    assert leftovers == []


def test_a_task_past_its_kept_updates_keeps_only_the_newest_on_disk(tmp_path: Path) -> None:
    store = store_in(tmp_path, max_updates_per_task=4)
    (task_id,) = ids(1)
    run(store, task_id, partials=10)
    store.flush()
    store.close()
    again = store_in(tmp_path, max_updates_per_task=4)
    assert drain(again, task_id, after=1) == [10, 11, 12, 13]
    history = [key for key, _ in again._db.items(b"h/", b"h0")]
    assert len(history) == 3  # the current state is kept apart


def test_a_repeated_task_record_changes_nothing(tmp_path: Path) -> None:
    store = store_in(tmp_path)
    (task_id,) = ids(1)
    first = task(task_id)
    first.submitted_at.FromSeconds(100)
    store.apply_task(first)
    store.apply_task(task(task_id))  # the same key submitted through another ingest replica
    state = store.get(task_id, TENANT)
    assert state is not None and state.submitted_at.seconds == 100 and state.sequence == 1


def test_results_read_before_their_task_record_are_patched_on_disk_too(tmp_path: Path) -> None:
    store = store_in(tmp_path)
    (task_id,) = ids(1)
    store.apply_result(result(task_id, result_pb2.TASK_STATUS_RUNNING, 2))
    store.apply_result(result(task_id, result_pb2.TASK_STATUS_RUNNING, 3, text="a"))
    store.flush()
    store.apply_task(task(task_id))
    store.flush()
    store.close()
    again = store_in(tmp_path)
    queue = again.watch(task_id, TENANT, after_sequence=1)
    states = [item.state for item in (queue.get_nowait() for _ in range(queue.qsize())) if isinstance(item, Update)]
    assert [s.sequence for s in states] == [2, 3]
    assert all(s.model_name == "sentiment" and s.HasField("submitted_at") for s in states)


def test_watchers_of_a_task_another_tenant_owns_are_denied_after_a_restart(tmp_path: Path) -> None:
    store = store_in(tmp_path)
    (task_id,) = ids(1)
    run(store, task_id)
    store.close()
    again = store_in(tmp_path)
    queue = again.watch(task_id, "intruder")
    assert queue.qsize() == 1 and queue.get_nowait() is DENIED


def test_a_state_read_from_another_kafka_cluster_is_dropped_but_its_watchers_stay(tmp_path: Path) -> None:
    store = store_in(tmp_path)
    old, watched = ids(2)
    run(store, old)
    store.apply_task(task(watched))
    queue = store.watch(watched, TENANT)
    store.flush({("results", 0): 99})
    store.reset("new-cluster")
    assert store.cluster_id() == "new-cluster" and len(store) == 0 and store.saved_offsets() == {}
    assert store.get(old, TENANT) is None
    queue.get_nowait()  # QUEUED, from the old cluster
    run(store, watched)  # the new cluster's records: QUEUED again, not delivered twice
    assert [queue.get_nowait().state.sequence for _ in range(queue.qsize())] == [2, 3]
    store.close()
    again = store_in(tmp_path)
    assert again.cluster_id() == "new-cluster" and len(again) == 1
