"""Thermal zones, CPU clocks and a battery fuel gauge for the virtual phone (test doubles).

The readings follow the CPU time of the phone's own processes (every process its shell commands
started, nothing else on the host): every ``PERIOD_S`` the daemon sums the CPU seconds each of them used
since the last tick and moves its models:

* **Thermal zones** (``/sys/class/thermal/thermal_zone{0,1,2}``, types ``cpu-0-0``, ``skin``, ``battery``):
  first-order lag towards ``ambient + per_cpu × busy CPUs`` with time constant ``tau`` (the skin and the
  battery follow slower and less). ``temp`` is in millidegrees Celsius, as on a phone.
* **CPU clocks** (``/sys/devices/system/cpu/cpuN/cpufreq``): one entry per host CPU the daemon may use (so
  ``taskset`` masks the profiler builds are real); with ``big_cores=K`` the last K are the big cluster
  (3.0 GHz top clock, the others 1.8 GHz), otherwise all share one top clock. ``scaling_cur_freq`` follows
  each CPU's share of the phone's CPU time (a process's time is spread over the CPUs its affinity allows)
  like a schedutil governor, capped to 60% of the top clock while the CPU zone is above ``throttle``.
* **Battery** (``/sys/class/power_supply/battery``): ``current_now`` (µA, negative while discharging, as
  Google's kernels report it) follows the busy CPUs (``idle_ma`` + ``per_cpu_ma`` per CPU), ``voltage_now``
  (µV) sags with load and charge, ``charge_counter`` (µAh) integrates the current. With ``charger=1`` a
  cable is physically connected: ``status`` reads ``Charging`` and the current is the charger's net of
  the load — ``dumpsys battery unplug`` does not change that, exactly as on a phone.

Device paths reach these files because the daemon rewrites ``/sys/class/thermal``,
``/sys/class/power_supply`` and ``/sys/devices/system/cpu`` in shell commands into the sandbox (see
:data:`SENSOR_PREFIXES`), as it does ``/data/local/tmp``. ``dumpsys`` (``battery``, ``battery unplug``,
``battery reset``, ``thermalservice``) is a script in ``/system/bin`` that reads them; ``battery
unplug|reset`` are logged to ``/data/misc/edgedeploy/battery.log`` for tests.

Options (``--sensors KEY=VALUE,...``): ambient (°C, 30), start (°C, ambient), tau (s, 20), per_cpu (°C per
busy CPU, 8), throttle (°C, 70), big_cores (0), battery (1), charger (0), idle_ma (120), per_cpu_ma (700),
zones (3).
"""

from __future__ import annotations

import contextlib
import math
import os
import shlex
import threading
import time
from dataclasses import dataclass, fields
from typing import Any

import psutil

from edgedeploy.errors import InputError

PERIOD_S = 0.25
SENSOR_PREFIXES = ("/sys/class/thermal", "/sys/class/power_supply", "/sys/devices/system/cpu")
BATTERY = "/sys/class/power_supply/battery"
STATE_DIR = "/data/misc/edgedeploy"
BATTERY_LOG = f"{STATE_DIR}/battery.log"
ZONES = (("cpu-0-0", 1.0, 1.0), ("skin", 0.5, 2.0), ("battery", 0.3, 3.0))  # type, gain factor, tau factor
BIG_KHZ, LITTLE_KHZ, MIN_KHZ, STEP_KHZ = 3_000_000, 1_800_000, 300_000, 100_000
CAPACITY_UAH = 5_000_000
CHARGE_MA = 1500.0


@dataclass
class SensorOptions:
    ambient: float = 30.0
    start: float | None = None
    tau: float = 20.0
    per_cpu: float = 8.0
    throttle: float = 70.0
    big_cores: int = 0
    battery: int = 1
    charger: int = 0
    idle_ma: float = 120.0
    per_cpu_ma: float = 700.0
    zones: int = 3

    @classmethod
    def parse(cls, spec: str | None) -> SensorOptions:
        """``ambient=35,start=60,tau=2`` into options; :class:`InputError` naming the bad item otherwise."""
        opts = cls()
        known = {f.name for f in fields(cls)}
        for item in filter(None, (s.strip() for s in (spec or "").split(","))):
            key, sep, value = item.partition("=")
            if not sep or key not in known:
                raise InputError(f"--sensors: {item!r} is not KEY=VALUE with KEY one of {', '.join(sorted(known))}")
            try:
                number = float(value)
            except ValueError:
                raise InputError(f"--sensors: {key} must be a number, got {value!r}") from None
            if not math.isfinite(number) or (key in ("tau",) and number <= 0) or (
                    key not in ("ambient", "start") and number < 0):
                raise InputError(f"--sensors: {key}={value} is out of range")
            setattr(opts, key, int(number) if key in ("big_cores", "battery", "charger", "zones") else number)
        if opts.zones > len(ZONES):
            raise InputError(f"--sensors: zones must be at most {len(ZONES)}")
        return opts


def dumpsys_script(root: str) -> str:
    """``/system/bin/dumpsys`` of the virtual phone; ``root`` is the sandbox's shell path."""
    q = shlex.quote
    therm, bat = q(root + "/sys/class/thermal"), q(root + BATTERY)
    state, log = q(root + STATE_DIR + "/battery.state"), q(root + BATTERY_LOG)
    return f"""#!/bin/sh
# dumpsys of the edgedeploy virtual phone: battery [unplug|reset], thermalservice.
rd() {{ cat "$1" 2>/dev/null || echo 0; }}
case "$1" in
  battery)
    case "$2" in
      unplug|reset) echo "$2" > {state}; echo "$2" >> {log}; exit 0 ;;
      set) echo "set $3 $4" >> {log}; exit 0 ;;
      "") ;;
      *) echo "Unknown option: $2" >&2; exit 1 ;;
    esac
    st=$(cat {state} 2>/dev/null); usb=true
    echo "Current Battery Service state:"
    if [ "$st" = unplug ]; then echo "  (UPDATES STOPPED -- use 'reset' to restart)"; usb=false; fi
    [ -d {bat} ] || {{ echo "  present: false"; exit 0; }}
    echo "  AC powered: false"; echo "  USB powered: $usb"; echo "  Wireless powered: false"
    echo "  status: $(rd {bat}/status)"; echo "  present: true"
    echo "  level: $(rd {bat}/capacity)"; echo "  scale: 100"
    echo "  voltage: $(( $(rd {bat}/voltage_now) / 1000 ))"; echo "  temperature: $(( $(rd {bat}/temp) ))"
    echo "  technology: Li-ion"
    ;;
  thermalservice)
    max=-273000
    for z in {therm}/thermal_zone*; do
      [ -f "$z/temp" ] || continue
      t=$(cat "$z/temp"); [ "$t" -gt "$max" ] && max=$t
    done
    s=0
    for th in 40000 45000 50000 55000 60000 70000; do [ "$max" -ge "$th" ] && s=$((s + 1)); done
    echo "IsStatusOverride: false"; echo "Thermal Status: $s"; echo "Current temperatures from HAL:"
    for z in {therm}/thermal_zone*; do
      [ -f "$z/temp" ] || continue
      t=$(cat "$z/temp"); d=$(( (t % 1000) / 100 ))
      echo "	Temperature{{mValue=$((t / 1000)).$d, mName=$(cat "$z/type"), mStatus=$s}}"
    done
    ;;
  *) echo "Can't find service: $1" >&2; exit 1 ;;
esac
"""


def _atomic_write(fs: Any, device_path: str, text: str) -> None:
    """Replace a sensor file by rename, so a ``cat`` on the device never sees it half written."""
    dir_fd, name = fs.locate(device_path, follow=False, make_dirs=True)
    try:
        tmp = f".{name}.tmp"
        # A fresh inode (unlink, then O_EXCL): a planted link or hard link at the name is never written through.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dir_fd)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                     dir_fd=dir_fd)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    finally:
        os.close(dir_fd)


class Sensors:
    """The models above, written into the sandbox through the daemon's confined file access ``fs``."""

    def __init__(self, fs: Any, options: SensorOptions | None = None) -> None:
        self.fs = fs
        self.o = options or SensorOptions()
        self.cpus = sorted(os.sched_getaffinity(0))
        big = set(self.cpus[len(self.cpus) - self.o.big_cores:]) if self.o.big_cores else set(self.cpus)
        top = BIG_KHZ if self.o.big_cores else 2_400_000
        self.max_khz = {c: (top if c in big else LITTLE_KHZ) for c in self.cpus}
        start = self.o.ambient if self.o.start is None else self.o.start
        self.temps = [start for _ in ZONES[: self.o.zones]]
        self.load = {c: 0.0 for c in self.cpus}
        self.busy = 0.0
        self.charge_uah = 0.8 * CAPACITY_UAH
        self._seen: dict[tuple[int, float], float] = {}
        self._last = time.monotonic()
        self._written: dict[str, str] = {}
        self._lock = threading.Lock()

    # -- files ---------------------------------------------------------------------------------------
    def prepare(self) -> None:
        """The static files (zone types, CPU lists, top clocks) and the first readings."""
        n = len(self.cpus)
        span = f"0-{max(self.cpus)}" if n else ""
        static = {"/sys/devices/system/cpu/online": span, "/sys/devices/system/cpu/possible": span,
                  "/sys/devices/system/cpu/present": span}
        for i, (kind, _, _) in enumerate(ZONES[: self.o.zones]):
            static[f"/sys/class/thermal/thermal_zone{i}/type"] = kind
        for c in self.cpus:
            d = f"/sys/devices/system/cpu/cpu{c}/cpufreq"
            static.update({f"{d}/cpuinfo_max_freq": str(self.max_khz[c]), f"{d}/cpuinfo_min_freq": str(MIN_KHZ),
                           f"{d}/scaling_max_freq": str(self.max_khz[c]), f"{d}/scaling_min_freq": str(MIN_KHZ),
                           f"{d}/scaling_governor": "schedutil"})
        if self.o.battery:
            static.update({f"{BATTERY}/type": "Battery", f"{BATTERY}/present": "1",
                           f"{BATTERY}/technology": "Li-ion", f"{BATTERY}/charge_full": str(CAPACITY_UAH)})
        for path, text in static.items():
            _atomic_write(self.fs, path, text + "\n")
        self.fs.write_file(f"{STATE_DIR}/battery.state", b"reset\n")
        self.write()

    def readings(self) -> dict[str, str]:
        """Every dynamic file's content now."""
        out = {f"/sys/class/thermal/thermal_zone{i}/temp": str(round(t * 1000)) for i, t in enumerate(self.temps)}
        cpu_temp = self.temps[0] if self.temps else self.o.ambient
        for c in self.cpus:
            top = self.max_khz[c] * (0.6 if cpu_temp > self.o.throttle else 1.0)
            f = MIN_KHZ + (top - MIN_KHZ) * min(1.0, self.load[c])
            out[f"/sys/devices/system/cpu/cpu{c}/cpufreq/scaling_cur_freq"] = str(int(f // STEP_KHZ * STEP_KHZ))
        if self.o.battery:
            load_ma = self.o.idle_ma + self.o.per_cpu_ma * self.busy
            net_ma = (CHARGE_MA - load_ma) if self.o.charger else -load_ma
            soc = self.charge_uah / CAPACITY_UAH
            volts = 3.6 + 0.6 * soc + 0.00005 * net_ma  # sags under load (net_ma < 0), rises while charging
            out.update({f"{BATTERY}/current_now": str(round(net_ma * 1000)),
                        f"{BATTERY}/voltage_now": str(round(volts * 1e6)),
                        f"{BATTERY}/charge_counter": str(round(self.charge_uah)),
                        f"{BATTERY}/capacity": str(round(100 * soc)),
                        f"{BATTERY}/status": "Charging" if self.o.charger else "Discharging",
                        f"{BATTERY}/temp": str(round(10 * (self.temps[-1] if self.temps else self.o.ambient)))})
        return out

    def write(self) -> None:
        for path, text in self.readings().items():
            if self._written.get(path) != text:
                with contextlib.suppress(OSError):  # a shell command may have removed the folder
                    _atomic_write(self.fs, path, text + "\n")
                    self._written[path] = text

    # -- models --------------------------------------------------------------------------------------
    def _cpu_seconds(self) -> dict[tuple[int, float], tuple[float, set[int]]]:
        """CPU seconds and allowed CPUs of every live process the phone started (the daemon's descendants)."""
        out = {}
        for p in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                with p.oneshot():
                    t = p.cpu_times()
                    out[(p.pid, p.create_time())] = (t.user + t.system, set(p.cpu_affinity()))
        return out

    def step(self) -> None:
        """Advance the models to now and write the files (one tick; runs in a worker thread)."""
        with self._lock:
            now = time.monotonic()
            dt, self._last = max(1e-3, now - self._last), now
            procs = self._cpu_seconds()
            load = dict.fromkeys(self.cpus, 0.0)
            for key, (secs, allowed) in procs.items():
                used = max(0.0, secs - self._seen.get(key, 0.0))
                mine = [c for c in allowed if c in load] or self.cpus
                for c in mine:
                    load[c] += used / len(mine) / dt
            self._seen = {k: v[0] for k, v in procs.items()}
            self.load = {c: min(1.0, v) for c, v in load.items()}
            self.busy = sum(self.load.values())
            for i, (_, gain, tau_f) in enumerate(ZONES[: self.o.zones]):
                target = self.o.ambient + self.o.per_cpu * gain * self.busy
                self.temps[i] += (target - self.temps[i]) * (1 - math.exp(-dt / (self.o.tau * tau_f)))
            if self.o.battery:
                load_ma = self.o.idle_ma + self.o.per_cpu_ma * self.busy
                net_ma = (CHARGE_MA - load_ma) if self.o.charger else -load_ma
                self.charge_uah = min(CAPACITY_UAH, max(0.0, self.charge_uah + net_ma * 1000 * dt / 3600))
            self.write()
