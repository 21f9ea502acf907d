"""Records the worker cannot process go to the dead-letter topic with their reason, and never block the
tasks behind them on their partition."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest
from confluent_kafka import KafkaError, Message, Producer
from integration.mesh_client import (
    TopicReader,
    headers_of,
    not_exactly_once,
    read_topic,
    terminal_results,
    wait_caught_up,
    wait_for_results,
)

from aimesh import events
from aimesh.devstack.stack import Stack
from aimesh.v1 import result_pb2, task_pb2

from .conftest import WORKER_GROUP

# Generous: a failing run should end on the tests' own timeouts, whose messages name the tasks concerned.
pytestmark = [pytest.mark.fault, pytest.mark.timeout(600)]

GOOD_TASKS = 20


def task_record(model: str, text: str, *, schema_version: int = events.SCHEMA_VERSION) -> tuple[str, bytes]:
    """A task as ingest writes it: (task id, AITaskEvent bytes)."""
    task_id = str(uuid.uuid4())
    event = task_pb2.AITaskEvent(
        schema_version=schema_version,
        task_id=task_id,
        model_name=model,
        input=task_pb2.TaskInput(text=text),
        submitted_at=events.now_timestamp(),
    )
    return task_id, event.SerializeToString()


def produce_in_order(bootstrap: str, topic: str, key: bytes, values: list[bytes]) -> list[tuple[int, int]]:
    """Write ``values`` under one key (so onto one partition, in this order) with a plain producer; return each
    record's (partition, offset)."""
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    where: list[tuple[int, int] | None] = [None] * len(values)

    def delivered(i: int) -> Callable[[KafkaError | None, Message], None]:
        def report(err: KafkaError | None, msg: Message) -> None:
            assert err is None, err
            where[i] = (msg.partition(), msg.offset())

        return report

    for i, value in enumerate(values):
        producer.produce(topic, key=key, value=value, on_delivery=delivered(i))
    assert producer.flush(30) == 0
    assert all(w is not None for w in where)
    return [w for w in where if w is not None]


async def test_bad_records_go_to_the_dead_letter_topic_and_the_tasks_behind_them_complete(stack: Stack) -> None:
    ghost_id, ghost = task_record("ghost", "no Triton serves this model")
    future_id, future = task_record("sleep", "a schema from the future", schema_version=99)
    good = [task_record("sleep", f"behind the bad records {i}") for i in range(GOOD_TASKS)]
    # Original value and the reason the dead-letter record must carry, in the order they are written.
    bad = [
        (b"\xff\x00 definitely not protobuf", "not_protobuf"),
        (b"", "empty_value"),
        (future, "unknown_schema_version"),
        (ghost, "model_not_found"),
    ]
    key = str(uuid.uuid4()).encode()
    with TopicReader(stack.kafka_bootstrap, stack.topics.results_topic) as results:
        written = produce_in_order(
            stack.kafka_bootstrap, stack.topics.tasks_topic, key, [v for v, _ in bad] + [v for _, v in good]
        )
        good_ids = [task_id for task_id, _ in good]
        wait_for_results(results, [ghost_id, *good_ids], timeout_s=120)
    wait_caught_up(stack.kafka_bootstrap, WORKER_GROUP, stack.topics.tasks_topic)

    by_task = terminal_results(read_topic(stack.kafka_bootstrap, stack.topics.results_topic))
    problem = not_exactly_once([ghost_id, *good_ids], {t: len(by_task.get(t, [])) for t in [ghost_id, *good_ids]})
    assert not problem, problem
    assert all(by_task[t][0].status == result_pb2.TASK_STATUS_SUCCEEDED for t in good_ids)
    ghost_result = by_task[ghost_id][0]
    assert ghost_result.status == result_pb2.TASK_STATUS_FAILED
    assert ghost_result.error.code == result_pb2.ERROR_CODE_MODEL_NOT_FOUND
    # Whether a record of an unknown schema version is also answered is the worker's choice; at most once.
    assert len(by_task.get(future_id, [])) <= 1, by_task[future_id]

    dead = [r for r in read_topic(stack.kafka_bootstrap, stack.topics.dead_letter_topic) if r.key() == key]
    reasons = [headers_of(r).get(events.DLQ_REASON_HEADER, b"").decode() for r in dead]
    assert sorted(reasons) == sorted(reason for _, reason in bad), (
        f"dead-letter records under the test's key: {[headers_of(r) for r in dead]}"
    )
    for (value, reason), (partition, offset) in zip(bad, written[: len(bad)], strict=True):
        record = dead[reasons.index(reason)]
        headers = {name: v.decode() for name, v in headers_of(record).items()}
        assert (record.value() or b"") == value, reason
        assert headers[events.DLQ_TOPIC_HEADER] == stack.topics.tasks_topic, headers
        assert (int(headers[events.DLQ_PARTITION_HEADER]), int(headers[events.DLQ_OFFSET_HEADER])) == (
            partition,
            offset,
        ), headers
        assert headers[events.DLQ_ERROR_HEADER], headers
        assert headers[events.DLQ_WORKER_HEADER].startswith("worker-"), headers
        assert int(headers[events.DLQ_ATTEMPTS_HEADER]) >= (1 if reason == "model_not_found" else 0), headers
    ghost_headers = headers_of(dead[reasons.index("model_not_found")])
    assert ghost_headers[events.DLQ_TASK_ID_HEADER].decode() == ghost_id
