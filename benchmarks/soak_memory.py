"""The soak's memory watch: resident memory and open file descriptors of every process of a local stack (Kafka's JVM,
tritonserver and its Python backend stubs, ingest, each worker, the notifier), sampled on a thread, and the growth of
each over a window, as a robust (Theil-Sen) slope.

RSS is split as the kernel counts it (``/proc/<pid>/status``): anonymous memory (the heap: where a leak shows) and
shared memory (``RssShmem``: pages of ``/dev/shm`` regions mapped and touched, such as the Python backend's regions,
which tritonserver and its stubs both map).
"""

from __future__ import annotations

import csv
import re
import threading
import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import astuple, dataclass, fields
from pathlib import Path

import numpy as np
import psutil

from aimesh.devstack.stack import Stack

#: The criterion of issue 11: no process grows by more than this over the window.
MAX_GROWTH_PCT_PER_10_MIN = 2.0
_TEN_MINUTES_S = 600.0
_STATUS_FIELDS = {"RssAnon": "anon_bytes", "RssShmem": "shmem_bytes"}
_TRITON_REQUESTS = re.compile(r"^nv_inference_request_success\{[^}]*\}\s+(\S+)$", re.MULTILINE)


@dataclass(frozen=True)
class Sample:
    t_s: float  # seconds since the run started
    name: str  # kafka, tritonserver, stub <instance>, ingest, worker-<i>, notifier
    pid: int
    rss_bytes: int
    anon_bytes: int
    shmem_bytes: int
    fds: int
    cpu_s: float  # user and system time since the process started


@dataclass(frozen=True)
class Growth:
    """One process over the window: its RSS by a Theil-Sen line, and its descriptors."""

    name: str
    pids: tuple[int, ...]  # every instance seen in the run; the fit uses the last one
    fit_from_s: float
    samples: int
    rss_start_bytes: int  # first sample of the run (of the first instance)
    rss_end_bytes: int
    rss_max_bytes: int
    anon_end_bytes: int
    shmem_end_bytes: int
    pct_per_10_min: float | None  # None: too few samples in the window to fit
    bytes_per_s: float | None
    fds_start: int
    fds_end: int
    fds_max: int
    cpu_pct: float | None  # mean share of one core over the window

    @property
    def passed(self) -> bool:
        return self.pct_per_10_min is not None and self.pct_per_10_min <= MAX_GROWTH_PCT_PER_10_MIN


def stack_processes(stack: Stack) -> dict[str, int]:
    """Every running process of the stack by name, tritonserver's backend stubs included."""
    pids = {name: p.pid for name, p in stack.services.items() if p.alive() and p.pid}
    if stack.kafka is not None and stack.kafka.pid:
        pids["kafka"] = stack.kafka.pid
    if stack.triton is not None and stack.triton.pid:
        pids["tritonserver"] = stack.triton.pid
        pids.update(triton_stubs(stack.triton.pid))
    return pids


def triton_stubs(server_pid: int) -> dict[str, int]:
    """The Python backend stubs of a tritonserver, named by model instance (``sleep_0_1``) as the stub's command line
    gives it after the model's ``model.py``."""
    stubs: dict[str, int] = {}
    try:
        children = psutil.Process(server_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return stubs
    for child in children:
        try:
            argv = child.cmdline()
        except psutil.Error:
            continue
        model = next((Path(a).parent.parent.name for a in argv if a.endswith("model.py")), None)
        instance = next((a for a in argv if model and a.startswith(f"{model}_")), model or str(child.pid))
        stubs[f"stub {instance}"] = child.pid
    return stubs


def sample(name: str, pid: int, t_s: float) -> Sample | None:
    try:
        process = psutil.Process(pid)
        with process.oneshot():
            rss, fds, cpu = process.memory_info().rss, process.num_fds(), process.cpu_times()
        status = Path(f"/proc/{pid}/status").read_text()
    except (psutil.Error, OSError):
        return None  # it exited between listing and reading: the next round sees what replaced it
    split = {field: 0 for field in _STATUS_FIELDS.values()}
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key in _STATUS_FIELDS:
            split[_STATUS_FIELDS[key]] = int(value.split()[0]) * 1024
    return Sample(t_s, name, pid, rss, split["anon_bytes"], split["shmem_bytes"], fds, cpu.user + cpu.system)


def triton_requests(metrics_url: str) -> float | None:
    """Successful inference requests Triton has counted, over all models (None if its metrics cannot be read)."""
    try:
        with urllib.request.urlopen(metrics_url, timeout=5) as reply:
            text = reply.read().decode()
    except OSError:
        return None
    return sum(float(v) for v in _TRITON_REQUESTS.findall(text))


class MemoryWatch:
    """Samples every process of ``stack`` (and Triton's request count) every ``interval_s`` on a thread."""

    def __init__(self, stack: Stack, interval_s: float, started: float) -> None:
        self._stack = stack
        self._interval_s = interval_s
        self._started = started
        self.samples: list[Sample] = []
        self.triton_requests: list[tuple[float, float]] = []  # (t_s, requests)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Take a last sample and stop; safe to call twice."""
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join()
            self._sample_all()

    def _run(self) -> None:
        while True:
            self._sample_all()
            if self._stop.wait(self._interval_s):
                return

    def _sample_all(self) -> None:
        t_s = time.monotonic() - self._started
        for name, pid in sorted(stack_processes(self._stack).items()):
            taken = sample(name, pid, t_s)
            if taken is not None:
                self.samples.append(taken)
        if self._stack.triton is not None:
            requests = triton_requests(self._stack.triton.metrics_url)
            if requests is not None:
                self.triton_requests.append((t_s, requests))


def growth(samples: Iterable[Sample], window_from_s: float, warmup_s: float) -> list[Growth]:
    """Each process's growth over the window that starts at ``window_from_s``. A process restarted during the run (a
    new pid) is judged on its last instance only, from ``warmup_s`` after that instance's first sample."""
    by_name: dict[str, list[Sample]] = defaultdict(list)
    for s in sorted(samples, key=lambda s: s.t_s):
        by_name[s.name].append(s)
    return [_growth_of(name, series, window_from_s, warmup_s) for name, series in sorted(by_name.items())]


def _growth_of(name: str, series: Sequence[Sample], window_from_s: float, warmup_s: float) -> Growth:
    last = [s for s in series if s.pid == series[-1].pid]
    restarted = last[0] is not series[0]
    fit_from_s = max(window_from_s, last[0].t_s + warmup_s) if restarted else window_from_s
    window = [s for s in last if s.t_s >= fit_from_s]
    slope = _slope(window)
    pct = None
    if slope is not None:
        at_start = float(np.median([s.rss_bytes - slope * (s.t_s - fit_from_s) for s in window]))
        pct = slope * _TEN_MINUTES_S / at_start * 100
    return Growth(
        name=name,
        pids=tuple(dict.fromkeys(s.pid for s in series)),
        fit_from_s=fit_from_s,
        samples=len(window),
        rss_start_bytes=series[0].rss_bytes,
        rss_end_bytes=series[-1].rss_bytes,
        rss_max_bytes=max(s.rss_bytes for s in series),
        anon_end_bytes=series[-1].anon_bytes,
        shmem_end_bytes=series[-1].shmem_bytes,
        pct_per_10_min=pct,
        bytes_per_s=slope,
        fds_start=series[0].fds,
        fds_end=series[-1].fds,
        fds_max=max(s.fds for s in series),
        cpu_pct=_cpu_pct(window),
    )


def _cpu_pct(window: Sequence[Sample]) -> float | None:
    if len(window) < 2 or window[-1].t_s <= window[0].t_s:
        return None
    return (window[-1].cpu_s - window[0].cpu_s) / (window[-1].t_s - window[0].t_s) * 100


def _slope(window: Sequence[Sample], least: int = 4) -> float | None:
    """Bytes per second of the window's RSS by the Theil-Sen estimator (the median of the slopes between every two
    samples): a process whose RSS spikes at a few sampling moments (a model's working set, freed seconds later) does
    not move it, a steady climb or a step that stays does. None under ``least`` samples."""
    if len(window) < least or window[-1].t_s <= window[0].t_s:
        return None
    t = np.array([s.t_s for s in window])
    rss = np.array([s.rss_bytes for s in window], dtype=float)
    i, j = np.triu_indices(len(window), k=1)
    apart = t[j] > t[i]
    return float(np.median((rss[j] - rss[i])[apart] / (t[j] - t[i])[apart]))


def write_samples(samples: Iterable[Sample], path: Path) -> None:
    """Every sample as CSV, for a look at a run afterwards."""
    with path.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow([f.name for f in fields(Sample)])
        writer.writerows(astuple(s) for s in sorted(samples, key=lambda s: (s.t_s, s.name)))


def per_request_growth(
    samples: Iterable[Sample], requests: Sequence[tuple[float, float]], name: str, since_s: float
) -> float | None:
    """Bytes of ``name``'s RSS per Triton request from ``since_s`` to the end (None without enough data)."""
    series = [s for s in samples if s.name == name and s.t_s >= since_s]
    counted = [(t, r) for t, r in requests if t >= since_s]
    if len(series) < 2 or len(counted) < 2 or counted[-1][1] <= counted[0][1]:
        return None
    return (series[-1].rss_bytes - series[0].rss_bytes) / (counted[-1][1] - counted[0][1])
