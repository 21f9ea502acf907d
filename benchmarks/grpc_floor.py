"""The other floor under the mesh's latency: the two gRPC hops on a task's path that the bare Kafka chains lack.

A client of the mesh reaches ingest with a unary call (``SubmitTask``), and learns the result from the notifier as
one message on a server stream it opened before (``WatchTask``). ``GrpcPath`` times that with nothing behind it: a
grpc.aio server in a process of its own (as ingest and the notifier are) serves a unary ``Submit`` and a
server-streaming ``Watch``; the client opens ``Watch`` (the server has registered it once the call's initial
metadata arrives), then calls ``Submit``, whose handler answers and puts one message on the open stream. The time
runs from the ``Submit`` call until the stream's message is in the client's hands, with requests, replies and
stream messages of the mesh's sizes for the same model. No Kafka, no Triton, no auth, no work in the handlers: what
the mesh's own path costs beyond the chains cannot be less than this on the same machine.

``python -m benchmarks.grpc_floor`` runs the server; it prints its port on its first line.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import grpc

ROOT = Path(__file__).resolve().parents[1]  # where ``-m benchmarks.grpc_floor`` is found
SERVICE = "aimesh.bench.GrpcFloor"
SUBMIT, WATCH = f"/{SERVICE}/Submit", f"/{SERVICE}/Watch"
TIMEOUT_S = 30.0
KEY_BYTES = 16
# A Watch request: the task's key, then the sizes the server answers with (the reply, the stream's message).
SIZES = struct.Struct("!II")


class Sizes(NamedTuple):
    """The byte sizes of the mesh's messages for one model: SubmitTask's request and reply, WatchTask's terminal
    update."""

    request: int
    reply: int
    update: int


class FloorServer:
    """The server's handlers: the open streams by key, each waiting for its one message."""

    def __init__(self) -> None:
        self._streams: dict[bytes, tuple[asyncio.Queue[bytes], int]] = {}

    async def watch(self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> AsyncIterator[bytes]:
        key, (reply_bytes, update_bytes) = request[:KEY_BYTES], SIZES.unpack_from(request, KEY_BYTES)
        queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=1)
        self._streams[key] = (queue, reply_bytes)
        await context.send_initial_metadata(())
        try:
            update = await queue.get()
            yield update + bytes(max(0, update_bytes - len(update)))
        finally:
            self._streams.pop(key, None)

    async def submit(self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        waiting = self._streams.get(request[:KEY_BYTES])
        if waiting is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no stream open for this key")
        queue, reply_bytes = waiting
        queue.put_nowait(request[:KEY_BYTES])
        return bytes(reply_bytes)


async def serve() -> None:
    floor = FloorServer()
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Submit": grpc.unary_unary_rpc_method_handler(floor.submit),
            "Watch": grpc.unary_stream_rpc_method_handler(floor.watch),
        },
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


@contextlib.contextmanager
def floor_server() -> Iterator[str]:
    """The server in a process of its own; yields its address."""
    process = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.grpc_floor"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        if not line.isdigit():
            raise RuntimeError(f"the gRPC floor server did not start (said {line!r})")
        yield f"127.0.0.1:{line}"
    finally:
        process.terminate()
        process.wait(10)


class GrpcPath:
    """``run``: the milliseconds from a ``Submit`` call until the message it releases on an open ``Watch`` stream
    arrives. Use as ``async with GrpcPath(address, sizes) as path``."""

    def __init__(self, address: str, sizes: Sizes) -> None:
        self._address = address
        self._sizes = sizes

    async def __aenter__(self) -> GrpcPath:
        self._channel = grpc.aio.insecure_channel(self._address)
        self._submit: Any = self._channel.unary_unary(SUBMIT)
        self._watch: Any = self._channel.unary_stream(WATCH)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._channel.close()

    async def run(self) -> float:
        key = uuid.uuid4().bytes
        stream = self._watch(key + SIZES.pack(self._sizes.reply, self._sizes.update), timeout=TIMEOUT_S)
        await stream.initial_metadata()  # the server holds the stream now
        request = key + bytes(max(0, self._sizes.request - KEY_BYTES))
        started = time.perf_counter()
        await self._submit(request, timeout=TIMEOUT_S)
        update = await stream.read()
        elapsed_ms = (time.perf_counter() - started) * 1000
        if update is grpc.aio.EOF or update[:KEY_BYTES] != key:
            raise RuntimeError("the gRPC floor's stream ended without its message")
        stream.cancel()
        return elapsed_ms


if __name__ == "__main__":
    asyncio.run(serve())
