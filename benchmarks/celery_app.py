"""The Celery application of the Celery baseline: one task that calls the same Triton model synchronously.

The worker runs as ``celery -A benchmarks.celery_app worker``; the broker, result backend and Triton address come
from the environment (``AIMESH_BENCH_REDIS_URL``, ``AIMESH_BENCH_TRITON_URL``), the benchmark sets them.
"""

from __future__ import annotations

import os
import threading

import numpy as np
import tritonclient.grpc as triton_sync
from celery import Celery
from tritonclient.grpc import InferInput

REDIS_URL = os.environ.get("AIMESH_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")

app = Celery("aimesh_bench", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(
    # The mesh commits a task only once its result is durable; the comparable Celery setting acknowledges a
    # task after it ran, so a worker crash re-runs it.
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)

_local = threading.local()


def _triton() -> triton_sync.InferenceServerClient:
    client = getattr(_local, "client", None)
    if client is None:
        client = _local.client = triton_sync.InferenceServerClient(
            os.environ.get("AIMESH_BENCH_TRITON_URL", "127.0.0.1:8001")
        )
    return client


@app.task(name="aimesh_bench.infer")
def infer(model: str, text: str, parameters: dict[str, str]) -> str:
    tensor = InferInput("TEXT", [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[text.encode()]], dtype=np.object_))
    result = _triton().infer(model, [tensor], parameters=parameters)
    return str(result.as_numpy("TEXT").reshape(-1)[0].decode())
