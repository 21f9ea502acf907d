"""The soak harness's judgement (benchmarks/soak_memory.py, soak_ledger.py): growth fits and exactly-once counts."""

from collections import Counter

import pytest

from benchmarks.soak_ledger import check_exactly_once
from benchmarks.soak_memory import Sample, growth

MB = 1024 * 1024


def series(name: str, pid: int, start_s: float, rss_mb: list[float], every_s: float = 30.0) -> list[Sample]:
    return [
        Sample(start_s + i * every_s, name, pid, int(mb * MB), int(mb * MB), 0, 10, float(i))
        for i, mb in enumerate(rss_mb)
    ]


def test_a_flat_process_passes_and_a_steady_climb_of_three_percent_per_10_minutes_fails() -> None:
    flat = series("ingest", 1, 0, [100.0] * 40)
    climbing = series("notifier", 2, 0, [100.0 + 0.15 * i for i in range(40)])  # 3 MB per 10 min on 100
    by_name = {g.name: g for g in growth(flat + climbing, window_from_s=0, warmup_s=0)}
    assert by_name["ingest"].pct_per_10_min == pytest.approx(0.0, abs=1e-6) and by_name["ingest"].passed
    assert by_name["notifier"].pct_per_10_min == pytest.approx(3.0, rel=0.01)
    assert not by_name["notifier"].passed


def test_spikes_at_a_few_sampling_moments_late_in_the_window_are_not_growth() -> None:
    # A model's working set caught at three samples near the end (a least-squares line reads +7.1% per 10 min).
    rss = [100.0] * 40
    rss[31] = rss[35] = rss[38] = 140.0
    (judged,) = growth(series("stub embed_0_0", 1, 0, rss), window_from_s=0, warmup_s=0)
    assert judged.pct_per_10_min == pytest.approx(0.0, abs=1e-6) and judged.passed


def test_a_step_that_stays_is_growth() -> None:
    (judged,) = growth(series("stub sleep_0_0", 1, 0, [50.0] * 20 + [55.0] * 21), window_from_s=0, warmup_s=0)
    assert judged.pct_per_10_min is not None and judged.pct_per_10_min > 2.0 and not judged.passed


def test_a_restarted_process_is_judged_on_its_new_instance_after_its_warm_up() -> None:
    # The killed instance was large; the new one climbs for its first minute, then stays flat.
    old = series("worker-1", 10, 0, [300.0] * 20)
    new = series("worker-1", 11, 600, [20.0, 60.0, 80.0] + [85.0] * 17)
    (judged,) = growth(old + new, window_from_s=300, warmup_s=90)
    assert judged.pids == (10, 11)
    assert judged.fit_from_s == 690 and judged.samples == 17
    assert judged.pct_per_10_min == pytest.approx(0.0, abs=1e-6) and judged.passed


def test_too_few_samples_in_the_window_is_no_pass() -> None:
    (judged,) = growth(series("kafka", 3, 0, [400.0] * 10), window_from_s=210, warmup_s=0)
    assert judged.samples == 3 and judged.pct_per_10_min is None and not judged.passed


def test_exactly_once_names_the_missing_the_repeated_and_the_never_accepted() -> None:
    counts = Counter({"a": 1, "b": 2, "stray": 1})
    verdict = check_exactly_once(["a", "b", "c"], counts)
    assert (verdict.accepted, verdict.exactly_once) == (3, 1)
    assert verdict.missing == ["c"] and verdict.duplicated == {"b": 2} and verdict.unknown == {"stray": 1}
    assert not verdict.passed
    assert check_exactly_once(["a"], Counter({"a": 1})).passed
