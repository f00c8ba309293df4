"""Which CPUs a runner uses when the user names no thread count.

TVM's own default counts physical cores from the topology it reads, and takes a 2-vCPU VM for one
core: a run without ``--threads`` decoded at half speed. A phone's little cores, on the other hand,
slow a parallel kernel down to their pace. So the default is every CPU this process may run on, less
the slowest cluster of a big.LITTLE chip (the one with the lowest ``cpuinfo_max_freq``), one thread
per CPU. Standard library only: this runs in the runner process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

SYS_CPU = Path("/sys/devices/system/cpu")


def max_freq_khz(cpu: int, sys_cpu: Path = SYS_CPU) -> int:
    """The CPU's highest clock in kHz, 0 where the kernel does not say (VMs, containers)."""
    try:
        return int((sys_cpu / f"cpu{cpu}" / "cpufreq" / "cpuinfo_max_freq").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def fast_cpus(allowed: list[int], freqs: dict[int, int]) -> list[int]:
    """``allowed`` less the slowest cluster when the clocks differ (big.LITTLE); all of them otherwise."""
    known = {freqs.get(c, 0) for c in allowed}
    if 0 in known or len(known) < 2:
        return sorted(allowed)
    slowest = min(known)
    return sorted(c for c in allowed if freqs[c] > slowest)


@dataclass(frozen=True)
class CpuPlan:
    """The thread count and CPUs of one run, as the result line records them."""

    threads: int
    cpus: list[int]
    #: True when --threads was not given and this plan chose the count.
    default: bool


def plan_threads(requested: int | None, sys_cpu: Path = SYS_CPU) -> CpuPlan:
    """The plan for ``--threads requested`` (None: the default above); pins the process to the chosen CPUs."""
    allowed = sorted(os.sched_getaffinity(0))
    if requested:
        return CpuPlan(requested, allowed, False)
    cpus = fast_cpus(allowed, {c: max_freq_khz(c, sys_cpu) for c in allowed})
    if cpus != allowed:
        # Threads inherit the affinity: TVM's pool then never lands on a little core.
        os.sched_setaffinity(0, cpus)
    return CpuPlan(len(cpus), cpus, True)
