"""CPU threads for torch's operators: one key (`training.threads`), the usual environment variables respected, and on
a CPU a default that fits the machine as it is when the run starts.

Why: torch starts one thread per core whatever else runs. On a 2-core machine beside six busy processes the
quickstart's threads spun against each other: 36.6 img/s with torch's default, 131.2 img/s with one thread, the same
loss. The thread count changes no result (tests/test_run_time.py trains with 1 and 2 threads to identical weights,
optimizer state and EMA), so it is chosen afresh at every start, and a resume on a quieter machine may use more.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from ditpipe.pipeline.workers import usable_cpus

ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # read in this order; torch itself reads the first at start-up
SAMPLE_SECONDS = 0.25  # how long the CPU's busy time is sampled: 25 clock ticks a core, enough to tell 0 from 1


@dataclass(frozen=True)
class Threads:
    """The thread count a process uses and why, for the preflight."""

    count: int
    why: str


def _mine() -> set[int]:
    """The CPUs this process may run on (its affinity mask: a container's or taskset's share, not the machine's)."""
    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))


def _cpu_times(cpus: set[int]) -> tuple[int, int] | None:
    """(busy, total) clock ticks since boot of the CPUs `cpus`, from /proc/stat; None where there is no /proc."""
    busy = total = 0
    try:
        with open("/proc/stat") as f:
            for line in f:
                name, *values = line.split()
                if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                    ticks = [int(x) for x in values[:8]]  # user nice system idle iowait irq softirq steal
                    busy, total = busy + sum(ticks) - ticks[3] - ticks[4], total + sum(ticks)
    except (OSError, ValueError, IndexError):
        return None
    return (busy, total) if total else None


def busy_cores(seconds: float = SAMPLE_SECONDS) -> float:
    """How many of this process's CPUs other processes keep busy now: it sleeps while /proc/stat is sampled, so
    what is busy is someone else's. The 1-minute load average where /proc is missing (it lags, but it is what
    there is)."""
    cpus = _mine()
    first = _cpu_times(cpus)
    if first is None:
        return min(os.getloadavg()[0], float(len(cpus))) if hasattr(os, "getloadavg") else 0.0
    time.sleep(seconds)
    second = _cpu_times(cpus) or first
    total = second[1] - first[1]
    return (second[0] - first[0]) / total * len(cpus) if total > 0 else 0.0


def choose(setting: int | None, device_type: str, processes_here: int = 1,
           env: dict | os._Environ = os.environ) -> Threads:
    """The thread count for one process: `training.threads` when set; else OMP_NUM_THREADS/MKL_NUM_THREADS (as torch
    and every BLAS read them; torchrun sets 1 for several processes); else, on a CPU, the cores other processes leave
    free, shared among this machine's `processes_here` processes, at least 1; on a GPU torch's default (its host
    threads only launch kernels and run the optimizer's fallbacks)."""
    if setting is not None:
        return Threads(setting, "training.threads")
    for var in ENV_VARS:
        value = env.get(var, "").strip()
        if value.isdigit() and int(value) > 0:
            return Threads(int(value), var)
    if device_type != "cpu":
        return Threads(torch.get_num_threads(), "torch's default")
    have, busy = usable_cpus(), busy_cores()
    free = max(1, round(have - min(busy, have)))
    share = max(1, free // max(processes_here, 1))
    return Threads(share, f"{have} core(s), {busy:.1f} busy with other work when the run started"
                          + (f", shared by {processes_here} processes" if processes_here > 1 else "")
                          + "; set training.threads or OMP_NUM_THREADS to choose")


def apply(setting: int | None, device_type: str, processes_here: int = 1) -> Threads:
    """Choose (above) and set torch's intra-op threads; returns the choice for the preflight."""
    chosen = choose(setting, device_type, processes_here)
    torch.set_num_threads(chosen.count)
    return chosen
