"""The notifier-replicas benchmark's own reckoning (benchmarks/notifier_replicas.py): which tasks mark a
partition read to its end, and the CPU time it reads from /proc."""

import os

from aimesh.notifier.ownership import partition_of
from benchmarks.notifier_replicas import PARTITIONS, cpu_s, last_of_each_partition
from benchmarks.notifier_state import task_id


def test_the_probes_are_the_last_task_written_to_each_partition() -> None:
    tasks = 5000
    probes = last_of_each_partition(tasks)
    last = {partition_of(task_id(i), PARTITIONS): task_id(i) for i in range(tasks)}  # later tasks overwrite
    assert sorted(probes) == sorted(last.values())
    assert len(probes) == PARTITIONS


def test_cpu_seconds_grow_with_work_done() -> None:
    before = cpu_s(os.getpid())
    deadline = os.times().user + 0.2
    while os.times().user < deadline:
        pass
    assert cpu_s(os.getpid()) - before >= 0.15
