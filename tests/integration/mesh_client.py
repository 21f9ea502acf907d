"""Small gRPC and Kafka helpers for the tests that drive the running mesh."""

from __future__ import annotations

import time
import uuid
from collections import Counter

import grpc
from confluent_kafka import Consumer, Producer, TopicPartition
from google.protobuf.timestamp_pb2 import Timestamp

from aimesh import events
from aimesh.v1 import ingest_pb2, ingest_pb2_grpc, notifier_pb2, notifier_pb2_grpc, result_pb2, task_pb2


class MeshClient:
    def __init__(self, ingest_address: str, notifier_address: str) -> None:
        self._ingest_channel = grpc.aio.insecure_channel(ingest_address)
        self._notifier_channel = grpc.aio.insecure_channel(notifier_address)
        self.ingest = ingest_pb2_grpc.IngestServiceStub(self._ingest_channel)
        self.notifier = notifier_pb2_grpc.NotifierServiceStub(self._notifier_channel)

    async def close(self) -> None:
        await self._ingest_channel.close()
        await self._notifier_channel.close()

    async def submit(self, model: str, text: str, **kw: object) -> str:
        reply = await self.ingest.SubmitTask(
            ingest_pb2.SubmitTaskRequest(model_name=model, input=task_pb2.TaskInput(text=text), **kw), timeout=30
        )
        return reply.task_id

    async def updates(self, task_id: str, timeout_s: float = 60) -> list[notifier_pb2.TaskState]:
        stream = self.notifier.WatchTask(notifier_pb2.WatchTaskRequest(task_id=task_id), timeout=timeout_s)
        return [update.state async for update in stream]

    async def result(self, task_id: str, timeout_s: float = 60) -> result_pb2.AIResultEvent:
        states = await self.updates(task_id, timeout_s)
        assert events.is_terminal(states[-1].status), states
        return states[-1].result


def publish_garbage_then_expired_task(bootstrap: str, topic: str) -> str:
    """Write straight onto the tasks topic, under one key (one partition): bytes that are not protobuf, then a
    task whose deadline passed 30 s ago. Return the expired task's id."""
    expired_id = str(uuid.uuid4())
    expired = task_pb2.AITaskEvent(
        schema_version=1,
        task_id=expired_id,
        model_name="sleep",
        input=task_pb2.TaskInput(text="too late"),
        submitted_at=Timestamp(seconds=int(time.time()) - 60),
        deadline=Timestamp(seconds=int(time.time()) - 30),
    )
    producer = Producer({"bootstrap.servers": bootstrap})
    key = str(uuid.uuid4())
    producer.produce(topic, key=key, value=b"\xff\x00 definitely not protobuf")
    producer.produce(topic, key=key, value=expired.SerializeToString())
    assert producer.flush(10) == 0
    return expired_id


def tensor(result: result_pb2.AIResultEvent, name: str) -> result_pb2.OutputTensor:
    found = [t for t in result.output.tensors if t.name == name]
    assert found, f"no output {name} in {result}"
    return found[0]


def terminal_results_by_task(bootstrap: str, topic: str) -> Counter[str]:
    """Read the whole results topic as a read_committed consumer: terminal results per task id."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"test-reader-{uuid.uuid4()}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    try:
        metadata = consumer.list_topics(topic, timeout=10).topics[topic]
        partitions = [TopicPartition(topic, p, 0) for p in metadata.partitions]
        ends = {p.partition: consumer.get_watermark_offsets(p, timeout=10)[1] for p in partitions}
        consumer.assign(partitions)
        counts: Counter[str] = Counter()
        positions = {p: 0 for p in ends}
        while any(positions[p] < ends[p] for p in ends):
            message = consumer.poll(5)
            if message is None:
                break
            if message.error():
                continue
            positions[message.partition()] = message.offset() + 1
            event = events.decode_result(message.value())
            if events.is_terminal(event.status):
                counts[event.task_id] += 1
        return counts
    finally:
        consumer.close()
