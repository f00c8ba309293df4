"""Variance control for ``edgedeploy profile``: statistics, device sensors, cool-down and CPU pinning.

Phones throttle: a run that starts on a hot SoC decodes slower than one that starts cold, and the
kernel's governor moves clocks under the runner's feet. So before each measured run the profiler waits
until every thermal zone is back under ``--cooldown-temp`` (or ``--cooldown-max-s`` passes), samples
temperatures and CPU clocks through the run, pins the runner to the big cores where the chip has a
slower cluster, and reports each figure's spread (mean, median, stdev, 95% confidence interval from
Student's t, coefficient of variation) over ``--runs``.

Everything here reads the device through shell commands that work on Android (toybox) and Linux:
``/sys/class/thermal/thermal_zone*/temp`` (millidegrees Celsius), ``/sys/devices/system/cpu/cpu*/cpufreq``
(kHz) and ``/proc/uptime`` (the clock the runner's phase stamps use, CLOCK_BOOTTIME).
"""

from __future__ import annotations

import contextlib
import math
import re
import shlex
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edgedeploy.devices.base import Device, DeviceError
from edgedeploy.runtime.cpus import fast_cpus

THERMAL = "/sys/class/thermal"
CPU = "/sys/devices/system/cpu"
POWER = "/sys/class/power_supply"
#: The decode tok/s coefficient of variation above which a prompt set is flagged.
DEFAULT_MAX_CV_PCT = 5.0
DEFAULT_COOLDOWN_TEMP_C = 45.0
DEFAULT_COOLDOWN_MAX_S = 120.0
COOLDOWN_POLL_S = 1.0
#: Readings outside this range are sensors that are off or broken (some report -273 °C or 0xffff).
PLAUSIBLE_C = (-40.0, 150.0)

# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (table to 30, Cornish-Fisher beyond)."""
    if df < 1:
        raise ValueError("t quantile needs at least one degree of freedom")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def describe(values: list[float]) -> dict[str, float]:
    """median, stdev, min, max, n (as before) plus mean, the 95% t interval of the mean and the CV in percent.

    With one value there is no spread: stdev 0, and the interval and CV are left out.
    """
    if not values:
        return {}
    n = len(values)
    mean = statistics.fmean(values)
    out = {"median": statistics.median(values), "stdev": statistics.stdev(values) if n > 1 else 0.0,
           "min": min(values), "max": max(values), "n": n, "mean": mean}
    if n > 1:
        half = t975(n - 1) * out["stdev"] / math.sqrt(n)
        out.update(ci95_low=mean - half, ci95_high=mean + half, ci95_half=half)
        if mean:
            out["cv_pct"] = 100.0 * out["stdev"] / abs(mean)
    return out


def cv_flags(prompts: list[dict[str, Any]], max_cv_pct: float) -> list[dict[str, Any]]:
    """Prompt sets whose decode tok/s CV exceeds ``max_cv_pct``: name, CV and run count."""
    flags = []
    for p in prompts:
        s = (p.get("summary") or {}).get("decode_tok_s") or {}
        cv = s.get("cv_pct")
        if isinstance(cv, (int, float)) and cv > max_cv_pct:
            flags.append({"prompt": p.get("name", "?"), "cv_pct": cv, "n": s.get("n")})
    return flags


# -- reading the sensors --------------------------------------------------------------------------

_ZONE = re.compile(r"thermal_zone(\d+)/temp:(-?\d+)")
_ZONE_TYPE = re.compile(r"thermal_zone(\d+)/type:(\S+)")
_FREQ = re.compile(r"/cpu(\d+)/cpufreq/scaling_cur_freq:(\d+)")
_MAXF = re.compile(r"/cpu(\d+)/cpufreq/cpuinfo_max_freq:(\d+)")
_GAUGE = re.compile(r"power_supply/([^/\s]+)/(current_now|voltage_now|charge_counter|status):(\S+)")


def sensor_globs(gauge: str | None) -> str:
    """The files one sensor sample reads, as a shell word list (globs left for the device's shell)."""
    files = [f"{THERMAL}/thermal_zone*/temp", f"{CPU}/cpu[0-9]*/cpufreq/scaling_cur_freq"]
    if gauge:
        files += [shlex.quote(f"{gauge}/{n}") for n in ("current_now", "voltage_now", "charge_counter", "status")]
    return " ".join(files)


def sensor_command(gauge: str | None) -> str:
    """One shell line printing ``sens UPTIME path:value ...``; ``grep -H .`` skips files that fail to read
    (some zones answer EINVAL), so one bad sensor never shifts the others."""
    return ("read up _ < /proc/uptime; "
            f"echo \"sens $up $(grep -H . {sensor_globs(gauge)} 2>/dev/null | tr '\\n' ' ')\"")


def millidegrees(raw: int) -> float:
    """Degrees Celsius from a zone's reading: millidegrees as the kernel documents, whole degrees on the
    few devices whose drivers report those (a value under 1000 cannot be millidegrees of a working phone)."""
    return raw / 1000.0 if abs(raw) >= 1000 else float(raw)


def parse_sensor_line(line: str) -> dict[str, Any] | None:
    """A ``sens`` line into ``{"t": uptime_s, "temps_c": {zone: C}, "freq_khz": {cpu: kHz}, "gauge": {...}}``."""
    if not line.startswith("sens "):
        return None
    head, _, rest = line[5:].partition(" ")
    try:
        t = float(head)
    except ValueError:
        return None
    temps = {m.group(1): millidegrees(int(m.group(2))) for m in _ZONE.finditer(rest)}
    freqs = {m.group(1): int(m.group(2)) for m in _FREQ.finditer(rest)}
    gauge: dict[str, Any] = {}
    for m in _GAUGE.finditer(rest):
        key, value = m.group(2), m.group(3)
        if key == "status":
            gauge[key] = value
        else:
            with contextlib.suppress(ValueError):
                gauge[key] = int(value)
    return {"t": t, "temps_c": temps, "freq_khz": freqs, "gauge": gauge}


def hottest(temps: dict[str, float]) -> float | None:
    """The highest plausible zone temperature, None when no zone reads sensibly."""
    ok = [c for c in temps.values() if PLAUSIBLE_C[0] <= c <= PLAUSIBLE_C[1]]
    return max(ok) if ok else None


def read_sensors(device: Device, gauge: str | None = None) -> dict[str, Any] | None:
    """One sample of the device's zones, clocks (and gauge), or None when the shell gave none."""
    r = device.shell(sensor_command(gauge), timeout=30)
    return next((s for s in map(parse_sensor_line, r.stdout.splitlines()) if s), None)


def zone_types(device: Device) -> dict[str, str]:
    """``thermal_zoneN/type`` of every zone: zone number -> type (``cpu-0-0``, ``battery``, ``skin``)."""
    r = device.shell(f"grep -H . {THERMAL}/thermal_zone*/type 2>/dev/null", timeout=30)
    return {m.group(1): m.group(2) for m in _ZONE_TYPE.finditer(r.stdout)}


def thermal_status(device: Device) -> int | None:
    """``dumpsys thermalservice``'s ``Thermal Status: N`` (0 none .. 6 shutdown), None where there is none."""
    r = device.shell("command -v dumpsys >/dev/null 2>&1 && dumpsys thermalservice 2>/dev/null", timeout=30)
    m = re.search(r"Thermal Status:\s*(\d+)", r.stdout)
    return int(m.group(1)) if m else None


# -- cool-down ------------------------------------------------------------------------------------

@dataclass
class Cooldown:
    """Wait before a measured run until every zone is under ``temp_c`` or ``max_s`` passed."""

    temp_c: float = DEFAULT_COOLDOWN_TEMP_C
    max_s: float = DEFAULT_COOLDOWN_MAX_S
    poll_s: float = COOLDOWN_POLL_S

    def wait(self, device: Device, gauge: str | None = None,
             sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
        """Poll the zones; returns what happened (start and end temperature, seconds waited, reached or not)
        and the last sample (its gauge reading is the idle power before the run)."""
        t0 = time.monotonic()
        first = sample = read_sensors(device, gauge)
        start = hottest(first["temps_c"]) if first else None
        if start is None:
            return {"waited_s": 0.0, "reached": None, "start_c": None, "end_c": None, "threshold_c": self.temp_c,
                    "note": "no readable thermal zone", "sample": sample}
        now = start
        while now > self.temp_c and time.monotonic() - t0 < self.max_s:
            sleep(min(self.poll_s, max(0.0, self.max_s - (time.monotonic() - t0))))
            sample = read_sensors(device, gauge) or sample
            now = hottest(sample["temps_c"]) if sample else now
            now = start if now is None else now
        waited = time.monotonic() - t0
        reached = now <= self.temp_c
        out = {"waited_s": round(waited, 2), "reached": reached, "start_c": start, "end_c": now,
               "threshold_c": self.temp_c, "sample": sample}
        if not reached:
            out["note"] = (f"still {now:.1f} °C after {waited:.0f} s (--cooldown-max-s {self.max_s:g}); "
                           f"measured anyway")
        return out


# -- CPU pinning ----------------------------------------------------------------------------------

def cpu_max_freqs(device: Device) -> dict[int, int]:
    """``cpuinfo_max_freq`` (kHz) of every CPU the device lists; empty where cpufreq is absent (VMs)."""
    r = device.shell(f"grep -H . {CPU}/cpu[0-9]*/cpufreq/cpuinfo_max_freq 2>/dev/null", timeout=30)
    return {int(m.group(1)): int(m.group(2)) for m in _MAXF.finditer(r.stdout)}


def parse_cpu_list(text: str) -> list[int]:
    """``4-7``, ``0,2,4-5`` into sorted CPU numbers; ValueError with the reason otherwise."""
    cpus: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise ValueError(f"{text!r} is not a CPU list (like 4-7 or 0,2,4-5)")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo or hi > 1023:
            raise ValueError(f"{part!r} is not a CPU range")
        cpus.update(range(lo, hi + 1))
    return sorted(cpus)


def choose_cpus(device: Device, request: str | None) -> dict[str, Any]:
    """Which CPUs to pin the runner to: ``auto`` (default) the big cores when the chip has a slower
    cluster, ``all`` none, or an explicit list (DeviceError when the device lacks one of them)."""
    request = (request or "auto").strip()
    freqs = cpu_max_freqs(device)
    info: dict[str, Any] = {"request": request, "max_freq_khz": {str(c): f for c, f in sorted(freqs.items())}}
    if request == "all":
        return {**info, "cpus": None, "reason": "--cpus all: not pinned"}
    if request == "auto":
        if not freqs:
            return {**info, "cpus": None, "reason": "the device does not list CPU clocks (no cpufreq): not pinned"}
        big = fast_cpus(sorted(freqs), freqs)
        if big == sorted(freqs):
            return {**info, "cpus": None, "reason": "all CPUs have the same top clock: not pinned"}
        return {**info, "cpus": big, "reason": f"big cores (top clock above the slowest cluster's "
                                               f"{min(freqs.values()) / 1e6:.2f} GHz)"}
    try:
        cpus = parse_cpu_list(request)
    except ValueError as e:
        raise DeviceError(f"--cpus: {e}") from None
    if freqs and not set(cpus) <= set(freqs):
        missing = sorted(set(cpus) - set(freqs))
        raise DeviceError(f"--cpus {request}: the device has no CPU {','.join(map(str, missing))} "
                          f"(it has {','.join(map(str, sorted(freqs)))})")
    return {**info, "cpus": cpus, "reason": "--cpus"}


def taskset_mask(cpus: list[int]) -> str:
    """The hex affinity mask ``taskset`` takes (toybox's taskset has no ``-c``)."""
    return format(sum(1 << c for c in cpus), "x")


def summarise_sensors(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Highest temperature per zone and lowest/highest clock per CPU over one run's samples."""
    temps: dict[str, float] = {}
    lo: dict[str, int] = {}
    hi: dict[str, int] = {}
    for s in samples:
        for z, c in s.get("temps_c", {}).items():
            if PLAUSIBLE_C[0] <= c <= PLAUSIBLE_C[1]:
                temps[z] = max(temps.get(z, c), c)
        for cpu, f in s.get("freq_khz", {}).items():
            lo[cpu], hi[cpu] = min(lo.get(cpu, f), f), max(hi.get(cpu, f), f)
    return {"max_temp_c": temps, "freq_khz_range": {c: [lo[c], hi[c]] for c in sorted(lo, key=int)},
            "samples": len(samples)}
