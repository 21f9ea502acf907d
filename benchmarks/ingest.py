"""Ingest: the sustained SubmitTask rate of many concurrent clients, against a bare grpc.aio echo server driven by
the same client and against librdkafka's raw produce rate for the same records."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import multiprocessing
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from confluent_kafka import Producer

from aimesh import events
from aimesh.devstack.ports import free_ports
from aimesh.kafka import producer_config
from aimesh.v1 import ingest_pb2, ingest_pb2_grpc, task_pb2
from benchmarks import sections
from benchmarks.common import (
    AUTH,
    SLEEP_MODEL,
    TEXT,
    Section,
    Workers,
    closed_loop,
    log,
    median_ratio,
    sleep_parameters,
    spread,
    steady_rate,
    submit_request,
)

CLIENTS = 64
CHANNELS = 4
RAW_RECORDS_PER_REQUEST = 5  # librdkafka is that much faster: more records, so its run lasts long enough to time
TITLE = sections.INGEST
METHOD = (
    f"{CLIENTS} closed-loop clients in one asyncio process call `SubmitTask` over {CHANNELS} gRPC channels "
    "(one `sleep` task each, no idempotency key) and the steady rate of answers is taken (10th to 90th "
    "percentile of completion times). The same client, in the same round, drives a bare grpc.aio server of "
    "the same service that answers at once (a process of its own, as ingest is), which bounds what any Python "
    "gRPC service reaches here. The third row is librdkafka alone: a confluent_kafka Producer with ingest's "
    "settings (idempotent, `acks=all`, no linger, no compression) producing the same serialized AITaskEvent "
    "records as fast as it takes them, timed from the first produce to the end of the final flush. No worker "
    "runs meanwhile; the notifier does (it follows the tasks topic)."
)


class EchoIngest(ingest_pb2_grpc.IngestServiceServicer):
    """IngestService that answers at once: what gRPC and the client cost, with nothing behind them."""

    async def SubmitTask(  # noqa: N802 (the proto's method name)
        self, request: ingest_pb2.SubmitTaskRequest, context: Any
    ) -> ingest_pb2.SubmitTaskResponse:
        return ingest_pb2.SubmitTaskResponse(task_id=str(uuid.uuid4()), accepted_at=events.now_timestamp())


def serve_echo(port: int) -> None:
    async def serve() -> None:
        server = grpc.aio.server()
        ingest_pb2_grpc.add_IngestServiceServicer_to_server(EchoIngest(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(serve())


async def submit_rate(address: str, total: int) -> float:
    """``CLIENTS`` closed-loop callers of SubmitTask spread over ``CHANNELS`` channels; the steady rate."""
    channels = [grpc.aio.insecure_channel(address) for _ in range(CHANNELS)]
    try:
        stubs = itertools.cycle([ingest_pb2_grpc.IngestServiceStub(c) for c in channels])
        request = submit_request(SLEEP_MODEL, sleep_parameters(50))
        await asyncio.gather(*(c.channel_ready() for c in channels))
        await closed_loop(
            lambda: next(stubs).SubmitTask(request, timeout=30, metadata=AUTH), total=CLIENTS, concurrency=CLIENTS
        )
        return steady_rate(
            await closed_loop(
                lambda: next(stubs).SubmitTask(request, timeout=30, metadata=AUTH), total=total, concurrency=CLIENTS
            )
        )
    finally:
        for channel in channels:
            await channel.close()


def echo_rate(total: int) -> float:
    (port,) = free_ports(1)
    server = multiprocessing.get_context("spawn").Process(target=serve_echo, args=(port,), daemon=True)
    server.start()
    try:
        return asyncio.run(submit_rate(f"127.0.0.1:{port}", total))
    finally:
        server.terminate()
        server.join()


def produce_rate(bootstrap: str, topic: str, total: int) -> float:
    """librdkafka's own rate for the records ingest would write: idempotent producer with ingest's settings,
    one AITaskEvent per record keyed by task id, produce all, flush at the end."""
    producer = Producer(producer_config(bootstrap, client_id="bench-raw-producer", delivery_timeout_s=30.0))
    records = []
    for _ in range(total):
        task_id = str(uuid.uuid4())
        event = task_pb2.AITaskEvent(
            schema_version=events.SCHEMA_VERSION,
            task_id=task_id,
            model_name=SLEEP_MODEL,
            input=task_pb2.TaskInput(text=TEXT),
            parameters=sleep_parameters(50),
            submitted_at=events.now_timestamp(),
        )
        records.append((task_id, event.SerializeToString()))
    producer.produce(topic, key="warm-up", value=records[0][1], headers=events.task_headers())
    producer.flush(30)
    started = time.perf_counter()
    for key, value in records:
        while True:
            try:
                producer.produce(topic, key=key, value=value, headers=events.task_headers())
                break
            except BufferError:
                producer.poll(0.01)
        producer.poll(0)
    if producer.flush(60):
        raise RuntimeError("raw producer: records left unflushed")
    return total / (time.perf_counter() - started)


def measure(workers: Workers, args: argparse.Namespace) -> dict[str, Any]:
    stack = workers.stack
    workers.stop()  # nobody runs the tasks: ingest is measured alone
    total = args.ingest_requests
    ingest = asyncio.run(submit_rate(stack.ingest_address, total))
    echo = echo_rate(total)
    raw = produce_rate(stack.kafka_bootstrap, stack.topics.tasks_topic, RAW_RECORDS_PER_REQUEST * total)
    log(f"  ingest {ingest:.0f}/s, echo server {echo:.0f}/s, raw librdkafka produce {raw:.0f}/s")
    return {"ingest": ingest, "echo": echo, "raw": raw}


def report(rounds: Sequence[dict[str, Any]], args: argparse.Namespace, plots: Path) -> Section:
    ingest, echo, raw = ([r["ingest"][k] for r in rounds] for k in ("ingest", "echo", "raw"))
    results = "\n".join(
        [
            f"Median of {len(rounds)} rounds (min-max), {args.ingest_requests} requests each "
            f"({RAW_RECORDS_PER_REQUEST * args.ingest_requests} records for the raw producer).",
            "",
            "| what | per second | ingest / it |",
            "|---|---|---|",
            f"| ingest `SubmitTask` (validated, published, acknowledged by Kafka) | {spread(ingest)} | 1.00 |",
            f"| bare grpc.aio echo server, same client | {spread(echo)} | {median_ratio(ingest, echo):.2f} |",
            f"| librdkafka raw produce, same records | {spread(raw)} | {median_ratio(ingest, raw):.2f} |",
        ]
    )
    return Section(TITLE, METHOD, results)
