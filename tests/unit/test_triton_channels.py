"""The channel a ``dns:///`` AIMESH_TRITON_URL gets, against in-process gRPC servers of Triton's inference service:
gRPC accepts its service config, spreads calls round robin over the target's addresses, and tries a call refused
UNAVAILABLE on another address."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator

import grpc
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from aimesh.devstack.ports import free_ports
from aimesh.worker.inference import TritonInference
from aimesh.worker.triton_pool import channel_args, connect

CALLS = 20


class ReadyServer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """Answers ServerReady (ready), counting the calls it answered; ``refuse``: aborts them UNAVAILABLE instead."""

    def __init__(self, name: str, answered: Counter[str], *, refuse: bool = False) -> None:
        self._name = name
        self._answered = answered
        self._refuse = refuse

    async def ServerReady(  # noqa: N802 - the generated servicer's name
        self, request: service_pb2.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.ServerReadyResponse:
        if self._refuse:
            self._answered[f"{self._name} refused"] += 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "server is stopping")
        self._answered[self._name] += 1
        return service_pb2.ServerReadyResponse(ready=True)


async def serve(name: str, answered: Counter[str], port: int, *, refuse: bool = False) -> grpc.aio.Server:
    server = grpc.aio.server()
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(ReadyServer(name, answered, refuse=refuse), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server


@pytest.fixture
async def two_servers(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Counter[str], str]]:
    """Two servers, ``a`` (refusing UNAVAILABLE if the test is parametrized so) and ``b``, and a target naming both."""
    answered: Counter[str] = Counter()
    ports = free_ports(2)
    servers = [
        await serve("a", answered, ports[0], refuse=getattr(request, "param", False)),
        await serve("b", answered, ports[1]),
    ]
    yield answered, f"ipv4:127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}"
    for server in servers:
        await server.stop(None)


async def test_a_dns_target_connects_with_its_service_config() -> None:
    answered: Counter[str] = Counter()
    [port] = free_ports(1)
    server = await serve("a", answered, port)
    try:
        async with connect(f"dns:///localhost:{port}") as triton:  # gRPC refuses a channel with a bad service config
            assert [await triton.is_ready() for _ in range(3)] == [True] * 3
    finally:
        await server.stop(None)
    assert answered == {"a": 3}


async def test_the_balanced_channel_spreads_calls_over_every_address(two_servers: tuple[Counter[str], str]) -> None:
    answered, target = two_servers
    async with TritonInference(target, channel_args=channel_args(balanced=True)) as triton:
        assert all([await triton.is_ready() for _ in range(CALLS)])
    # round_robin may send the first calls to the address that connected first; then it alternates
    assert answered["a"] >= CALLS // 3 and answered["b"] >= CALLS // 3 and answered.total() == CALLS


async def test_tritonclients_own_channel_sends_everything_to_one_address(
    two_servers: tuple[Counter[str], str],
) -> None:
    """What one channel to several addresses does without the balanced config (why a Kubernetes Service pins)."""
    answered, target = two_servers
    async with TritonInference(target) as triton:
        assert all([await triton.is_ready() for _ in range(CALLS)])
    assert sorted(answered.values()) == [CALLS]


@pytest.mark.parametrize("two_servers", [True], indirect=True)
async def test_the_balanced_channel_tries_a_call_refused_unavailable_on_another_address(
    two_servers: tuple[Counter[str], str],
) -> None:
    answered, target = two_servers
    async with TritonInference(target, channel_args=channel_args(balanced=True)) as triton:
        assert [await triton.is_ready() for _ in range(CALLS)] == [True] * CALLS
    assert answered["b"] == CALLS and answered["a refused"] >= 1
