"""How many worker processes a loader may really use: `data.num_workers`, capped at the CPUs this process may run
on. More workers than CPUs only compete for them (torch warns about it, once per loader), so train and encode ask
here, and say when they use fewer than asked."""

from __future__ import annotations

import os


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def capped_workers(requested: int) -> tuple[int, str | None]:
    """(workers to start, a notice when that is fewer than `requested`)."""
    cpus = usable_cpus()
    if requested <= cpus:
        return requested, None
    return cpus, (f"data.num_workers {requested} is more than the {cpus} CPU(s) this process may use; using {cpus} "
                  f"(set --data.num_workers {cpus} to silence this)")
