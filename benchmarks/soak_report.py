"""The soak's report: the run's section of docs/soak.md (other sections of the file are kept as they are), the plot
of memory over time, a JSON summary, and the verdict on the terminal."""

from __future__ import annotations

import os
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.common import machine_facts, new_figure, save_plot, split_sections
from benchmarks.soak_load import MAX_REFUSED_SHARE
from benchmarks.soak_memory import MAX_GROWTH_PCT_PER_10_MIN

if TYPE_CHECKING:
    from benchmarks.soak import Outcome

TITLE = "Latest run"
PREAMBLE = (
    "# Soak test\n\n"
    "Made by `make soak` (`benchmarks/soak.py`; design in [design.md](design.md#soak-test)), which rewrites the "
    f'"{TITLE}" section and keeps the others. A run passes when every accepted task ended exactly once (the '
    "results topic read read_committed from its start), no process of the stack grew by more than "
    f"{MAX_GROWTH_PCT_PER_10_MIN:g}% per 10 minutes over the last 20 minutes of the run (the last two thirds of a "
    "shorter run; not judged under 15 minutes), no process died on its own, every hostile input got a documented "
    f"status, no ordinary call failed and admission control refused at most {MAX_REFUSED_SHARE:.0%} of the ordinary "
    "tasks. The full run "
    "is `make soak` (30 minutes).\n"
)
MB = 1024 * 1024


def verdict_text(outcome: Outcome) -> str:
    if outcome.passed:
        grew = "no process grew" if outcome.plan.judges_memory else "growth not judged (a short run)"
        return f"PASS: {outcome.exactly_once.accepted} accepted tasks ended exactly once; {grew}"
    return "FAIL:\n" + "\n".join(f"  - {reason}" for reason in outcome.reasons)


def summary(outcome: Outcome) -> dict[str, Any]:
    once = outcome.exactly_once
    return {
        "passed": outcome.passed,
        "reasons": outcome.reasons,
        "plan": vars(outcome.plan),
        "accepted": once.accepted,
        "exactly_once": once.exactly_once,
        "missing": once.missing[:20],
        "duplicated": dict(list(once.duplicated.items())[:20]),
        "unknown": dict(list(once.unknown.items())[:20]),
        "statuses": outcome.statuses,
        "actions": dict(outcome.tally.actions),
        "errors": dict(outcome.tally.errors),
        "refused": dict(outcome.tally.refused),
        "submitted": outcome.tally.submitted,
        "error_examples": outcome.tally.error_examples,
        "hostile": {f"{probe}: {code}": n for (probe, code), n in sorted(outcome.tally.hostile.items())},
        "unexpected_hostile": outcome.tally.unexpected_hostile[:20],
        "watch_gaps": outcome.tally.watch_gaps[:20],
        "cancel_outcomes": dict(outcome.tally.cancel_outcomes),
        "expiry_lookups": dict(outcome.tally.expiry_lookups),
        "dead": outcome.dead,
        "triton_bytes_per_request": outcome.triton_bytes_per_request,
        "memory_judged": outcome.plan.judges_memory,
        "growth": [vars(g) for g in outcome.growth],
        "samples": [vars(s) for s in outcome.samples],
    }


def write_markdown(path: Path, outcome: Outcome, *, plot: Path | None) -> None:
    sections = split_sections(path.read_text()) if path.exists() else {}
    sections[TITLE] = run_section(outcome, _relative(plot, path.parent))
    order = [TITLE, *(title for title in sections if title != TITLE)]
    path.write_text(PREAMBLE + "\n" + "\n".join(sections[t].rstrip("\n") + "\n" for t in order))


def _relative(plot: Path | None, folder: Path) -> str | None:
    if plot is None:
        return None
    try:
        return str(plot.resolve().relative_to(folder.resolve()))
    except ValueError:
        return str(plot.resolve())


def run_section(outcome: Outcome, plot: str | None) -> str:
    plan = outcome.plan
    verdict = "**PASS**" if outcome.passed else "**FAIL**: " + "; ".join(outcome.reasons)
    parts = [
        f"## {TITLE}",
        f"Command: `{outcome.command}`  \nMachine: {machine_facts()}; run {time.strftime('%Y-%m-%d %H:%M %Z')}.  \n"
        f"Verdict: {verdict}",
        _parameters(outcome),
        _tasks(outcome),
        _hostile(outcome),
        "### Memory and file descriptors\n\n"
        f"Sampled every {plan.sample_interval_s:g} s. Growth: the Theil-Sen slope (the median of the slopes "
        "between every two samples, which a spike at a few sampling moments does not move and a climb or a step "
        f"that stays does) of the RSS samples from {plan.run_s - plan.window_s:.0f} s to the end of the load "
        f"({plan.window_s / 60:.3g} minutes"
        + ("; the last two thirds of this short run" if plan.window_s < 20 * 60 else "")
        + "), as a percentage of the line's value at the window's start, per 10 minutes. The restarted worker is "
        f"judged on its new instance from {plan.window_s / 4:.0f} s after it started. Anon and shmem split the last "
        "RSS sample as `/proc/<pid>/status` does (`RssAnon`, `RssShmem`)."
        + (
            ""
            if plan.judges_memory
            else " **Growth is not judged in a run this short**: a window under 10 minutes is dominated by warm-up "
            "(Kafka's heap expanding, Triton's buffers and shared-memory regions reaching the largest message seen); "
            "see the full run."
        ),
        _memory_table(outcome),
        f"CPU: the mean share of one core over the window; the stack's processes together used "
        f"{sum(g.cpu_pct or 0 for g in outcome.growth):.0f}% of one core ({os.cpu_count()} on this machine).",
    ]
    if outcome.triton_bytes_per_request is not None:
        parts.append(
            f"tritonserver over the window: {outcome.triton_bytes_per_request:+.1f} bytes of RSS per inference "
            "request Triton counted (`nv_inference_request_success`)."
        )
    if plot:
        parts.append(f"![Resident memory of every process over the run]({plot})")
    return "\n\n".join(parts) + "\n"


def _parameters(outcome: Outcome) -> str:
    plan = outcome.plan
    rows = [
        ("run", f"{plan.minutes:g} minutes of load after {plan.warmup_s:g} s of warm-up (time 0: its end)"),
        ("ordinary load", f"{plan.rate_per_s:g} tasks/s (every model, both priorities; see design.md)"),
        (
            "workers",
            f"{plan.workers}; worker-1 stopped ({plan.restart}) and started again at {plan.restart_at_s:.0f} s",
        ),
        ("notifier retention", f"AIMESH_RETENTION_S={plan.retention_s:g}"),
        ("ingest idempotency keys kept", f"AIMESH_IDEMPOTENCY_TTL_S={plan.retention_s:g}"),
        (
            "hostile rounds",
            f"{len(plan.hostile_at_s)}: one in the warm-up, then at 30 s and every 60 s",
        ),
        ("seed", str(plan.seed)),
    ]
    return "### Parameters\n\n" + _table(["", ""], rows)


def _tasks(outcome: Outcome) -> str:
    once, tally = outcome.exactly_once, outcome.tally
    by_model: dict[str, int] = defaultdict(int)
    for model in tally.accepted.values():
        by_model[model] += 1
    rows = [
        ("accepted", f"{once.accepted} ({', '.join(f'{m} {n}' for m, n in sorted(by_model.items()))})"),
        ("ended exactly once", str(once.exactly_once)),
        ("never ended / ended twice or more", f"{len(once.missing)} / {len(once.duplicated)}"),
        ("terminal results of task ids never accepted", str(len(once.unknown))),
        (
            "terminal results by status",
            ", ".join(f"{s.removeprefix('TASK_STATUS_')} {n}" for s, n in sorted(outcome.statuses.items())),
        ),
        ("actions", ", ".join(f"{a} {n}" for a, n in sorted(tally.actions.items()))),
        (
            "cancellations",
            ", ".join(f"{o.removeprefix('CANCEL_OUTCOME_')} {n}" for o, n in sorted(tally.cancel_outcomes.items()))
            or "-",
        ),
        ("resumed watches that missed, repeated or reordered an update", str(len(tally.watch_gaps))),
        ("ordinary tasks refused by admission control", _refusals(outcome)),
        ("ordinary calls failed", ", ".join(f"{e} {n}" for e, n in sorted(tally.errors.items())) or "0"),
        (
            "lookups of tasks past retention",
            ", ".join(f"{k} {n}" for k, n in sorted(tally.expiry_lookups.items())) or "-",
        ),
        ("processes that died on their own", ", ".join(outcome.dead) or "none"),
    ]
    return "### Tasks\n\n" + _table(["", ""], rows)


def _refusals(outcome: Outcome) -> str:
    tally = outcome.tally
    if not tally.refused:
        return f"0 of {tally.submitted}"
    reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(tally.refused.items()))
    return f"{sum(tally.refused.values())} of {tally.submitted} ({reasons})"


def _hostile(outcome: Outcome) -> str:
    by_probe: dict[str, list[str]] = defaultdict(list)
    for (probe, code), n in sorted(outcome.tally.hostile.items()):
        by_probe[probe].append(f"{code} x{n}")
    rows = [(probe, ", ".join(codes)) for probe, codes in sorted(by_probe.items())]
    text = "### Hostile inputs\n\n" + _table(["probe", "answers"], rows)
    if outcome.tally.unexpected_hostile:
        text += "\n\nUndocumented answers: " + "; ".join(f"`{u}`" for u in outcome.tally.unexpected_hostile[:10])
    return text


def _memory_table(outcome: Outcome) -> str:
    rows = []
    for g in outcome.growth:
        rate = "n/a" if g.pct_per_10_min is None else f"{g.pct_per_10_min:+.2f}%"
        rows.append(
            (
                g.name,
                f"{g.rss_start_bytes / MB:.1f}",
                f"{g.rss_end_bytes / MB:.1f}",
                f"{g.anon_end_bytes / MB:.1f} / {g.shmem_end_bytes / MB:.1f}",
                f"{rate} ({g.samples})",
                f"{g.fds_start} / {g.fds_end} / {g.fds_max}",
                "n/a" if g.cpu_pct is None else f"{g.cpu_pct:.0f}%",
                ("ok" if g.passed else "**grew**") if outcome.plan.judges_memory else "not judged",
            )
        )
    header = [
        "process",
        "RSS start MB",
        "RSS end MB",
        "end anon / shmem MB",
        "growth per 10 min (samples)",
        "FDs start / end / max",
        "CPU",
        "",
    ]
    return _table(header, rows)


def _table(header: list[str], rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def plot(outcome: Outcome, path: Path) -> None:
    """RSS of every process over the run (log scale), the growth window shaded, the restart marked."""
    from matplotlib import colormaps

    figure, axes = new_figure(9.0, 5.5)
    series: dict[str, dict[int, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for s in outcome.samples:
        series[s.name][s.pid].append((s.t_s / 60, s.rss_bytes / MB))
    colours = colormaps["tab20"]
    for index, (name, instances) in enumerate(sorted(series.items())):
        stub = name.startswith("stub ")
        style = {"color": colours(index % 20), "linewidth": 0.9 if stub else 1.6, "linestyle": ":" if stub else "-"}
        for number, points in enumerate(instances.values()):  # a restarted process: one line per instance
            axes.plot(*zip(*points, strict=True), label=None if number else name, **style)
    plan = outcome.plan
    axes.axvspan(-plan.warmup_s / 60, 0, facecolor="0.97", hatch="//", edgecolor="0.85", label="warm-up")
    axes.axvspan((plan.run_s - plan.window_s) / 60, plan.run_s / 60, color="0.93", label="growth window")
    axes.axvline(plan.restart_at_s / 60, color="0.4", linestyle="--", linewidth=0.8, label="worker-1 restarted")
    axes.set_yscale("log")
    axes.set_xlabel("minutes into the run")
    axes.set_ylabel("resident memory (MB, log scale)")
    axes.set_title(f"Soak: {plan.minutes:g} min at {plan.rate_per_s:g} tasks/s")
    axes.legend(fontsize=6.5, ncol=2, loc="center left", bbox_to_anchor=(1.0, 0.5))
    save_plot(figure, path)
