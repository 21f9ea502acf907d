"""How long a worker newly assigned a partition takes to learn its recent derived task ids (``Duplicates.assign``),
and what they cost in memory, on one local Kafka broker: ``python -m benchmarks.duplicates_rebuild [records]``.

Every record gets a task id derived from an idempotency key (the worst case: random ids are read but not kept)."""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path

from confluent_kafka import Consumer, Producer, TopicPartition

from aimesh import events
from aimesh.devstack.kafka import KafkaCluster, create_topics, ensure_kafka_jars
from aimesh.devstack.stack import StackSettings
from aimesh.ingest.idempotency import derived_task_id
from aimesh.kafka import consumer_config
from aimesh.v1 import task_pb2
from aimesh.worker.duplicates import Duplicates

TOPIC, GROUP = "rebuild.tasks", "rebuild-bench"


def fill(bootstrap: str, records: int) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "enable.idempotence": True})
    for i in range(records):
        task_id = derived_task_id("acme", f"order-{i}")
        task = task_pb2.AITaskEvent(
            schema_version=events.SCHEMA_VERSION,
            task_id=task_id,
            model_name="sentiment",
            input=task_pb2.TaskInput(text=f"an ordinary sentence of about sixty bytes, number {i}"),
            submitted_at=events.now_timestamp(),
            idempotency_key=f"order-{i}",
            tenant="acme",
        )
        while True:
            try:
                producer.produce(TOPIC, key=task_id, value=task.SerializeToString(), partition=0)
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
    if producer.flush(60) != 0:
        raise RuntimeError("records not acknowledged")
    committer = Consumer({"bootstrap.servers": bootstrap, "group.id": GROUP, "enable.auto.commit": False})
    committer.commit(offsets=[TopicPartition(TOPIC, 0, records)], asynchronous=False)
    committer.close()


def rebuild(bootstrap: str, records: int, *, traced: bool = False) -> tuple[float, int, int]:
    """Seconds one assignment takes, derived ids learned, and (``traced``: measured with tracemalloc, which slows
    it) the bytes they hold."""
    config = consumer_config(bootstrap, group_id=GROUP, client_id="rebuild-bench")
    duplicates = Duplicates(3600.0, config)
    if traced:
        tracemalloc.start()
    started = time.perf_counter()
    duplicates.assign([(TOPIC, 0)], {(TOPIC, 0): (records, "")})
    seconds = time.perf_counter() - started
    held = tracemalloc.get_traced_memory()[0] if traced else 0
    tracemalloc.stop()
    return seconds, duplicates.tracked((TOPIC, 0)), held


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("records", type=int, nargs="?", default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        run_dir = Path(folder)
        settings = StackSettings.on_free_ports(run_dir)
        kafka = KafkaCluster(
            data_dir=run_dir / "kafka",
            ports=settings.kafka_ports(),
            lib_dir=ensure_kafka_jars(settings.cache_dir / "kafka"),
            log_dir=run_dir / "logs",
        )
        with kafka:
            create_topics(kafka.bootstrap, {TOPIC: 1}, replication_factor=1)
            fill(kafka.bootstrap, args.records)
            seconds = [rebuild(kafka.bootstrap, args.records)[0] for _ in range(args.runs)]
            _, ids, held = rebuild(kafka.bootstrap, args.records, traced=True)
    print(
        f"{args.records} records: rebuild {statistics.median(seconds):.2f} s median "
        f"({', '.join(f'{s:.2f}' for s in seconds)}); {ids} derived ids held in {held / 1e6:.1f} MB "
        f"({held / max(1, ids):.0f} bytes each)"
    )


if __name__ == "__main__":
    main()
