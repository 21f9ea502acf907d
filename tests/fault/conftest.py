"""The fault tests' own stack: they kill and restart its parts, so they never share the session ``mesh``."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pytest
from integration.mesh_client import MeshClient

from aimesh.devstack.stack import Stack, StackSettings

WORKERS = 2
WORKER_GROUP = "aimesh-workers"
# Partitioned notifiers: every fault test's watchers reach most tasks through a forwarding replica.
NOTIFIER_REPLICAS = 3

FAULT_ENV = {
    # Ingest answers UNAVAILABLE soon while the broker is down.
    "AIMESH_PUBLISH_TIMEOUT_S": "2",
    # Retries of a Triton that is back are at most 1 s apart.
    "AIMESH_RETRY_MAX_S": "1",
    "AIMESH_LOG_FORMAT": "json",
    # These tests are about faults, not callers: no API keys.
    "AIMESH_AUTH": "off",
    # Nor about admission control (tests/integration/test_admission.py): while Triton is down the backlog drains at
    # no rate, so ingest would rightly refuse the Triton-outage test's second wave (RESOURCE_EXHAUSTED), and that
    # wave is what shows tasks accepted during an outage wait it out.
    "AIMESH_ADMISSION_MAX_WAIT_S": "0",
}


@pytest.fixture(scope="package")
def fault_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Kafka, Triton, ingest, two workers and three partitioned notifier replicas on free ports, for the fault tests
    of this package."""
    settings = StackSettings.on_free_ports(
        tmp_path_factory.mktemp("fault"),
        workers=WORKERS,
        notifier_replicas=NOTIFIER_REPLICAS,
        tasks_partitions=6,
        results_partitions=6,
    )
    with Stack(settings, extra_env=FAULT_ENV) as stack:  # stops what did start if the start fails
        yield stack
    if os.environ.get("AIMESH_KEEP_LOGS"):
        print(f"fault stack logs kept in {stack.log_dir}")


@pytest.fixture
def stack(fault_stack: Stack) -> Stack:
    """The fault stack with every part running and every worker in the group: a test that failed half-way may
    have left a part stopped, or a worker running outside its group."""
    return restored(fault_stack)


def restored(s: Stack) -> Stack:
    """``s`` with every part running (every Kafka node of a cluster) and every worker in the group."""
    if s.kafka is not None and not all(node.running for node in s.kafka.nodes):
        s.start_kafka()
    if s.triton is not None and s.triton.pid is None:
        s.start_triton()
    for service in ("ingest", "notifier"):
        for index, address in enumerate(s.replica_addresses(service)):
            name = s.replica_name(service, index)
            if not s.services[name].alive():
                s.services[name].start()
                s.wait_grpc_healthy(address, name)
    for index in range(WORKERS):
        if not s.services[f"worker-{index}"].alive():
            s.start_worker(index)
    try:
        s.wait_workers(WORKERS, WORKER_GROUP, timeout_s=30)
    except RuntimeError:  # a worker stuck outside its group: start every worker afresh, fencing the old ones
        for index in range(WORKERS):
            s.kill_worker(index)
            s.restart_worker(index)
        s.wait_workers(WORKERS, WORKER_GROUP)
    return s


def assert_workers_rejoined(stack: Stack, timeout_s: float = 60.0) -> None:
    """Every worker runs and holds partitions in a stable group: the fault left none stuck or outside."""
    try:
        stack.wait_workers(WORKERS, WORKER_GROUP, timeout_s=timeout_s)
    except RuntimeError as e:
        raise AssertionError(f"the workers did not all rejoin their group within {timeout_s:.0f} s: {e}") from e


@pytest.fixture
async def client(stack: Stack) -> AsyncIterator[MeshClient]:
    c = MeshClient(stack.ingest_address, stack.notifier_address)
    yield c
    await c.close()
