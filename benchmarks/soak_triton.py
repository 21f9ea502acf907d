"""Is tritonserver's growth a leak? Triton alone (the local stack's server and models, no mesh), driven directly:
small requests of four models, then 1 MB texts, then small again, then 1 MB again, sampling the resident memory of the
server and of each Python backend stub (anonymous and shared) and Triton's request count every 5 s.

    python benchmarks/soak_triton.py [--json rows.json]

A leak grows with requests whatever their size, and does not come back; a high-water mark steps up with the largest
message seen and stays; a transient buffer comes back once the large messages stop. docs/soak.md quotes a run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import InferInput

if __package__ in (None, ""):  # run as a script: make the repository root importable for ``benchmarks.*``
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aimesh.devstack.ports import free_ports  # noqa: E402
from aimesh.devstack.stack import ROOT  # noqa: E402
from aimesh.devstack.triton import TritonServer  # noqa: E402
from benchmarks.common import log  # noqa: E402
from benchmarks.soak_memory import Sample, sample, triton_requests, triton_stubs  # noqa: E402

SMALL_MODELS = ["sentiment", "sleep", "summarize", "embed"]
SMALL_TEXT = "The release went smoothly and everyone was pleased. " * 3
LARGE_BYTES = 998_000  # just under AIMESH_MAX_TEXT_BYTES, as the soak's hostile rounds send
PHASES = [("small", 90.0), ("large", 60.0), ("small again", 60.0), ("large again", 30.0)]
SAMPLE_EVERY_S = 5.0


def tensor(text: str) -> InferInput:
    item = InferInput("TEXT", [1, 1], "BYTES")
    item.set_data_from_numpy(np.array([[text.encode()]], dtype=np.object_))
    return item


class Probe:
    def __init__(self, server: TritonServer) -> None:
        self.server = server
        self.started = time.monotonic()
        self.rows: list[dict[str, object]] = []
        self._next_s = 0.0

    def maybe_sample(self, phase: str, *, now: bool = False) -> None:
        t_s = time.monotonic() - self.started
        if not now and t_s < self._next_s:
            return
        self._next_s = t_s + SAMPLE_EVERY_S
        requests = triton_requests(self.server.metrics_url)
        assert self.server.pid is not None
        for name, pid in {"tritonserver": self.server.pid, **triton_stubs(self.server.pid)}.items():
            taken: Sample | None = sample(name, pid, t_s)
            if taken is not None:
                self.rows.append({**vars(taken), "phase": phase, "requests": requests})


async def drive(client: triton_aio.InferenceServerClient, probe: Probe, phase: str, seconds: float) -> None:
    end = time.monotonic() + seconds
    count = 0
    while time.monotonic() < end:
        if phase.startswith("large"):  # one at a time, two a second: the size matters here, not the rate
            await client.infer("sleep", [tensor("x" * LARGE_BYTES)], parameters={"delay_ms": "0"})
            await asyncio.sleep(0.5)
        else:  # eight at once, as a worker's micro-batches would arrive
            calls = [client.infer(SMALL_MODELS[(count + k) % 4], [tensor(SMALL_TEXT)]) for k in range(8)]
            await asyncio.gather(*calls)
        count += 1
        probe.maybe_sample(phase)


async def run(server: TritonServer) -> list[dict[str, object]]:
    probe = Probe(server)
    client = triton_aio.InferenceServerClient(server.grpc_url)
    try:
        probe.maybe_sample("start", now=True)
        for phase, seconds in PHASES:
            log(f"{phase} for {seconds:g} s")
            await drive(client, probe, phase, seconds)
        probe.maybe_sample("end", now=True)
    finally:
        await client.close()
    return probe.rows


def summarise(rows: list[dict[str, object]]) -> str:
    """The server's RSS (anonymous, shared) at the end of each phase."""
    lines = ["phase | requests | tritonserver RSS MB (anon / shmem)"]
    last: dict[str, dict[str, object]] = {}
    for row in rows:
        if row["name"] == "tritonserver":
            last[str(row["phase"])] = row
    for phase, row in last.items():
        rss, anon, shmem = (float(str(row[k])) / 2**20 for k in ("rss_bytes", "anon_bytes", "shmem_bytes"))
        lines.append(f"{phase} | {row['requests']:.0f} | {rss:.1f} ({anon:.1f} / {shmem:.1f})")
    return "\n".join(lines)


def standalone_server(log_prefix: str) -> TritonServer:
    """The local stack's server and models on free ports, alone, logging to a new temporary folder."""
    grpc_port, http_port, metrics_port = free_ports(3)
    return TritonServer(
        model_repository=ROOT / "models",
        grpc_port=grpc_port,
        http_port=http_port,
        metrics_port=metrics_port,
        log_dir=Path(tempfile.mkdtemp(prefix=log_prefix)),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write every sample here")
    args = parser.parse_args(argv)
    with standalone_server("aimesh-triton-memory-") as server:
        rows = asyncio.run(run(server))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print(summarise(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
