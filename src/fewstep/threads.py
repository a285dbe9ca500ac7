"""How many CPU threads a command that runs a network uses (``--threads``).

``--threads N`` wins.  Otherwise a user's ``OMP_NUM_THREADS`` (or ``MKL_NUM_THREADS``) stands, and so does a
torch that someone already loaded and set up (a test, a notebook).  Otherwise the command starts torch with one
thread per core that is free when it starts (:func:`free_cores`) instead of torch's one per core: OpenMP threads
meet at a barrier after every operation, so a thread whose core another process holds stalls the rest: on a
2-core machine with one other busy process the demo teacher ran at 2.2 it/s with torch's two threads against 5.9
with one (README, "CPU threads").  The default is handed to torch through ``OMP_NUM_THREADS`` before torch is
imported (``fewstep.cli.main``), so OpenMP, MKL and oneDNN all start with it and processes the command starts
inherit it; ``import fewstep`` as a library changes nothing.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

from fewstep.errors import FewstepError

THREADS_HELP = ("CPU threads for torch (default: the cores free when the command starts; set it when other "
                "programs will start competing for the CPU later, or to pin a benchmark).")
USER_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
NETWORK_COMMANDS = ("train", "sample", "evaluate", "bench", "distill")


def _cpu_times(cpus: set[int]) -> dict[int, tuple[int, int]] | None:
    """``cpu -> (idle, total)`` clock ticks from /proc/stat for the CPUs in ``cpus``; None where unreadable."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    out = {}
    for line in lines:
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            ticks = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal (guest is in user)
            out[int(name[3:])] = (ticks[3] + ticks[4], sum(ticks))
    return out or None


def _quota_cores() -> int | None:
    """The cgroup v2 CPU quota (a container's ``--cpus``) rounded up, or None where there is none."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        return None


def free_cores(interval: float = 0.1) -> int:
    """Cores this process may use that were idle over ``interval`` seconds (at least 1): the allowed cores
    (affinity, cgroup quota) less the load of every other process, measured from /proc/stat (elsewhere the
    1-minute load average, which lags a load that just started)."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    allowed = min(len(cpus), _quota_cores() or len(cpus))
    before = _cpu_times(cpus)
    if before is not None:
        time.sleep(interval)
        after = _cpu_times(cpus) or {}
        busy = sum(1 - (after[c][0] - i) / max(1, after[c][1] - t) for c, (i, t) in before.items() if c in after)
    else:
        try:
            busy = os.getloadavg()[0]
        except OSError:
            busy = 0.0
    return max(1, min(allowed, round(allowed - busy)))


def default_threads(argv: list[str], environ: dict[str, str] | None = None) -> int | None:
    """Before torch is imported (``fewstep.cli.main``): for a command that runs a network and has no ``--threads``,
    set ``OMP_NUM_THREADS`` to the free cores, shared among a launcher's processes on this machine.  Returns the
    count set, or None where the user's setting (or an already loaded torch) stands."""
    env = os.environ if environ is None else environ
    if not argv or argv[0] not in NETWORK_COMMANDS or any(a.split("=")[0] in ("--threads", "--help") for a in argv):
        return None
    if "torch" in sys.modules or any(env.get(k) for k in USER_VARS):
        return None
    processes = int(env.get("LOCAL_WORLD_SIZE", "1") or 1)  # torchrun / accelerate launch processes on this machine
    n = max(1, free_cores() // max(1, processes))
    env["OMP_NUM_THREADS"] = str(n)
    return n


def apply_threads(threads: int | None) -> None:
    """``--threads N``: this command's torch (and processes it starts) use ``N`` threads; None leaves the default
    of :func:`default_threads`.  Commands call it first."""
    if threads is None:
        return
    if threads < 1:
        raise FewstepError(f"--threads {threads}: give at least 1")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)
