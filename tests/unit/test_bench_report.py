"""The benchmark suite's arithmetic and report merging (benchmarks/common.py): the figures it quotes."""

import asyncio
from pathlib import Path

import pytest

from benchmarks.common import Section, median_ratio, split_sections, steady_rate, tasks_for, write_markdown


def test_steady_rate_counts_between_the_trim_quantiles() -> None:
    # 11 completions, 10 ms apart, after a slow start and before a slow end: 100 per second in between.
    times = [0.0] + [1.0 + 0.01 * i for i in range(11)] + [5.0]
    assert steady_rate(times, trim=0.1) == pytest.approx(100.0, rel=0.05)
    assert steady_rate([0.0, 0.5, 1.0], trim=0.0) == pytest.approx(2.0)


def test_steady_rate_needs_two_completions() -> None:
    with pytest.raises(ValueError):
        steady_rate([1.0])


def test_median_ratio_pairs_rounds_instead_of_dividing_medians() -> None:
    # Round by round 0.5, 0.5, 2.0: median 0.5. The ratio of medians (20 / 20) would claim 1.0.
    assert median_ratio([10, 20, 40], [20, 40, 20]) == 0.5


def test_tasks_for_scales_with_what_triton_can_run_at_once() -> None:
    assert tasks_for(8, seconds=2, delay_ms=50) == 320  # 8 per 50 ms for 2 s
    assert tasks_for(1024, seconds=1, delay_ms=50) == 2560  # capped at 2 instances x batches of 64
    assert tasks_for(1, seconds=0.1, delay_ms=50) == 20  # never fewer than 20


def test_write_markdown_replaces_measured_sections_and_keeps_the_others(tmp_path: Path) -> None:
    path = tmp_path / "benchmarks.md"
    path.write_text("# Benchmarks\n\nold preamble\n\n## Latency\n\nold latency table\n\n## Gone\n\nkept\n")
    write_markdown(
        path, [Section("Throughput", "how", "| new |")], "python benchmarks/run.py", ["Throughput", "Latency"]
    )
    sections = split_sections(path.read_text())
    assert list(sections) == ["Throughput", "Latency", "Gone"]
    assert "| new |" in sections["Throughput"] and "python benchmarks/run.py" in sections["Throughput"]
    assert "old latency table" in sections["Latency"] and "kept" in sections["Gone"]
    assert "old preamble" not in path.read_text()


def test_latency_breakdown_splits_each_task_into_its_stages() -> None:
    from benchmarks.latency import STAGES, breakdown, stage_values

    # 40 ms end to end: 8 ms queued, 4 ms in Triton, 2 ms around it (result produced at 14 ms), 26 ms after.
    assert stage_values([40.0, 8.0, 4.0, 14.0]) == (8.0, 4.0, 2.0, 26.0)
    measured = {"stages": [[40.0, 8.0, 4.0, 14.0], [50.0, 10.0, 4.0, 16.0], [60.0, 9.0, 5.0, 18.0]]}
    rounds = [{"exactly_once": measured, "at_least_once": measured}]
    table = breakdown(rounds)
    rows = {line.split(" | ")[0].lstrip("| "): float(line.rstrip(" |").split(" | ")[-1]) for line in table[4:]}
    assert list(rows.values()) == [9.0, 4.0, 2.0, 34.0]  # per stage the p50 of its own values
    assert len(rows) == len(STAGES)


def test_headroom_sets_the_grpc_path_against_the_room_each_p50_target_leaves() -> None:
    from benchmarks.latency import headroom

    # exactly_once: chain 8 ms, target 1.2 -> 1.6 ms of room; overhead 15 ms -> 7 ms of the mesh's own; gRPC 0.8 ms.
    exactly_once = {"overhead": [15.0], "exactly_once_ms": [8.0], "grpc_ms": [0.8]}
    # at_least_once: chain 2 ms, target 1.3 -> 0.6 ms of room; overhead 9 ms -> 7 ms; gRPC 1.2 ms: twice the room.
    at_least_once = {"overhead": [9.0], "at_least_once_ms": [2.0], "grpc_ms": [1.2]}

    def measured(m: dict[str, list[float]]) -> dict[str, list[float]]:
        chain_and_grpc = {k: v for k, v in m.items() if k != "overhead"}
        return {"mesh_ms": [3.0 + m["overhead"][0]], "direct_ms": [3.0], **chain_and_grpc}

    rounds = [{"exactly_once": measured(exactly_once), "at_least_once": measured(at_least_once)}]
    rows = [line.strip("| ").split(" | ") for line in headroom(rounds)[2:]]
    assert [row[1:] for row in rows] == [
        ["8.0", "1.6", "7.0", "0.8", "0.50"],
        ["2.0", "0.6", "7.0", "1.2", "2.00"],
    ]
    assert "exactly_once" in rows[0][0] and "at_least_once" in rows[1][0]


def test_the_bare_grpc_path_times_a_call_and_the_stream_message_it_releases() -> None:
    from benchmarks.grpc_floor import GrpcPath, Sizes, floor_server

    async def three(address: str) -> list[float]:
        async with GrpcPath(address, Sizes(request=300, reply=40, update=500)) as path:
            return [await path.run() for _ in range(3)]

    with floor_server() as address:
        times = asyncio.run(three(address))
    assert len(times) == 3 and all(0 < t < 5000 for t in times)
