"""Which kind of request makes tritonserver's heap grow? Triton alone (the local stack's server and models, no mesh),
driven through the worker's own client (``TritonInference``) with each request shape the worker sends, each shape for
``--seconds`` twice in a row, sampling the server's anonymous memory (``RssAnon``) before and after:

    python benchmarks/triton_patterns.py [--seconds 35] [--runs 2] [--shapes stream_whole ...]

A leak grows on the second run of a shape as on the first; a pool or cache reaching its size grows on the first
only. docs/soak.md quotes a run.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import InferInput

if __package__ in (None, ""):  # run as a script: make the repository root importable for ``benchmarks.*``
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aimesh.devstack.triton import TritonServer  # noqa: E402
from aimesh.worker.inference import InferenceFailed, TritonInference  # noqa: E402
from benchmarks.soak_memory import sample  # noqa: E402
from benchmarks.soak_triton import standalone_server  # noqa: E402

TEXT = "The release went smoothly and everyone was pleased. " * 3
Shape = Callable[[TritonInference], Awaitable[None]]


async def plain(t: TritonInference) -> None:
    await asyncio.gather(*[t.infer_batch("sentiment", [TEXT] * 4, timeout_s=10) for _ in range(8)])


async def worker_form(t: TritonInference) -> None:  # queue timeout and priority, as the worker sends them
    await asyncio.gather(
        *[
            t.infer_batch(
                "sleep", [TEXT] * 4, parameters={"delay_ms": "0"}, timeout_s=10, queue_timeout_s=9, priority=1 + k % 2
            )
            for k in range(8)
        ]
    )


async def client_timeout(t: TritonInference) -> None:  # the call's deadline passes while Triton works
    async def one() -> None:
        try:
            await t.infer_batch("sleep", [TEXT], parameters={"delay_ms": "100"}, timeout_s=0.02)
        except InferenceFailed:
            pass

    await asyncio.gather(*[one() for _ in range(8)])


async def queue_timeout(t: TritonInference) -> None:  # Triton rejects what waited past its queue timeout
    async def one() -> None:
        try:
            await t.infer_batch(
                "sleep", [TEXT], parameters={"delay_ms": "60"}, timeout_s=10, queue_timeout_s=0.01, priority=1
            )
        except InferenceFailed:
            pass

    await asyncio.gather(*[one() for _ in range(16)])


async def _stream(t: TritonInference, max_tokens: int, stop_after: int | None) -> None:
    stop = asyncio.Event()
    parameters = {"max_tokens": str(max_tokens), "token_delay_ms": "0" if stop_after is None else "10"}
    received = 0
    async for _ in t.stream("generate", "the worker asks", parameters=parameters, timeout_s=10, stop=stop):
        received += 1
        if stop_after is not None and received >= stop_after:
            stop.set()


async def stream_whole(t: TritonInference) -> None:
    await asyncio.gather(*[_stream(t, 4, None) for _ in range(4)])


async def stream_cancelled(t: TritonInference) -> None:
    await asyncio.gather(*[_stream(t, 50, 1) for _ in range(4)])


async def _cancelled_at_end(client: triton_aio.InferenceServerClient) -> None:
    data = np.array([[b"the worker asks"]], dtype=np.object_)
    tensor = InferInput("TEXT", list(data.shape), "BYTES")
    tensor.set_data_from_numpy(data)
    sent = asyncio.Event()

    async def requests() -> AsyncIterator[dict[str, Any]]:
        yield {"model_name": "generate", "inputs": [tensor], "parameters": {"max_tokens": "4", "token_delay_ms": "0"}}
        await sent.wait()  # never set: the request side stays open

    responses = client.stream_infer(requests(), stream_timeout=10)
    async for result, _ in responses:
        final = result is not None and result.get_response().parameters.get("triton_final_response")
        if final is not None and final.bool_param:
            break
    responses.cancel()


async def stream_cancelled_at_end(t: TritonInference) -> None:  # how the worker ended whole streams before
    client = triton_aio.InferenceServerClient(t.url)
    try:
        await asyncio.gather(*[_cancelled_at_end(client) for _ in range(4)])
    finally:
        await client.close()


SHAPES: dict[str, tuple[Shape, int]] = {  # name: (one round, calls per round)
    "plain": (plain, 8),
    "worker_form": (worker_form, 8),
    "client_timeout": (client_timeout, 8),
    "queue_timeout": (queue_timeout, 16),
    "stream_whole": (stream_whole, 4),
    "stream_cancelled": (stream_cancelled, 4),
    "stream_cancelled_at_end": (stream_cancelled_at_end, 4),
}


def anon_mb(server: TritonServer) -> float:
    assert server.pid is not None
    taken = sample("tritonserver", server.pid, 0.0)
    assert taken is not None
    return taken.anon_bytes / 2**20


async def run(server: TritonServer, seconds: float, shapes: list[str], runs: int) -> None:
    async with TritonInference(server.grpc_url) as t:
        await plain(t)
        await stream_whole(t)
        print(f"start: anon {anon_mb(server):.1f} MB", flush=True)
        for name in shapes:
            shape, calls = SHAPES[name]
            for repeat in range(1, runs + 1):
                before, rounds, end = anon_mb(server), 0, time.monotonic() + seconds
                while time.monotonic() < end:
                    await shape(t)
                    rounds += 1
                await asyncio.sleep(3)  # let the allocator return what it will
                after = anon_mb(server)
                per_call = (after - before) * 2**20 / max(1, rounds * calls)
                print(
                    f"{name:16s} run {repeat}: {rounds * calls:6d} calls, anon {before:6.1f} -> {after:6.1f} MB "
                    f"({per_call:7.1f} bytes a call)",
                    flush=True,
                )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=35.0, help="per shape and run")
    parser.add_argument("--runs", type=int, default=2, help="runs of each shape in a row")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES), help="default: all")
    args = parser.parse_args(argv)
    with standalone_server("aimesh-triton-patterns-") as server:
        asyncio.run(run(server, args.seconds, args.shapes, args.runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
