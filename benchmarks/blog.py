"""The blog design as a baseline: a Kafka consumer that takes one record per poll (``max.poll.records=1``), calls
Triton synchronously, produces the result and commits, then takes the next; run on the same tasks topic (its own
consumer group) and the same model as the mesh."""

from __future__ import annotations

import argparse
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as triton_sync
from confluent_kafka import Consumer, Producer
from tritonclient.grpc import InferInput

from aimesh import events
from aimesh.v1 import result_pb2
from benchmarks import sections
from benchmarks.common import Section, Workers, log, median, median_ratio, spread, tasks_for
from benchmarks.throughput import measure_backlog, mesh_at_top, top

TITLE = sections.BLOG
METHOD = (
    "The consumer of the blog design (`../shared/background/`): Spring Kafka's listener tuned as the blog "
    "advises, `max.poll.records=1`, so it takes one record, calls the model synchronously (tritonclient gRPC, "
    "the same Triton and `sleep` model), sends the result to the results topic and commits the record's offset "
    "before polling again. Written with confluent_kafka, run as threads of the benchmark process, one consumer "
    "(the blog's) and one per partition of the tasks topic (the most one consumer group can use). Measured like "
    "the mesh: a new consumer group at the tasks topic's end, a burst of tasks once every consumer holds its "
    "partitions, the steady rate of terminal results on the results topic. The ratio is the mesh's throughput "
    "at the top concurrency of the sweep over the blog design's, round by round: each blog consumer holds one "
    "task at a time, so Triton never gets a batch."
)


class BlogConsumer:
    """One consumer of the blog design (Spring's listener with ``max.poll.records=1`` and a commit per record),
    on its own thread."""

    def __init__(self, bootstrap: str, group: str, tasks_topic: str, results_topic: str, triton_url: str) -> None:
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": group,
                "enable.auto.commit": False,
                "max.poll.interval.ms": 300_000,
                "socket.nagle.disable": True,
            }
        )
        self._producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 0})
        self._triton = triton_sync.InferenceServerClient(triton_url)
        self._tasks_topic = tasks_topic
        self._results_topic = results_topic
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="blog-consumer", daemon=True)

    def start(self) -> None:
        self._consumer.subscribe([self._tasks_topic])
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            message = self._consumer.poll(0.1)  # one record per poll: max.poll.records=1
            if message is None or message.error():
                continue
            task = events.decode_task(message.value())
            tensor = InferInput("TEXT", [1, 1], "BYTES")
            tensor.set_data_from_numpy(np.array([[task.input.text.encode()]], dtype=np.object_))
            output = self._triton.infer(task.model_name, [tensor], parameters=dict(task.parameters))
            result = result_pb2.AIResultEvent(
                schema_version=events.SCHEMA_VERSION,
                task_id=task.task_id,
                status=result_pb2.TASK_STATUS_SUCCEEDED,
                model_name=task.model_name,
                worker_id="blog-consumer",
                produced_at=events.now_timestamp(),
            )
            text = output.as_numpy("TEXT").reshape(-1)
            result.output.tensors.add(name="TEXT", datatype="BYTES", shape=[1], string_data=[text[0].decode()])
            self._producer.produce(self._results_topic, key=task.task_id, value=result.SerializeToString())
            self._producer.poll(0)
            self._consumer.commit(message=message, asynchronous=False)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._producer.flush(30)
        self._consumer.close()
        self._triton.close()


def blog_rate(workers: Workers, consumers: int, tasks: int, delay_ms: int) -> float:
    stack = workers.stack
    running: list[BlogConsumer] = []

    def start(group: str) -> None:
        for _ in range(consumers):
            running.append(
                BlogConsumer(
                    stack.kafka_bootstrap, group, stack.topics.tasks_topic, stack.topics.results_topic, stack.triton_url
                )
            )
            running[-1].start()

    def stop() -> None:
        for consumer in running:
            consumer.stop()

    return measure_backlog(
        workers, tasks, members=consumers, concurrency=consumers, delay_ms=delay_ms, start=start, stop=stop
    )


def consumer_counts(workers: Workers) -> list[int]:
    """One consumer, as in the blog, and one per partition, the most one consumer group can use."""
    return sorted({1, workers.stack.settings.tasks_partitions})


def measure(workers: Workers, args: argparse.Namespace) -> dict[str, Any]:
    workers.stop()
    points: dict[int, float] = {}
    for consumers in consumer_counts(workers):
        points[consumers] = blog_rate(
            workers, consumers, tasks_for(consumers, args.seconds, args.delay_ms), args.delay_ms
        )
        log(f"  blog design, {consumers} consumer(s): {points[consumers]:.1f}/s")
    return {"points": points}


def report(rounds: Sequence[dict[str, Any]], args: argparse.Namespace, plots: Path) -> Section:
    mesh = mesh_at_top(rounds, args)
    rows = ["| blog consumers | tasks/s | mesh (concurrency " + str(top(args)) + ") / blog |", "|---|---|---|"]
    for consumers in sorted(rounds[0]["blog"]["points"]):
        rates = [r["blog"]["points"][consumers] for r in rounds]
        rows.append(f"| {consumers} | {spread(rates)} | {median_ratio(mesh, rates):.1f}x |")
    results = "\n".join(
        [
            f"Median of {len(rounds)} rounds (min-max), `delay_ms` = {args.delay_ms}; the mesh ran "
            f"{median(mesh):.1f} tasks/s at concurrency {top(args)} in the same rounds.",
            "",
            *rows,
        ]
    )
    return Section(TITLE, METHOD, results)
