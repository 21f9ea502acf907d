"""Shared test configuration: the generated protobuf package must exist (``make setup`` makes it)."""

import importlib.util

if importlib.util.find_spec("aimesh.v1.task_pb2") is None:  # pragma: no cover - a setup problem
    raise RuntimeError("generated protobuf code is missing: run `make setup` (or `make proto`)")


import os  # noqa: E402
from collections.abc import Iterator  # noqa: E402

import pytest  # noqa: E402

from aimesh.devstack.stack import Stack, StackSettings, free_port  # noqa: E402

# Models ingest accepts in the test stack: the repository's four, plus one Triton does not serve, so the
# worker's handling of a model that vanished from the repository is testable.
TEST_MODELS = "summarize,sentiment,embed,sleep,ghost"


@pytest.fixture(scope="session")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The whole mesh (real Kafka, real Triton, ingest, two workers, notifier) on free ports, once per session."""
    run_dir = tmp_path_factory.mktemp("mesh")
    settings = StackSettings(
        run_dir=run_dir,
        kafka_port=free_port(),
        kafka_controller_port=free_port(),
        triton_grpc_port=free_port(),
        triton_http_port=free_port(),
        triton_metrics_port=free_port(),
        ingest_port=free_port(),
        notifier_port=free_port(),
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
