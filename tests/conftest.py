"""Shared test configuration, and the session-wide mesh the integration and end-to-end tests drive."""

import importlib.util
import os
from collections.abc import Iterator

import pytest

from aimesh.devstack.otlp import OtlpReceiver
from aimesh.devstack.stack import Stack, StackSettings

if importlib.util.find_spec("aimesh.v1.task_pb2") is None:  # pragma: no cover - a setup problem
    raise RuntimeError("generated protobuf code is missing: run `make setup` (or `make proto`)")

# Models ingest accepts in the test stack: the repository's five, plus one Triton does not serve, so the
# worker's handling of a model that vanished from the repository is testable.
TEST_MODELS = "summarize,sentiment,embed,sleep,generate,digits,resize,identity,ghost"


@pytest.fixture(scope="session")
def otlp_receiver() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver()
    receiver.start()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="session")
def mesh(tmp_path_factory: pytest.TempPathFactory, otlp_receiver: OtlpReceiver) -> Iterator[Stack]:
    """The whole mesh (real Kafka, real Triton, ingest, two workers, notifier) on free ports, once per session,
    exporting traces to a receiver the tests own."""
    settings = StackSettings.on_free_ports(
        tmp_path_factory.mktemp("mesh"), workers=2, tasks_partitions=4, results_partitions=4
    )
    tracing_env = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.endpoint,
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    env = {"AIMESH_MODELS": TEST_MODELS, "AIMESH_LOG_LEVEL": "INFO", "AIMESH_LOG_FORMAT": "json", **tracing_env}
    with Stack(settings, extra_env=env) as stack:  # stops what did start if the start fails
        yield stack
    if os.environ.get("AIMESH_KEEP_LOGS"):
        print(f"mesh logs kept in {stack.log_dir}")
