from aimesh.notifier.store import TaskStore
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
    store.apply_result(result(result_pb2.TASK_STATUS_SUCCEEDED, worker="first"))
    store.apply_result(result(result_pb2.TASK_STATUS_FAILED, worker="second"))
    store.apply_result(result(result_pb2.TASK_STATUS_RUNNING, worker="third"))
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
