"""The demo: a few real tasks for each model, submitted through ingest and followed on WatchTask streams."""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import numpy.typing as npt

from aimesh.client import payloads
from aimesh.v1 import ingest_pb2, ingest_pb2_grpc, notifier_pb2, notifier_pb2_grpc, result_pb2, task_pb2

ARTICLE = (
    "Kafka decouples the services that accept work from the services that do it. "
    "Slow inference no longer blocks the threads that accept requests. "
    "Workers pull tasks from Kafka at the pace the GPU servers can sustain. "
    "The weather in the city was mild for the season. "
    "Because tasks are durable in Kafka, a worker crash delays a task but does not lose it. "
    "Results travel back through Kafka to a notifier that streams them to subscribers."
)

DEMO_TASKS: list[tuple[str, str, dict[str, str]]] = [
    ("summarize", ARTICLE, {"sentences": "2"}),
    ("sentiment", "The new release is fast, reliable and a joy to use!", {}),
    ("sentiment", "The update broke everything and the support team was rude. Awful experience.", {}),
    ("embed", "Asynchronous inference keeps the GPUs busy.", {}),
    ("sleep", "a benchmark task", {}),
]
# A handwritten 7 as the digits model reads it: 8x8 grey pixels, 255 the most ink.
SEVEN = np.array(
    [
        [0, 0, 96, 240, 255, 255, 112, 0],
        [0, 0, 16, 64, 80, 240, 96, 0],
        [0, 0, 0, 0, 48, 240, 16, 0],
        [0, 0, 16, 96, 208, 255, 144, 0],
        [0, 0, 176, 255, 255, 176, 48, 0],
        [0, 0, 0, 160, 176, 0, 0, 0],
        [0, 0, 48, 240, 48, 0, 0, 0],
        [0, 0, 128, 176, 0, 0, 0, 0],
    ],
    dtype=np.uint8,
)
# Tensor tasks: the model, its input tensors, its parameters.
DEMO_TENSOR_TASKS: list[tuple[str, dict[str, npt.NDArray[np.uint8]], dict[str, str]]] = [
    ("digits", {"IMAGE": SEVEN}, {}),
    ("resize", {"IMAGE": SEVEN}, {"scale": "4"}),
]


def task_input(text: str | dict[str, npt.NDArray[np.uint8]]) -> task_pb2.TaskInput:
    if isinstance(text, str):
        return task_pb2.TaskInput(text=text)
    return task_pb2.TaskInput(tensors=task_pb2.Tensors(tensors=payloads.input_tensors(text)))


def describe_raw(tensor: result_pb2.OutputTensor) -> str:
    """A raw output: its values when few, else its datatype, shape and size (a PNG named as one)."""
    if payloads.is_by_reference(tensor):
        return f"{tensor.name}={tensor.datatype} {list(tensor.shape)} ({tensor.object.size} bytes, by reference)"
    array = payloads.output_array(tensor)
    single = payloads.single_bytes(tensor, array)
    if single is not None and single.startswith(payloads.PNG_MAGIC):
        return f"{tensor.name}=<PNG image, {len(single)} bytes>"
    if array.size <= 4:
        return f"{tensor.name}={array.reshape(-1).tolist()}"
    return f"{tensor.name}={tensor.datatype} {list(tensor.shape)}"


def describe(result: result_pb2.AIResultEvent) -> str:
    """One readable line for a terminal result."""
    if result.status != result_pb2.TASK_STATUS_SUCCEEDED:
        return f"{result_pb2.ErrorCode.Name(result.error.code)}: {result.error.message}"
    parts = []
    for tensor in result.output.tensors:
        if tensor.raw_contents or tensor.HasField("object"):
            parts.append(describe_raw(tensor))
        elif tensor.string_data:
            parts.append(f"{tensor.name}={' '.join(tensor.string_data)!r}")
        elif tensor.float_data:
            values = list(tensor.float_data)
            shown = ", ".join(f"{v:.3f}" for v in values[:4])
            more = f", ... ({len(values)} values)" if len(values) > 4 else ""
            parts.append(f"{tensor.name}=[{shown}{more}]")
        else:
            parts.append(f"{tensor.name}={list(tensor.int_data)}")
    t = result.timings
    timing = f"queue {t.queue_wait.ToMilliseconds()} ms, inference {t.inference.ToMilliseconds()} ms"
    return f"{'; '.join(parts)}  ({timing}, by {result.worker_id})"


async def run_demo(ingest_address: str, notifier_address: str, *, timeout_s: float = 120.0) -> int:
    """Submit the demo tasks, stream every update to stdout; return the number of tasks that did not succeed."""
    async with (
        grpc.aio.insecure_channel(ingest_address) as ingest_ch,
        grpc.aio.insecure_channel(notifier_address) as notifier_ch,
    ):
        ingest = ingest_pb2_grpc.IngestServiceStub(ingest_ch)
        notifier = notifier_pb2_grpc.NotifierServiceStub(notifier_ch)
        started = time.monotonic()

        async def one(model: str, text: str | dict[str, npt.NDArray[np.uint8]], parameters: dict[str, str]) -> bool:
            reply = await ingest.SubmitTask(
                ingest_pb2.SubmitTaskRequest(model_name=model, input=task_input(text), parameters=parameters),
                timeout=30,
            )
            tag = f"[{model:9} {reply.task_id[:8]}]"
            print(f"{tag} accepted", flush=True)
            stream = notifier.WatchTask(notifier_pb2.WatchTaskRequest(task_id=reply.task_id), timeout=timeout_s)
            async for update in stream:
                state = update.state
                status = result_pb2.TaskStatus.Name(state.status).removeprefix("TASK_STATUS_")
                elapsed = f"{(time.monotonic() - started) * 1000:7.0f} ms"
                if state.status in (result_pb2.TASK_STATUS_QUEUED, result_pb2.TASK_STATUS_RUNNING):
                    where = f" on {state.result.worker_id}" if state.result.worker_id else ""
                    print(f"{tag} {elapsed} {status}{where}", flush=True)
                else:
                    print(f"{tag} {elapsed} {status} {describe(state.result)}", flush=True)
                    return state.status == result_pb2.TASK_STATUS_SUCCEEDED
            return False

        outcomes = await asyncio.gather(
            *(one(model, text, parameters) for model, text, parameters in DEMO_TASKS),
            *(one(model, inputs, parameters) for model, inputs, parameters in DEMO_TENSOR_TASKS),
        )
        failed = outcomes.count(False)
        print(f"{len(outcomes) - failed} of {len(outcomes)} tasks succeeded", flush=True)
        return failed
