"""Several replicas behind one client: the gRPC target built from a list of addresses, and calls spread over fake
servers by the client and the CLI (gRPC's round_robin)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from click.testing import CliRunner
from client_fakes import Fakes, ThreadedFakes

from aimesh.client import AsyncClient, Client
from aimesh.client.cli import EXIT_USAGE, main
from aimesh.client.targets import grpc_target
from aimesh.v1 import ingest_pb2

SUBMITS = 8


@pytest.mark.parametrize(
    ("addresses", "target"),
    [
        ("127.0.0.1:50051", "127.0.0.1:50051"),
        ("ingest:50051", "ingest:50051"),  # one DNS name: round_robin spreads over what it resolves to
        ("dns:///ingest:50051", "dns:///ingest:50051"),
        ("127.0.0.1:50051,127.0.0.1:50053", "ipv4:127.0.0.1:50051,127.0.0.1:50053"),
        (" 127.0.0.1:1 , 10.0.0.2:2 ,", "ipv4:127.0.0.1:1,10.0.0.2:2"),
        (["127.0.0.1:1", "127.0.0.1:2"], "ipv4:127.0.0.1:1,127.0.0.1:2"),
        ("[::1]:1,[fe80::1]:2", "ipv6:[::1]:1,[fe80::1]:2"),
        ("ipv4:127.0.0.1:1,127.0.0.1:2", "ipv4:127.0.0.1:1,127.0.0.1:2"),  # a target already
    ],
)
def test_the_target_of_one_or_several_addresses(addresses: str | list[str], target: str) -> None:
    assert grpc_target(addresses) == target


@pytest.mark.parametrize(
    ("addresses", "complaint"),
    [
        ("", "no address"),
        ("ingest-0:50051,ingest-1:50051", "must be IP addresses"),
        ("127.0.0.1:1,[::1]:2", "must all be IPv4 or all IPv6"),
        ("127.0.0.1:1,127.0.0.1", "not host:port"),
        ("127.0.0.1:1,127.0.0.1:70000", "not host:port"),
        ("::1:1,::1:2", "in brackets"),
    ],
)
def test_a_list_gRPC_cannot_resolve_is_refused(addresses: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        grpc_target(addresses)
    with pytest.raises(ValueError, match=complaint):
        AsyncClient(addresses)


@pytest.fixture
async def replicas() -> AsyncIterator[list[Fakes]]:
    servers = [Fakes(), Fakes()]
    for fakes in servers:
        await fakes.start()
    yield servers
    for fakes in servers:
        await fakes.stop()


def submits(fakes: Fakes) -> int:
    return sum(isinstance(r, ingest_pb2.SubmitTaskRequest) for r in fakes.ingest.requests)


async def test_the_client_spreads_calls_over_every_replica(replicas: list[Fakes]) -> None:
    addresses = [fakes.ingest_address for fakes in replicas]
    async with AsyncClient(addresses) as client:
        for i in range(SUBMITS):
            await client.submit("sentiment", f"text {i}")
    # Turn by turn once both connections are up; the first calls may all go to whichever connected first.
    assert sum(submits(fakes) for fakes in replicas) == SUBMITS
    assert min(submits(fakes) for fakes in replicas) >= SUBMITS // 4


async def test_a_replica_that_is_down_is_skipped(replicas: list[Fakes]) -> None:
    await replicas[1].stop()
    async with AsyncClient([f.ingest_address for f in replicas]) as client:
        for i in range(SUBMITS):
            await client.submit("sentiment", f"text {i}")
    assert submits(replicas[0]) == SUBMITS


@pytest.fixture
def threaded_replicas() -> Iterator[list[ThreadedFakes]]:
    with ThreadedFakes() as first, ThreadedFakes() as second:
        yield [first, second]


def test_the_blocking_client_and_the_cli_take_a_comma_separated_list(threaded_replicas: list[ThreadedFakes]) -> None:
    ingest = ",".join(f.ingest_address for f in threaded_replicas)
    with Client(ingest) as client:
        for i in range(SUBMITS):
            client.submit("sentiment", f"text {i}")
    assert min(submits(fakes) for fakes in threaded_replicas) >= SUBMITS // 4
    result = CliRunner().invoke(main, ["--ingest-address", ingest, "submit", "sentiment", "from the cli"])
    assert result.exit_code == 0, result.output
    assert sum(submits(fakes) for fakes in threaded_replicas) == SUBMITS + 1


def test_the_cli_refuses_a_list_of_names_as_a_usage_error() -> None:
    result = CliRunner().invoke(main, ["--ingest-address", "a:1,b:2", "get", "5b0f7c1e-2f43-4a55-9d53-2c1f3f0d8a11"])
    assert result.exit_code == EXIT_USAGE and "must be IP addresses" in result.output
