"""The notifier-state benchmarks' workload (benchmarks/state_store_choice.py, benchmarks/notifier_state.py): the
writes they claim to model, and the settings they pass."""

from collections import defaultdict

import pytest

from aimesh.v1 import notifier_pb2, result_pb2
from benchmarks.notifier_state import parse_env, task_id
from benchmarks.state_store_choice import BATCH_RECORDS, OFFSETS_KEY, batches, state

STATUSES = [result_pb2.TASK_STATUS_QUEUED, result_pb2.TASK_STATUS_RUNNING, result_pb2.TASK_STATUS_SUCCEEDED]


def test_every_task_is_written_three_times_in_order_with_one_index_key() -> None:
    tasks = 1000
    written: dict[bytes, list[int]] = defaultdict(list)
    index_keys: list[bytes] = []
    sizes, offsets = [], []
    for puts, saved in batches(0, tasks):
        sizes.append(len(puts))
        offsets.append(saved)
        for key, value in puts:
            if key.startswith(b"t/"):
                index_keys.append(key)
            else:
                written[key].append(notifier_pb2.TaskState.FromString(value).status)
    assert len(written) == tasks
    assert all(statuses == STATUSES for statuses in written.values())
    assert sorted(index_keys) == index_keys  # the first tasks written are the first the time index finds
    assert {k.rsplit(b"/", 1)[1] for k in index_keys} == set(written) and len(index_keys) == tasks
    assert max(sizes) <= BATCH_RECORDS + BATCH_RECORDS // 3  # the index keys ride with the QUEUED updates
    assert all(offsets) and OFFSETS_KEY not in written


def test_terminal_states_are_the_size_of_real_results() -> None:
    terminal = [notifier_pb2.TaskState.FromString(state(i, 2)) for i in range(1000)]
    assert {t.result.task_id for t in terminal} == {task_id(i) for i in range(1000)}
    sizes = [t.ByteSize() for t in terminal]
    assert 250 <= min(sizes) and max(sizes) <= 600  # a sentiment label and scores, or a short generated text


def test_task_ids_are_distinct_uuids_of_36_characters() -> None:
    ids = {task_id(i) for i in range(10_000)}
    assert len(ids) == 10_000 and {len(i) for i in ids} == {36}


def test_notifier_env_pairs_split_at_the_first_equals_sign() -> None:
    assert parse_env(["AIMESH_NOTIFIER_STATE_CACHE_BYTES=1=2", "AIMESH_LOG_LEVEL="]) == {
        "AIMESH_NOTIFIER_STATE_CACHE_BYTES": "1=2",
        "AIMESH_LOG_LEVEL": "",
    }
    with pytest.raises(ValueError):
        parse_env(["AIMESH_RETENTION_S"])
