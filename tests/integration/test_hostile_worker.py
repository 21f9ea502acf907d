"""Hostile task records written straight to the tasks topic (as any producer could, bypassing ingest's checks) never
stall a worker or hurt other tasks: on the real broker, the real Triton and the mesh's two workers."""

from __future__ import annotations

import time
import urllib.request

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient
from google.protobuf.timestamp_pb2 import Timestamp

from aimesh import events
from aimesh.devstack.stack import Stack
from aimesh.v1 import result_pb2

from .mesh_client import TopicReader, headers_of, read_topic, task_record, wait_for_results

pytestmark = pytest.mark.integration

RECORD_LIMIT = 1_000_000  # AIMESH_MAX_RECORD_BYTES's default, which the mesh runs with
GROUP = "aimesh-workers"


def owners(mesh: Stack) -> dict[int, str]:
    """Partition of the tasks topic -> the client id of the worker that owns it."""
    admin = AdminClient({"bootstrap.servers": mesh.kafka_bootstrap})
    group = admin.describe_consumer_groups([GROUP])[GROUP].result(timeout=10)
    topic = mesh.topics.tasks_topic
    return {
        tp.partition: m.client_id for m in group.members for tp in m.assignment.topic_partitions if tp.topic == topic
    }


def produce(mesh: Stack, records: list[tuple[int, tuple[str, bytes]]]) -> None:
    """Write (partition, (key, value)) records straight onto the tasks topic, in order."""
    producer = Producer({"bootstrap.servers": mesh.kafka_bootstrap, "message.max.bytes": 2_000_000})
    for partition, (key, value) in records:
        producer.produce(mesh.topics.tasks_topic, key=key, value=value, partition=partition)
    assert producer.flush(30) == 0


def aborted_transactions(mesh: Stack, worker: str) -> float:
    text = urllib.request.urlopen(mesh.metrics_url(worker), timeout=5).read().decode()
    line = [x for x in text.splitlines() if x.startswith('aimesh_worker_transactions_total{outcome="aborted"}')]
    return float(line[0].split()[-1]) if line else 0.0


def worker_name(client_id: str) -> str:
    return client_id.removeprefix("aimesh-worker-")  # worker-<i>


def test_an_oversize_result_fails_alone_and_the_workers_other_tasks_succeed_within_seconds(mesh: Stack) -> None:
    owner = owners(mesh)
    partition = min(owner)
    mine = sorted(p for p, o in owner.items() if o == owner[partition])
    name = worker_name(owner[partition])
    aborts_before = aborted_transactions(mesh, name)
    # Its result record (the text, plus the result's own fields) is over the record limit.
    oversize = task_record("sleep", "x" * RECORD_LIMIT)
    ordinary = [(p, task_record("sleep", f"ordinary {p}.{i}")) for p in mine for i in range(4)]
    with TopicReader(mesh.kafka_bootstrap, mesh.topics.results_topic) as reader:
        started = time.monotonic()
        produce(mesh, [(partition, oversize), *ordinary])
        done = wait_for_results(reader, [oversize[0], *(key for _, (key, _) in ordinary)], timeout_s=60)
        elapsed_s = time.monotonic() - started

    assert elapsed_s < 15, f"the tasks took {elapsed_s:.1f} s"
    for _, (task_id, _) in ordinary:
        assert [r.status for r in done[task_id]] == [result_pb2.TASK_STATUS_SUCCEEDED]
    [failed] = done[oversize[0]]
    assert failed.status == result_pb2.TASK_STATUS_FAILED
    assert failed.error.code == result_pb2.ERROR_CODE_RESULT_TOO_LARGE
    assert f"over the {RECORD_LIMIT}-byte record limit" in failed.error.message
    assert len(failed.SerializeToString()) < 10_000
    dead = [
        r
        for r in read_topic(mesh.kafka_bootstrap, mesh.topics.dead_letter_topic)
        if headers_of(r).get(events.DLQ_TASK_ID_HEADER) == oversize[0].encode()
    ]
    assert len(dead) == 1
    headers = headers_of(dead[0])
    assert headers[events.DLQ_REASON_HEADER] == b"result_too_large"
    assert headers[events.DLQ_TRUNCATED_HEADER] == str(len(oversize[1])).encode()
    assert oversize[1].startswith(dead[0].value()) and len(dead[0].value()) < RECORD_LIMIT
    assert aborted_transactions(mesh, name) - aborts_before <= 1  # not a transaction retried over and over


def test_an_absurd_deadline_and_a_near_one_do_not_hurt_the_tasks_they_share_a_request_with(mesh: Stack) -> None:
    owner = owners(mesh)
    first = min(owner)
    other = min(p for p, o in owner.items() if o != owner[first])  # the other worker: a request of its own
    absurd = task_record("sleep", "absurd deadline", deadline=Timestamp(seconds=10**13))
    near_deadline = Timestamp()
    near_deadline.FromNanoseconds(time.time_ns() + 300_000_000)
    near = task_record("sleep", "near deadline", deadline=near_deadline)
    ordinary = [task_record("sleep", f"ordinary {i}") for i in range(16)]
    with TopicReader(mesh.kafka_bootstrap, mesh.topics.results_topic) as reader:
        started = time.monotonic()
        # One burst per partition: fetched together, they share their worker's requests to Triton.
        produce(
            mesh,
            [(first, r) for r in [ordinary[0], absurd, *ordinary[1:8]]]
            + [(other, r) for r in [ordinary[8], near, *ordinary[9:]]],
        )
        done = wait_for_results(reader, [absurd[0], near[0], *(key for key, _ in ordinary)], timeout_s=60)
        elapsed_s = time.monotonic() - started

    assert elapsed_s < 10, f"the tasks took {elapsed_s:.1f} s"
    for task_id, _ in [*ordinary, absurd]:
        assert [r.status for r in done[task_id]] == [result_pb2.TASK_STATUS_SUCCEEDED], done[task_id]
    assert [r.status for r in done[near[0]]] in ([result_pb2.TASK_STATUS_SUCCEEDED], [result_pb2.TASK_STATUS_EXPIRED])
