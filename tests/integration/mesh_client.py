"""Small gRPC and Kafka helpers for the tests that drive the running mesh."""

from __future__ import annotations

import time
import urllib.request
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence

import grpc
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, Producer, TopicPartition
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client.parser import text_string_to_metric_families

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

    async def submit_many(
        self, model: str, texts: Sequence[str], *, batch: int = 500, parameters: Mapping[str, str] | None = None
    ) -> list[str]:
        """Submit one task per text through SubmitTasks, ``batch`` tasks a call; return their ids in order."""
        task_ids: list[str] = []
        for start in range(0, len(texts), batch):
            request = ingest_pb2.SubmitTasksRequest(
                tasks=[
                    ingest_pb2.SubmitTaskRequest(
                        model_name=model, input=task_pb2.TaskInput(text=text), parameters=parameters or {}
                    )
                    for text in texts[start : start + batch]
                ]
            )
            reply = await self.ingest.SubmitTasks(request, timeout=60)
            task_ids.extend(t.task_id for t in reply.tasks)
        return task_ids

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


class TopicReader:
    """Every record of a topic from its first offset, as a read_committed consumer (records of open or aborted
    transactions stay invisible), collected into ``records``. Partitions are assigned, not subscribed: no group
    membership, no committed offsets."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.topic = topic
        self.records: list[Message] = []
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"test-reader-{uuid.uuid4()}",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
                "enable.partition.eof": True,
                # A broker a fault test stopped is expected to refuse connections for a while.
                "log_level": 0,
            }
        )
        metadata = self._consumer.list_topics(topic, timeout=30).topics[topic]
        if metadata.error is not None:
            raise RuntimeError(f"topic {topic}: {metadata.error}")
        self.partitions = sorted(metadata.partitions)
        self._at_end: set[int] = set()
        self._consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in self.partitions])

    def poll(self, timeout_s: float = 0.5, max_records: int = 1000) -> list[Message]:
        """The records that arrived within ``timeout_s`` (also appended to ``records``)."""
        fresh = []
        for message in self._consumer.consume(max_records, timeout_s):
            error = message.error()
            if error is None:
                self._at_end.discard(message.partition())
                fresh.append(message)
            elif error.code() == KafkaError._PARTITION_EOF:
                self._at_end.add(message.partition())
            elif not error.retriable():  # a broker a fault test stopped: the consumer reconnects by itself
                raise RuntimeError(f"reading {self.topic}: {error}")
        self.records.extend(fresh)
        return fresh

    def read_to_end(self, timeout_s: float = 60.0) -> list[Message]:
        """Read until every partition reported its end (for read_committed: its last stable offset); return all
        records read so far."""
        deadline = time.monotonic() + timeout_s
        while self._at_end != set(self.partitions):
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{self.topic}: partitions {sorted(set(self.partitions) - self._at_end)} "
                    f"not read to the end in {timeout_s:.0f} s"
                )
            self.poll()
        return self.records

    def close(self) -> None:
        self._consumer.close()

    def __enter__(self) -> TopicReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def read_topic(bootstrap: str, topic: str, timeout_s: float = 60.0) -> list[Message]:
    """Every committed record of ``topic``, read from the beginning to the end of each partition."""
    with TopicReader(bootstrap, topic) as reader:
        return reader.read_to_end(timeout_s)


def terminal_results(records: Iterable[Message]) -> dict[str, list[result_pb2.AIResultEvent]]:
    """The terminal results among results-topic records, by task id, in topic order (RUNNING updates left out)."""
    by_task: dict[str, list[result_pb2.AIResultEvent]] = defaultdict(list)
    for record in records:
        event = events.decode_result(record.value())
        if events.is_terminal(event.status):
            by_task[event.task_id].append(event)
    return by_task


def terminal_results_by_task(bootstrap: str, topic: str) -> Counter[str]:
    """Read the whole results topic as a read_committed consumer: terminal results per task id."""
    return Counter({task_id: len(r) for task_id, r in terminal_results(read_topic(bootstrap, topic)).items()})


def wait_for_results(
    reader: TopicReader, task_ids: Collection[str], *, at_least: int | None = None, timeout_s: float = 120.0
) -> dict[str, list[result_pb2.AIResultEvent]]:
    """Read on with ``reader`` (of the results topic) until ``at_least`` (default: all) of ``task_ids`` have a
    terminal result; return the terminal results of ``task_ids`` read so far, by task id.

    Raises:
        AssertionError: not enough results within ``timeout_s``; the message names tasks still without one.
    """
    wanted = set(task_ids)
    needed = len(wanted) if at_least is None else at_least
    done: dict[str, list[result_pb2.AIResultEvent]] = defaultdict(list)
    read = 0
    deadline = time.monotonic() + timeout_s
    while True:
        for task_id, results in terminal_results(reader.records[read:]).items():
            if task_id in wanted:
                done[task_id].extend(results)
        read = len(reader.records)
        if len(done) >= needed:
            return done
        if time.monotonic() > deadline:
            missing = sorted(wanted - done.keys())
            raise AssertionError(
                f"only {len(done)} of {len(wanted)} tasks have a terminal result after {timeout_s:.0f} s "
                f"({needed} wanted); {len(missing)} without one, such as {missing[:20]}"
            )
        reader.poll(0.2)


def not_exactly_once(task_ids: Iterable[str], counts: Mapping[str, int], *, show: int = 20) -> str:
    """Empty if every task in ``task_ids`` has exactly one terminal result in ``counts``; else a report of the
    missing and the duplicated tasks."""
    ids = list(task_ids)
    missing = [t for t in ids if counts.get(t, 0) == 0]
    duplicated = {t: counts[t] for t in ids if counts.get(t, 0) > 1}
    if not missing and not duplicated:
        return ""
    return (
        f"of {len(ids)} tasks, {len(missing)} have no terminal result {missing[:show]} and "
        f"{len(duplicated)} have several {dict(list(duplicated.items())[:show])}"
    )


def metric_total(metrics_url: str, name: str, **labels: str) -> float:
    """The sum of metric ``name``'s samples (those with ``labels``) that a service serves at ``metrics_url``."""
    with urllib.request.urlopen(metrics_url, timeout=5) as response:
        text = response.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def headers_of(record: Message) -> dict[str, bytes]:
    return {name: value or b"" for name, value in record.headers() or []}


def wait_caught_up(bootstrap: str, group: str, topic: str, timeout_s: float = 60.0) -> None:
    """Wait until consumer group ``group`` has committed the end offset of every partition of ``topic``: every
    record is processed for good, so nothing more will be produced for it (no late duplicate either)."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,  # never subscribes: reads the group's committed offsets without joining it
            "enable.auto.commit": False,
            "isolation.level": "read_committed",  # waits for offsets still pending in a transaction
            "log_level": 0,
        }
    )
    try:
        partitions = [
            TopicPartition(topic, p) for p in consumer.list_topics(topic, timeout=30).topics[topic].partitions
        ]
        deadline = time.monotonic() + timeout_s
        while True:
            watermarks = {
                tp.partition: consumer.get_watermark_offsets(tp, timeout=10, cached=False) for tp in partitions
            }
            # A partition the group never committed (a negative offset) is done only if it holds no record.
            committed = {
                tp.partition: tp.offset if tp.offset >= 0 else watermarks[tp.partition][0]
                for tp in consumer.committed(partitions, timeout=10)
            }
            behind = {p: (committed[p], end) for p, (_, end) in watermarks.items() if committed[p] < end}
            if not behind:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"group {group} still behind on {topic} after {timeout_s:.0f} s "
                    f"(partition: (committed, end)): {behind}"
                )
            time.sleep(0.5)
    finally:
        consumer.close()


def produce_raw(bootstrap: str, topic: str, records: Iterable[tuple[str, bytes]]) -> None:
    """Write (key, value) records straight onto ``topic``, as ingest or the notifier would, and wait for them."""
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    for key, value in records:
        producer.produce(topic, key=key, value=value)
    assert producer.flush(30) == 0


def task_record(model: str, text: str, *, tenant: str = "default", **fields: object) -> tuple[str, bytes]:
    """A new task as ingest writes it (its own random id), as a (key, value) record."""
    task = task_pb2.AITaskEvent(
        schema_version=events.SCHEMA_VERSION,
        task_id=str(uuid.uuid4()),
        model_name=model,
        input=task_pb2.TaskInput(text=text),
        tenant=tenant,
        **fields,  # type: ignore[arg-type]
    )
    task.submitted_at.GetCurrentTime()
    return task.task_id, task.SerializeToString()


def cancel_record(task_id: str, *, tenant: str = "default") -> tuple[str, bytes]:
    """A cancellation request as the notifier's CancelTask writes it, as a (key, value) record."""
    cancel = task_pb2.AICancelEvent(schema_version=events.SCHEMA_VERSION, task_id=task_id, tenant=tenant)
    cancel.requested_at.GetCurrentTime()
    return task_id, cancel.SerializeToString()


def task_updates(
    reader: TopicReader,
    task_ids: Collection[str],
    *,
    until: Callable[[dict[str, list[result_pb2.AIResultEvent]]], bool] | None = None,
    timeout_s: float = 60.0,
) -> dict[str, list[result_pb2.AIResultEvent]]:
    """Read ``reader``'s results topic until ``until(updates)`` holds (default: every task has a terminal result);
    return each task's result records in topic order."""
    wanted = set(task_ids)
    updates: dict[str, list[result_pb2.AIResultEvent]] = {t: [] for t in wanted}

    def done(u: dict[str, list[result_pb2.AIResultEvent]]) -> bool:
        return all(any(events.is_terminal(e.status) for e in u[t]) for t in wanted)

    check = until or done
    deadline = time.monotonic() + timeout_s
    while not check(updates):
        if time.monotonic() > deadline:
            raise TimeoutError(f"results of {len(wanted)} tasks not complete in {timeout_s:.0f} s: {updates}")
        for message in reader.poll():
            event = events.decode_result(message.value())
            if event.task_id in wanted:
                updates[event.task_id].append(event)
    return updates


def slow_head_on_every_partition(bootstrap: str, topic: str, partitions: int, delay_ms: int) -> list[str]:
    """Write one slow ``sleep`` task straight onto each of ``partitions`` partitions of ``topic`` (ingest picks
    the partition by task id); their task ids."""
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    ids = []
    for partition in range(partitions):
        task_id, value = task_record("sleep", f"slow head {partition}", parameters={"delay_ms": str(delay_ms)})
        producer.produce(topic, key=task_id, value=value, partition=partition)
        ids.append(task_id)
    assert producer.flush(30) == 0
    return ids
