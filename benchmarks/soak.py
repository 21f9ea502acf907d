"""The soak test of issue 11 (``make soak``): minutes of mixed load against a local stack this harness starts, then the
verdict.

    python benchmarks/soak.py [--minutes 30] [--rate 20] [--markdown docs/soak.md] [--plot docs/soak_memory.png]

A fresh stack on free ports (Kafka, Triton, ingest, two workers, the notifier, authentication on) with the notifier's
retention shorter than the run, so expiry is exercised. Ordinary load (benchmarks/soak_load.py) runs at ``--rate``
tasks per second; once a minute a round of hostile inputs (benchmarks/soak_hostile.py) and a lookup of tasks past
retention; midway one worker is killed and started again. The resident memory and open descriptors of every process
are sampled throughout (benchmarks/soak_memory.py). After the load, every accepted task must have ended exactly once
(the results topic read read_committed from its start) and no process may grow by more than 2% per 10 minutes over
the last 20 minutes (the last two thirds of a shorter run). Exit status 0 on a pass, 1 on a failure.
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import json
import random
import shlex
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable for ``benchmarks.*``
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aimesh.client import AsyncClient, ClientError  # noqa: E402
from aimesh.devstack.stack import Stack, StackSettings  # noqa: E402
from aimesh.settings import IngestSettings  # noqa: E402
from benchmarks import soak_report  # noqa: E402
from benchmarks.common import API_KEY, AUTH, AUTH_ENV, log  # noqa: E402
from benchmarks.soak_hostile import Hostile  # noqa: E402
from benchmarks.soak_ledger import (  # noqa: E402
    ExactlyOnce,
    ResultLedger,
    check_exactly_once,
    terminal_counts,
    wait_caught_up,
)
from benchmarks.soak_load import MAX_REFUSED_SHARE, Load, Tally  # noqa: E402
from benchmarks.soak_memory import Growth, MemoryWatch, Sample, growth, per_request_growth, write_samples  # noqa: E402

WORKER_GROUP = "aimesh-workers"
RESTARTED_WORKER = 1
MIN_JUDGED_WINDOW_S = 600.0
DRAIN_TIMEOUT_S = 180.0  # after the load: the slowest accepted task (a 60 s deadline, a restart) has ended by then


@dataclass(frozen=True)
class Plan:
    """What a run does, fixed before it starts."""

    minutes: float
    rate_per_s: float
    workers: int
    retention_s: float
    sample_interval_s: float
    restart: str
    seed: int
    warmup_s: float

    @property
    def run_s(self) -> float:
        return self.minutes * 60

    @property
    def window_s(self) -> float:
        """The growth window: the last 20 minutes, or the last two thirds of a shorter run."""
        return min(20 * 60.0, self.run_s * 2 / 3)

    @property
    def judges_memory(self) -> bool:
        """Under 10 minutes a window holds warm-up (Kafka's heap expanding, Triton's buffers reaching the largest
        message seen) more than anything else: its growth is reported, not judged."""
        return self.window_s >= MIN_JUDGED_WINDOW_S

    @property
    def restart_at_s(self) -> float:
        return self.run_s / 2

    @property
    def hostile_at_s(self) -> list[float]:
        """Seconds since the end of the warm-up: one round early in the warm-up, then one a minute."""
        return [10 - self.warmup_s, *range(30, int(self.run_s) - 10, 60)]


@dataclass
class Outcome:
    plan: Plan
    command: str
    tally: Tally
    exactly_once: ExactlyOnce
    statuses: dict[str, int]
    growth: list[Growth]
    samples: list[Sample]
    triton_bytes_per_request: float | None
    dead: list[str] = field(default_factory=list)  # processes of the stack that died on their own
    reasons: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.reasons


def parse_args(argv: list[str] | None = None) -> tuple[Plan, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=20.0, help="ordinary tasks per second")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--retention-s",
        type=float,
        help="the notifier's AIMESH_RETENTION_S and ingest's AIMESH_IDEMPOTENCY_TTL_S (default: a sixth of the run)",
    )
    parser.add_argument("--sample-interval-s", type=float, help="default 30, or a 30th of a run under 15 minutes")
    parser.add_argument("--restart", choices=["kill", "term"], default="kill", help="how worker-1 is stopped midway")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument(
        "--warmup-s", type=float, help="load before the run's clock starts (default 60, a sixth of a short run)"
    )
    parser.add_argument("--markdown", type=Path, help="write the report here (its other sections are kept)")
    parser.add_argument("--plot", type=Path, help="write the memory plot here (needs matplotlib: the bench extra)")
    parser.add_argument("--json", type=Path, help="write the verdict and counts here")
    parser.add_argument("--samples", type=Path, help="write every memory sample here (CSV)")
    args = parser.parse_args(argv)
    run_s = args.minutes * 60
    plan = Plan(
        minutes=args.minutes,
        rate_per_s=args.rate,
        workers=args.workers,
        retention_s=args.retention_s or max(30.0, run_s / 6),
        sample_interval_s=args.sample_interval_s or (30.0 if args.minutes >= 15 else max(2.0, run_s / 30)),
        restart=args.restart,
        seed=args.seed,
        warmup_s=args.warmup_s if args.warmup_s is not None else min(60.0, run_s / 6),
    )
    return plan, args


def start_stack(plan: Plan) -> Stack:
    settings = StackSettings.on_free_ports(Path(tempfile.mkdtemp(prefix="aimesh-soak-")), workers=plan.workers)
    # Both memories that grow with recent traffic (the notifier's tasks, ingest's idempotency keys) are kept for
    # less than the run, so that what they hold reaches its bound and a leak shows apart from it.
    env = {
        **AUTH_ENV,
        "AIMESH_RETENTION_S": str(plan.retention_s),
        "AIMESH_IDEMPOTENCY_TTL_S": str(plan.retention_s),
        "AIMESH_LOG_FORMAT": "json",
    }
    stack = Stack(settings, extra_env=env)
    log(f"starting a stack in {settings.run_dir}")
    try:
        stack.start()
    except BaseException:
        stack.stop()
        raise
    return stack


def restart_worker(stack: Stack, how: str) -> None:
    """Stop worker-1 as a crash (SIGKILL) or gracefully (SIGTERM), and start it again under the same id."""
    if how == "kill":
        stack.kill_worker(RESTARTED_WORKER)
    stack.restart_worker(RESTARTED_WORKER)


async def expiry_lookups(client: AsyncClient, ledger: ResultLedger, tally: Tally, plan: Plan) -> None:
    """GetTask on a few tasks that ended longer ago than the retention (plus a sweep): the notifier must have
    forgotten them."""
    sweep_s = min(60.0, max(1.0, plan.retention_s / 10))
    old = ledger.ended_before(time.monotonic() - plan.retention_s - sweep_s - 10, list(tally.accepted)[-5000:])
    for task_id in random.sample(old, min(3, len(old))):
        try:
            await client.get(task_id, timeout_s=5)
            tally.expiry_lookups["still known"] += 1
        except ClientError as e:
            tally.expiry_lookups["forgotten" if e.code.name == "NOT_FOUND" else e.code.name] += 1


async def drive(stack: Stack, plan: Plan, tally: Tally, ledger: ResultLedger, started: float) -> None:
    """The ordinary load for the whole run, and beside it the hostile rounds, the lookups and the restart."""
    rng = random.Random(plan.seed)
    async with AsyncClient(stack.ingest_address, stack.notifier_address, api_key=API_KEY) as client:
        hostile = Hostile(
            stack.ingest_address,
            stack.notifier_address,
            AUTH,
            tally,
            random.Random(plan.seed + 1),
            max_text_bytes=IngestSettings().max_text_bytes,
        )
        load = asyncio.ensure_future(Load(client, tally, rng, plan.rate_per_s).run(started + plan.run_s))
        schedule = sorted([(t, "hostile") for t in plan.hostile_at_s] + [(plan.restart_at_s, "restart")])
        try:
            for index, (at_s, what) in enumerate(schedule):
                await asyncio.sleep(max(0.0, started + at_s - time.monotonic()))
                if what == "restart":
                    log(f"{how_restarted(plan)} worker-{RESTARTED_WORKER}")
                    await asyncio.to_thread(restart_worker, stack, plan.restart)
                else:
                    await hostile.round(index, list(tally.accepted)[-200:])
                    await expiry_lookups(client, ledger, tally, plan)
                    log(f"{len(tally.accepted)} tasks accepted, {sum(tally.errors.values())} errors")
            await load
        finally:
            await hostile.close()


def how_restarted(plan: Plan) -> str:
    return "SIGKILL and restart" if plan.restart == "kill" else "SIGTERM and restart"


def judge(stack: Stack, plan: Plan, tally: Tally, watch: MemoryWatch, ledger: ResultLedger) -> Outcome:
    """Wait for every accepted task to end and every task record to be processed, then read the results topic
    afresh and fit the memory samples."""
    missing = ledger.wait_for(list(tally.accepted), DRAIN_TIMEOUT_S)
    if missing:
        log(f"{len(missing)} accepted tasks have no terminal result after {DRAIN_TIMEOUT_S:.0f} s")
    else:
        wait_caught_up(stack.kafka_bootstrap, WORKER_GROUP, [stack.topics.tasks_topic, stack.topics.batch_tasks_topic])
    counts, statuses = terminal_counts(stack.kafka_bootstrap, stack.topics.results_topic)
    window_from_s = plan.run_s - plan.window_s
    fitted = growth(watch.samples, window_from_s, warmup_s=plan.window_s / 4)
    outcome = Outcome(
        plan=plan,
        command="",
        tally=tally,
        exactly_once=check_exactly_once(tally.accepted, counts),
        statuses=dict(statuses),
        growth=fitted,
        samples=watch.samples,
        triton_bytes_per_request=per_request_growth(
            watch.samples, watch.triton_requests, "tritonserver", window_from_s
        ),
        dead=[name for name, p in stack.services.items() if not p.alive()],
    )
    outcome.reasons = reasons(outcome)
    return outcome


def reasons(outcome: Outcome) -> list[str]:
    """Why the run failed; empty on a pass."""
    found = []
    once = outcome.exactly_once
    if not once.passed:
        found.append(
            f"{len(once.missing)} accepted tasks never ended, {len(once.duplicated)} ended more than once, "
            f"{len(once.unknown)} unknown task ids ended"
        )
    for g in outcome.growth if outcome.plan.judges_memory else []:
        if not g.passed:
            rate = "too few samples" if g.pct_per_10_min is None else f"{g.pct_per_10_min:+.1f}% per 10 min"
            found.append(f"{g.name} grew {rate} over the window")
    if outcome.dead:
        found.append(f"processes died: {', '.join(outcome.dead)}")
    if outcome.tally.unexpected_hostile:
        found.append(f"{len(outcome.tally.unexpected_hostile)} hostile inputs got an undocumented status")
    if outcome.tally.errors:
        found.append(f"{sum(outcome.tally.errors.values())} ordinary calls failed")
    refused = sum(outcome.tally.refused.values())
    if refused > MAX_REFUSED_SHARE * max(1, outcome.tally.submitted):
        found.append(
            f"admission control refused {refused} of {outcome.tally.submitted} ordinary tasks: the mesh did not keep "
            "up with the load"
        )
    if outcome.tally.watch_gaps:
        found.append(f"{len(outcome.tally.watch_gaps)} resumed watches missed, repeated or reordered an update")
    return found


def run(plan: Plan) -> Outcome:
    stack = start_stack(plan)
    tally = Tally()
    ledger = ResultLedger(stack.kafka_bootstrap, stack.topics.results_topic)
    # Time 0 is the end of the warm-up, in which every path (large texts included) has run once: growth in the
    # window is then growth that goes on, not a first high-water mark.
    started = time.monotonic() + plan.warmup_s
    watch = MemoryWatch(stack, plan.sample_interval_s, started)
    watch.start()
    passed = False
    try:
        log(
            f"{plan.warmup_s:g} s of warm-up, then {plan.minutes:g} minutes at {plan.rate_per_s:g} tasks/s, "
            f"retention {plan.retention_s:g} s"
        )
        asyncio.run(drive(stack, plan, tally, ledger, started))
        watch.stop()  # the growth window ends with the load; the drain below is not part of it
        outcome = judge(stack, plan, tally, watch, ledger)
        passed = outcome.passed
        return outcome
    finally:
        watch.stop()
        ledger.close()
        stack.stop()
        if passed:
            shutil.rmtree(stack.settings.run_dir, ignore_errors=True)
        else:
            log(f"logs kept in {stack.log_dir}")


def write_outputs(outcome: Outcome, args: argparse.Namespace) -> None:
    if args.plot:
        soak_report.plot(outcome, args.plot)
    if args.markdown:
        soak_report.write_markdown(args.markdown, outcome, plot=args.plot)
        log(f"wrote {args.markdown}")
    if args.json:
        args.json.write_text(json.dumps(soak_report.summary(outcome), indent=2, default=str))
    if args.samples:
        write_samples(outcome.samples, args.samples)


def main(argv: list[str] | None = None) -> int:
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>` prints where a stuck run is
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind, so the stack is stopped
    plan, args = parse_args(argv)
    outcome = run(plan)
    outcome.command = shlex.join(["python", "benchmarks/soak.py", *(sys.argv[1:] if argv is None else argv)])
    write_outputs(outcome, args)
    print(soak_report.verdict_text(outcome))
    return 0 if outcome.passed else 1


if __name__ == "__main__":
    sys.exit(main())
