"""Energy per token from the phone's own fuel gauge: no lab power monitor needed.

Method. Android kernels expose the battery's fuel gauge in ``/sys/class/power_supply/<battery>/``:
``current_now`` (µA), ``voltage_now`` (µV) and ``charge_counter`` (µAh). While a run goes, the profiler's
sampling loop reads them with the memory samples (about every 0.25 s, stamped with ``/proc/uptime``);
power is |current| × voltage, integrated (trapezoids over the piecewise-linear readings) across the
prefill and the decode phase. The phases come from the runner's CLOCK_BOOTTIME stamps around generation
(the Python runner reports them) or, for runners that do not, are anchored at the process's exit
(``decode_tokens / decode_tok_s`` back from the end, then the TTFT before that: off by the runner's
teardown). Joules per prefill token = prefill energy / prompt tokens; per decode token = decode energy /
generated tokens. Both are whole-device figures (screen, radios, other apps included); the idle power
read just before the run is reported, and the energy above it ("net") beside the gross figure.
``charge_counter`` × voltage over the whole run is a cross-check on the integrated current.

``dumpsys battery unplug`` before the runs (Android then behaves as on battery: its power policies,
batterystats) and ``dumpsys battery reset`` after, always, also when a run fails.

Limits, stated in every report: the gauge updates slowly (often once a second or slower, and some
report a moving average), so phases shorter than a few of its updates are flagged and their figures
are rough; ``dumpsys battery unplug`` does NOT stop a USB cable from charging — with a cable in, the
gauge reads the charger's current net of the draw, so figures are given only while the kernel says
``Discharging`` (use adb over Wi-Fi, ``adb tcpip``, with the cable out, or a charge-disabling setup);
vendors differ in sign and some report mA (a magnitude below 20 mA under load is taken as mA); the
gauge's accuracy is a few percent at best.
"""

from __future__ import annotations

import re
import time
from typing import Any

import numpy as np

from edgedeploy.devices.base import Device

POWER = "/sys/class/power_supply"
#: Readings whose largest magnitude is below this are in mA, not µA (no working phone draws < 20 mA busy).
MA_BELOW = 20_000
METHOD = ("|current_now| × voltage_now from the battery's fuel gauge, sampled during each run and "
          "integrated over the prefill and decode phases; joules per token = phase energy / phase tokens "
          "(whole-device power; 'net' subtracts the idle power read just before the run)")
LIMITS = ("the gauge updates about once a second or slower (phases shorter than a few updates are flagged); "
          "figures only while the battery is Discharging — dumpsys battery unplug does not stop a USB cable "
          "from charging, so use adb over Wi-Fi with the cable out; vendors differ in sign and units; "
          "gauge accuracy is a few percent")


def find_gauge(device: Device) -> tuple[str | None, str]:
    """The device path of a power supply with ``current_now`` and ``voltage_now`` (a battery first), or
    None and why not."""
    r = device.shell(f"for d in {POWER}/*; do [ -r \"$d/current_now\" ] && [ -r \"$d/voltage_now\" ] && "
                     "echo \"gauge ${d##*/} $(cat \"$d/type\" 2>/dev/null)\"; done; true", timeout=30)
    found = [line.split()[1:] for line in r.stdout.splitlines() if line.startswith("gauge ")]
    found = [f for f in found if f and re.fullmatch(r"[\w.-]+", f[0])]
    if not found:
        return None, f"no fuel gauge: no {POWER}/*/current_now and voltage_now readable on the device"
    found.sort(key=lambda f: (f[1:] != ["Battery"], f[0] != "battery"))
    return f"{POWER}/{found[0][0]}", "fuel gauge"


def has_dumpsys(device: Device) -> bool:
    return device.shell("command -v dumpsys >/dev/null 2>&1", timeout=30).exit_code == 0


def battery_unplug(device: Device) -> bool:
    """``dumpsys battery unplug``; True when it ran."""
    return device.shell("dumpsys battery unplug", timeout=30).exit_code == 0


def battery_reset(device: Device) -> bool:
    """``dumpsys battery reset``, retried once over a fresh connection; True when it ran."""
    for attempt in range(2):
        try:
            if device.shell("dumpsys battery reset", timeout=30).exit_code == 0:
                return True
        except Exception:  # noqa: BLE001 - the reset must be tried again whatever the transport raised
            if attempt == 0:
                try:
                    device.reconnect()
                except Exception:  # noqa: BLE001
                    return False
    return False


def idle_sample(device: Device, gauge: str, readings: int = 3, gap_s: float = 0.4) -> dict[str, Any] | None:
    """The quietest of a few gauge readings just before a run (the last one may still carry the previous
    run's tail: gauges average over about a second): the run's idle baseline."""
    from edgedeploy.profile.variance import read_sensors

    best = None
    for i in range(readings):
        if i:
            time.sleep(gap_s)
        s = read_sensors(device, gauge)
        cur = (s or {}).get("gauge", {}).get("current_now")
        if isinstance(cur, int) and (best is None or abs(cur) < abs(best["gauge"]["current_now"])):
            best = s
    return best


def _series(samples: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str], bool]:
    """Times, |current| in A, voltage in V, statuses, and whether the current was read as mA."""
    rows = [(s["t"], s["gauge"]["current_now"], s["gauge"]["voltage_now"], s["gauge"].get("status", ""))
            for s in samples if "current_now" in s.get("gauge", {}) and "voltage_now" in s.get("gauge", {})]
    if not rows:
        return np.zeros(0), np.zeros(0), np.zeros(0), [], False
    t = np.array([r[0] for r in rows], dtype=float)
    i = np.abs(np.array([r[1] for r in rows], dtype=float))
    milli = bool(i.max() < MA_BELOW and i.max() > 0)
    amps = i * (1e-3 if milli else 1e-6)
    volts = np.array([r[2] for r in rows], dtype=float) * 1e-6
    return t, amps, volts, [r[3] for r in rows], milli


def integrate(t: np.ndarray, p: np.ndarray, a: float, b: float) -> float:
    """∫ p dt over [a, b] of the piecewise-linear readings (flat beyond the first and last)."""
    if b <= a or len(t) == 0:
        return 0.0
    inner = t[(t > a) & (t < b)]
    xs = np.concatenate(([a], inner, [b]))
    ys = np.interp(xs, t, p)
    return float(np.sum((ys[1:] + ys[:-1]) * np.diff(xs)) / 2)


def phases(record: dict[str, Any], t_end: float | None) -> tuple[dict[str, tuple[float, float]], str]:
    """Prefill and decode windows in device uptime seconds, and how they were found."""
    ttft = record.get("ttft_s")
    dec_n, dec_rate = record.get("decode_tokens"), record.get("decode_tok_s")
    clock = record.get("phase_clock") or {}
    if not isinstance(ttft, (int, float)):
        return {}, "no TTFT in the result"
    start, end = clock.get("generate_start"), clock.get("generate_end")
    if isinstance(start, (int, float)) and isinstance(end, (int, float)):
        return {"prefill": (start, start + ttft), "decode": (start + ttft, end)}, "runner's CLOCK_BOOTTIME stamps"
    if t_end is None:
        return {}, "no phase stamps and no end time"
    decode_s = dec_n / dec_rate if isinstance(dec_n, int) and isinstance(dec_rate, (int, float)) and dec_rate else 0.0
    d0 = t_end - decode_s
    return ({"prefill": (d0 - ttft, d0), "decode": (d0, t_end)},
            "anchored at the runner's exit (includes its teardown)")


def run_energy(samples: list[dict[str, Any]], record: dict[str, Any], idle: dict[str, Any] | None,
               t_end: float | None) -> dict[str, Any]:
    """Joules per prefill and decode token of one run, or ``{"available": False, "reason": ...}``."""
    t, amps, volts, statuses, milli = _series(samples)
    if len(t) < 2:
        return {"available": False, "reason": f"only {len(t)} gauge readings during the run"}
    bad = sorted({s for s in statuses if s and s != "Discharging"})
    if bad:
        return {"available": False, "reason": f"battery status {'/'.join(bad)} during the run: with a cable in, the "
                "gauge reads the charger's current net of the device's draw (dumpsys battery unplug does not stop "
                "charging); measure over adb Wi-Fi with the cable out"}
    windows, how = phases(record, t_end)
    if not windows:
        return {"available": False, "reason": how}
    power = amps * volts
    idle_w = None
    g = (idle or {}).get("gauge") or {}
    if isinstance(g.get("current_now"), int) and isinstance(g.get("voltage_now"), int):
        idle_w = abs(g["current_now"]) * (1e-3 if milli else 1e-6) * g["voltage_now"] * 1e-6
    changes = np.diff(t[np.flatnonzero(np.diff(amps)) + 1]) if len(t) > 2 else np.zeros(0)
    update_s = float(np.median(changes)) if len(changes) else float(t[-1] - t[0])
    tokens = {"prefill": record.get("prompt_tokens") or record.get("prefill_tokens"),
              "decode": record.get("decode_tokens")}
    out: dict[str, Any] = {"available": True, "phases_from": how, "samples": int(len(t)),
                           "gauge_update_s": round(update_s, 3), "idle_w": idle_w, "units": "mA" if milli else "µA",
                           "mean_w": float(power.mean())}
    for name, (a, b) in windows.items():
        joules = integrate(t, power, a, b)
        n = tokens[name]
        entry = {"seconds": b - a, "joules": joules, "tokens": n,
                 "j_per_token": joules / n if isinstance(n, int) and n > 0 else None}
        if idle_w is not None:
            net = joules - idle_w * (b - a)
            entry.update(net_joules=net, net_j_per_token=net / n if isinstance(n, int) and n > 0 else None)
        if b - a < 2 * max(update_s, 1e-9):
            entry["rough"] = f"phase of {b - a:.3f} s is shorter than two gauge updates ({update_s:.2f} s)"
        out[name] = entry
    q = [s["gauge"].get("charge_counter") for s in samples if isinstance(s.get("gauge", {}).get("charge_counter"), int)]
    if len(q) >= 2:
        out["charge_counter_j"] = abs(q[0] - q[-1]) * 1e-6 * 3600 * float(volts.mean())
        out["integrated_j"] = integrate(t, power, float(t[0]), float(t[-1]))
    return out


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median J/token (gross and net) per phase over the runs that have figures; the first reason otherwise."""
    ok = [r for r in runs if r.get("available")]
    if not ok:
        reason = next((r.get("reason") for r in runs if r.get("reason")), "no run measured energy")
        return {"available": False, "reason": reason}
    out: dict[str, Any] = {"available": True, "runs": len(ok)}
    for phase in ("prefill", "decode"):
        for key in ("j_per_token", "net_j_per_token"):
            vals = [r[phase][key] for r in ok if isinstance(r.get(phase, {}).get(key), (int, float))]
            if vals:
                out[f"{phase}_{key}"] = float(np.median(vals))
        rough = next((r[phase]["rough"] for r in ok if r.get(phase, {}).get("rough")), None)
        if rough:
            out[f"{phase}_rough"] = rough
    return out
