"""The runner's default thread count: every usable CPU (big cores only on big.LITTLE), stated in the result."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edgedeploy.runtime.cpus import fast_cpus, max_freq_khz, plan_threads
from edgedeploy.runtime.launch import run_local


def fake_sys(root: Path, freqs: dict[int, int | None]) -> Path:
    for cpu, khz in freqs.items():
        d = root / f"cpu{cpu}" / "cpufreq"
        d.mkdir(parents=True)
        if khz is not None:
            (d / "cpuinfo_max_freq").write_text(f"{khz}\n")
    return root


@pytest.mark.parametrize("freqs, expected", [
    ({0: 2_000_000, 1: 2_000_000, 2: 2_000_000}, [0, 1, 2]),  # one cluster: all
    ({0: 1_800_000, 1: 1_800_000, 2: 2_900_000, 3: 2_900_000, 4: 3_300_000}, [2, 3, 4]),  # little left out
    ({0: 0, 1: 3_000_000}, [0, 1]),  # a clock the kernel does not give: no guessing
])
def test_fast_cpus(freqs: dict[int, int], expected: list[int]) -> None:
    assert fast_cpus(sorted(freqs), freqs) == expected


def test_max_freq_reads_sysfs_and_tolerates_absence(tmp_path: Path) -> None:
    root = fake_sys(tmp_path, {0: 2_400_000, 1: None})
    assert max_freq_khz(0, root) == 2_400_000 and max_freq_khz(1, root) == 0 and max_freq_khz(7, root) == 0


def test_plan_uses_every_allowed_cpu_here(tmp_path: Path) -> None:
    allowed = sorted(os.sched_getaffinity(0))
    plan = plan_threads(None, fake_sys(tmp_path, dict.fromkeys(allowed, 2_000_000)))
    assert (plan.threads, plan.cpus, plan.default) == (len(allowed), allowed, True)
    assert plan_threads(3).threads == 3 and not plan_threads(3).default


def test_run_without_threads_states_the_count(host_bundle: Path) -> None:
    r = run_local(host_bundle, [1, 5, 9], max_new_tokens=2)
    assert r["error"] is None
    assert r["threads"] == len(os.sched_getaffinity(0)) and r["threads_default"] is True
    assert r["cpus"] == sorted(os.sched_getaffinity(0))
    explicit = run_local(host_bundle, [1, 5, 9], max_new_tokens=2, threads=1)
    assert explicit["threads"] == 1 and explicit["threads_default"] is False
