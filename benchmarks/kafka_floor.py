"""The floor under the mesh's latency: the bare Kafka chain a task's record and its result travel, without the mesh.

Two chains, on the mesh's own broker, each on topics of its own created as the mesh's tasks and results topics are
(partitions, replication), with records of the mesh's sizes and the mesh's client settings:

- ``exactly_once``: an idempotent producer publishes the task record and waits for its acknowledgement (ingest's
  hop); a group consumer (read_committed) receives it and a transactional producer publishes the result record,
  sends the consumer's offset to the transaction and commits it (the worker's hop); a read_committed consumer
  receives the result (the notifier's hop).
- ``at_least_once``: the same, except that the worker's hop publishes the result with an idempotent producer, waits
  for its acknowledgement, then commits the consumer's offset synchronously: no transaction.

The worker's and the notifier's consumers run on threads of their own, as in the services; the driver sends one
record at a time and times it from the task's produce until the result is received.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Literal, NamedTuple

from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition

from aimesh import events
from aimesh.devstack.kafka import create_topics, replication_for
from aimesh.devstack.stack import Stack
from aimesh.kafka import Record, consumer_config, fetch, producer_config
from aimesh.kafka_producer import AsyncProducer
from aimesh.v1 import ingest_pb2, notifier_pb2, result_pb2, task_pb2
from aimesh.worker.transactions import transactional_config
from benchmarks.common import AUTH, MeshClient
from benchmarks.grpc_floor import Sizes

Guarantee = Literal["exactly_once", "at_least_once"]
GUARANTEES: tuple[Guarantee, ...] = ("exactly_once", "at_least_once")
TIMEOUT_S = 30.0
# The services' fetch setting (worker and notifier): a fetch the broker holds open delays the next one.
FETCH_WAIT = {"fetch.wait.max.ms": 100}


class Records(NamedTuple):
    """The values a chain sends: a task record and a result record as the mesh writes them for one task; and the
    sizes of the task's gRPC messages (``grpc_floor``): SubmitTask's request and reply, the terminal update."""

    task: bytes
    result: bytes
    sizes: Sizes


async def sample_records(mesh: MeshClient, request: ingest_pb2.SubmitTaskRequest) -> Records:
    """Run one task through the mesh; its task record as ingest encodes it and its terminal result as published."""
    reply = await mesh.ingest.SubmitTask(request, timeout=TIMEOUT_S, metadata=AUTH)
    result = result_pb2.AIResultEvent()
    update_bytes = 0
    watch = notifier_pb2.WatchTaskRequest(task_id=reply.task_id)
    async for update in mesh.notifier.WatchTask(watch, timeout=TIMEOUT_S, metadata=AUTH):
        if events.is_terminal(update.state.status):
            result, update_bytes = update.state.result, update.ByteSize()
    task = task_pb2.AITaskEvent(
        schema_version=events.SCHEMA_VERSION,
        task_id=reply.task_id,
        model_name=request.model_name,
        input=request.input,
        parameters=request.parameters,
        submitted_at=events.now_timestamp(),
        tenant=result.tenant,
        priority=task_pb2.PRIORITY_INTERACTIVE,
    )
    sizes = Sizes(request.ByteSize(), reply.ByteSize(), update_bytes)
    return Records(task.SerializeToString(), result.SerializeToString(), sizes)


class KafkaChain:
    """One bare chain on topics of its own; ``run`` sends one task record and returns the milliseconds until its
    result record was received. Use as ``async with KafkaChain(stack, guarantee, records) as chain``."""

    def __init__(self, stack: Stack, guarantee: Guarantee, records: Records) -> None:
        self.guarantee = guarantee
        self._stack = stack
        self._records = records
        self._name = f"floor-{guarantee.replace('_', '-')}-{uuid.uuid4().hex[:8]}"
        self.tasks_topic, self.results_topic = f"{self._name}-tasks", f"{self._name}-results"
        self._waiting: dict[bytes, asyncio.Future[float]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    async def __aenter__(self) -> KafkaChain:
        await asyncio.to_thread(self._create_topics)
        self._loop = asyncio.get_running_loop()
        self._ingest = AsyncProducer(self._producer_config("ingest"))
        await self._ingest.start()
        ready = [threading.Event(), threading.Event()]
        for target, event in zip((self._worker, self._notifier), ready, strict=True):
            thread = threading.Thread(target=target, args=(event,), name=f"{self._name}-{target.__name__}", daemon=True)
            thread.start()
            self._threads.append(thread)
        if not all(await asyncio.gather(*(asyncio.to_thread(e.wait, 60) for e in ready))):
            raise TimeoutError(f"{self._name}: the chain's consumers got no partitions in 60 s")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            await asyncio.to_thread(thread.join)
        await self._ingest.stop()

    async def run(self) -> float:
        key = uuid.uuid4().hex.encode()
        arrived: asyncio.Future[float] = self._loop.create_future()
        with self._lock:
            self._waiting[key] = arrived
        started = time.perf_counter()
        await self._ingest.produce(
            self.tasks_topic, key=key.decode(), value=self._records.task, headers=events.task_headers()
        )
        return (await asyncio.wait_for(arrived, TIMEOUT_S) - started) * 1000

    # --- the chain's parts --------------------------------------------------------------------------------------
    def _create_topics(self) -> None:
        settings = self._stack.settings
        replicas, min_in_sync = replication_for(settings.brokers)
        create_topics(
            self._stack.kafka_bootstrap,
            {self.tasks_topic: settings.tasks_partitions, self.results_topic: settings.results_partitions},
            replication_factor=replicas,
            min_insync_replicas=min_in_sync if settings.brokers > 1 else None,
        )

    def _producer_config(self, part: str) -> dict[str, Any]:
        return producer_config(
            self._stack.kafka_bootstrap, client_id=f"{self._name}-{part}", delivery_timeout_s=TIMEOUT_S
        )

    def _consumer(self, part: str, topic: str, ready: threading.Event, extra: Mapping[str, Any]) -> Consumer:
        group = f"{self._name}-{part}"
        config = consumer_config(self._stack.kafka_bootstrap, group_id=group, client_id=group, extra=dict(extra))
        consumer = Consumer(config)

        def assigned(_: Consumer, partitions: list[TopicPartition]) -> None:
            if partitions:
                ready.set()

        consumer.subscribe([topic], on_assign=assigned)
        return consumer

    def _consume(self, consumer: Consumer, handle: Callable[[Message], None]) -> None:
        try:
            while not self._stop.is_set():
                for message in fetch(consumer, 100, 0.1):
                    if message.error() is None:
                        handle(message)
        finally:
            consumer.close()

    def _worker(self, ready: threading.Event) -> None:
        consumer = self._consumer("worker", self.tasks_topic, ready, FETCH_WAIT)
        if self.guarantee == "exactly_once":
            producer = Producer(
                transactional_config(
                    self._producer_config("worker"),
                    transactional_id=f"{self._name}-worker",
                    transaction_timeout_s=60.0,
                )
            )
            producer.init_transactions(TIMEOUT_S)
            self._consume(consumer, lambda message: self._in_transaction(producer, consumer, message))
        else:
            producer = Producer(self._producer_config("worker"))
            self._consume(consumer, lambda message: self._acknowledged(producer, consumer, message))

    def _result_of(self, message: Message) -> dict[str, Any]:
        return {"key": message.key(), "value": self._records.result, "headers": events.result_headers()}

    def _in_transaction(self, producer: Producer, consumer: Consumer, message: Message) -> None:
        producer.begin_transaction()
        producer.produce(self.results_topic, **self._result_of(message))
        producer.send_offsets_to_transaction(_next_offset(message), consumer.consumer_group_metadata(), TIMEOUT_S)
        producer.commit_transaction(TIMEOUT_S)

    def _acknowledged(self, producer: Producer, consumer: Consumer, message: Message) -> None:
        errors: list[KafkaError] = []

        def delivered(error: KafkaError | None, _: Message) -> None:
            if error is not None:
                errors.append(error)

        producer.produce(self.results_topic, **self._result_of(message), on_delivery=delivered)
        if producer.flush(TIMEOUT_S) or errors:
            raise RuntimeError(f"{self._name}: a result was not acknowledged: {errors}")
        consumer.commit(offsets=_next_offset(message), asynchronous=False)

    def _notifier(self, ready: threading.Event) -> None:
        # The notifier's prefetch limit as well as its fetch wait.
        consumer = self._consumer(
            "notifier", self.results_topic, ready, {**FETCH_WAIT, "queued.max.messages.kbytes": 8192}
        )
        self._consume(consumer, self._received)

    def _received(self, message: Message) -> None:
        now = time.perf_counter()
        with self._lock:
            arrived = self._waiting.pop(message.key() or b"", None)
        if arrived is not None:
            self._loop.call_soon_threadsafe(_settle, arrived, now)


def _next_offset(message: Message) -> list[TopicPartition]:
    record = Record.of(message)
    return [TopicPartition(record.topic, record.partition, record.offset + 1)]


def _settle(future: asyncio.Future[float], value: float) -> None:
    if not future.done():
        future.set_result(value)


@contextlib.asynccontextmanager
async def floor_chains(
    stack: Stack, records: Records, guarantees: tuple[Guarantee, ...] = GUARANTEES
) -> AsyncIterator[dict[Guarantee, KafkaChain]]:
    """A chain per guarantee on ``stack``'s broker, ready to run."""
    async with contextlib.AsyncExitStack() as chains:
        yield {g: await chains.enter_async_context(KafkaChain(stack, g, records)) for g in guarantees}
