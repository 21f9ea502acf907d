"""The 3-minute variant of the soak test (``make soak`` runs 30): mixed load, hostile inputs and a worker restart
against a stack of its own, judged by the harness's own verdict."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.soak, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
MINUTES = 3


def test_three_minutes_of_mixed_load_end_every_task_once_without_growth(tmp_path: Path) -> None:
    report, summary_path = tmp_path / "soak.md", tmp_path / "soak.json"
    command = [
        sys.executable, "benchmarks/soak.py", "--minutes", str(MINUTES),
        "--markdown", str(report), "--json", str(summary_path),
    ]  # fmt: skip
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=540, check=False)
    assert summary_path.exists(), (
        f"the harness ended with {run.returncode} and no verdict:\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
    )
    summary = json.loads(summary_path.read_text())
    # What the run must have exercised for its verdict to mean anything.
    assert summary["accepted"] > MINUTES * 60 * 10, summary["actions"]
    assert {"fire", "watch", "resume", "cancel", "batch"} <= set(summary["actions"])
    assert any(key.startswith("text of limit-") for key in summary["hostile"]), summary["hostile"]
    assert len({s["pid"] for s in summary["samples"] if s["name"] == "worker-1"}) == 2, "worker-1 was not restarted"
    assert {"kafka", "tritonserver", "ingest", "notifier", "worker-0"} <= {g["name"] for g in summary["growth"]}
    assert summary["passed"] and run.returncode == 0, report.read_text()
