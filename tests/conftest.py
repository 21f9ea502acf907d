"""Shared test configuration, and the session-wide mesh the integration and end-to-end tests drive."""

import importlib.util
import os
from collections.abc import Iterator

import pytest

from aimesh.devstack.ports import free_ports
from aimesh.devstack.stack import Stack, StackSettings

if importlib.util.find_spec("aimesh.v1.task_pb2") is None:  # pragma: no cover - a setup problem
    raise RuntimeError("generated protobuf code is missing: run `make setup` (or `make proto`)")

# Models ingest accepts in the test stack: the repository's four, plus one Triton does not serve, so the
# worker's handling of a model that vanished from the repository is testable.
TEST_MODELS = "summarize,sentiment,embed,sleep,ghost"


@pytest.fixture(scope="session")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The whole mesh (real Kafka, real Triton, ingest, two workers, notifier) on free ports, once per session."""
    run_dir = tmp_path_factory.mktemp("mesh")
    kafka, controller, triton_grpc, triton_http, triton_metrics, ingest, notifier = free_ports(7)
    settings = StackSettings(
        run_dir=run_dir,
        kafka_port=kafka,
        kafka_controller_port=controller,
        triton_grpc_port=triton_grpc,
        triton_http_port=triton_http,
        triton_metrics_port=triton_metrics,
        ingest_port=ingest,
        notifier_port=notifier,
        workers=2,
        tasks_partitions=4,
        results_partitions=4,
    )
    stack = Stack(settings, extra_env={"AIMESH_MODELS": TEST_MODELS, "AIMESH_LOG_LEVEL": "INFO"})
    try:
        stack.start()
    except BaseException:
        stack.stop()
        raise
    yield stack
    stack.stop()
    if os.environ.get("AIMESH_KEEP_LOGS"):
        print(f"mesh logs kept in {stack.log_dir}")
