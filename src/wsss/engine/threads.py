"""How many CPU threads a process may use, and the intra-op thread count chosen from it.

``os.cpu_count()`` counts the host's cores, not this process's share: a container limited by a cgroup
CPU quota, or a process pinned by affinity (taskset, a batch scheduler), gets fewer. Running more
compute threads than that share makes the threads wait on each other (a step several times slower),
so the budget is the smaller of the affinity set and the quota, rounded up.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch


def _cgroup_quota() -> float | None:
    """CPUs allowed by the cgroup quota (v2 ``cpu.max`` or v1 ``cpu.cfs_*``); None when unlimited."""
    v2 = Path("/sys/fs/cgroup/cpu.max")
    try:
        if v2.is_file():
            limit, period = v2.read_text().split()[:2]
            return None if limit == "max" else int(limit) / int(period)
        q, p = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")
        if q.is_file() and p.is_file():
            quota = int(q.read_text())
            return None if quota <= 0 else quota / int(p.read_text())
    except (OSError, ValueError):
        pass
    return None


def cpu_budget() -> int:
    """CPUs this process may use: min(affinity set, cgroup quota rounded up), at least 1."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        n = min(n, math.ceil(quota))
    return max(1, n)


def configure_threads(threads: int = 0) -> int:
    """Set torch's intra-op threads: ``threads`` if > 0, else $OMP_NUM_THREADS if set, else the CPU budget.

    Returns the number set. Data-loader workers are separate processes; each is given one thread by
    torch itself, and they wait on I/O most of the time, so they are not subtracted from the budget.
    """
    if threads <= 0:
        env = os.environ.get("OMP_NUM_THREADS", "")
        threads = int(env) if env.isdigit() and int(env) > 0 else cpu_budget()
    torch.set_num_threads(threads)
    return threads


def busy_host_warning(threads: int, budget: int | None = None) -> str | None:
    """A warning when other processes already load the CPUs this run's ``threads`` will use, else None.

    Intra-op threads wait on each other at every parallel region, so one busy core slows all of them:
    measured on a 2-core machine with one other busy process, 2 threads took 2.35 s per bench step and
    1 thread 1.12 s (quiet: 0.74 and 1.19; docs/benchmarks.md). The 1-minute load average at start is
    only a hint (it lags, and the load may change), so this warns instead of choosing for the user."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
    budget = budget or cpu_budget()
    free = budget - load
    if threads <= 1 or free > threads - 0.75:
        return None
    return (f"load average {load:.1f} on {budget} CPUs: other processes are busy; with {threads} intra-op threads "
            f"a step can be several times slower than with --train.threads {max(1, round(free))}")  # fmt: skip
