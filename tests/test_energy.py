"""Energy per token from the fuel gauge (issue #13): the arithmetic, the virtual phone's battery, the
dumpsys battery unplug/reset protocol (reset always, also when the profile is interrupted), and
"not available" with its reason on phones without a gauge or on a charging cable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgedeploy.cli import main
from edgedeploy.devices.adb import AdbTcpDevice
from edgedeploy.profile import energy

from .test_virtual_phone import REPO_ROOT, Phone

FAST = ["--prompts", "chat-short", "--runs", "2", "--warmup", "0", "--no-history", "--cooldown-max-s", "0"]


def _sample(t: float, ua: int, uv: int, uah: int | None = None, status: str = "Discharging") -> dict:
    g = {"current_now": ua, "voltage_now": uv, "status": status}
    if uah is not None:
        g["charge_counter"] = uah
    return {"t": t, "temps_c": {}, "freq_khz": {}, "gauge": g}


def test_energy_arithmetic() -> None:
    t = np.array([0.0, 1.0, 2.0])
    assert energy.integrate(t, np.array([1.0, 3.0, 3.0]), 0.0, 2.0) == pytest.approx(2.0 + 3.0)
    assert energy.integrate(t, np.array([1.0, 3.0, 3.0]), 0.5, 1.5) == pytest.approx(2.75)  # interpolated ends
    # 1 A at 4 V for 2 s (4 W); idle 0.5 A: prefill 0.5 s over 10 tokens, decode 1.5 s over 30 tokens.
    samples = [_sample(100 + 0.25 * i, -1_000_000, 4_000_000, 4_000_000 - 70 * i) for i in range(9)]
    record = {"ttft_s": 0.5, "prompt_tokens": 10, "decode_tokens": 30, "decode_tok_s": 20.0,
              "phase_clock": {"generate_start": 100.0, "generate_end": 102.0}}
    idle = _sample(99, -500_000, 4_000_000)
    e = energy.run_energy(samples, record, idle, 102.1)
    assert e["available"] and e["phases_from"] == "runner's CLOCK_BOOTTIME stamps"
    assert e["prefill"]["j_per_token"] == pytest.approx(4 * 0.5 / 10)
    assert e["decode"]["j_per_token"] == pytest.approx(4 * 1.5 / 30)
    assert e["decode"]["net_j_per_token"] == pytest.approx((4 - 2) * 1.5 / 30)
    assert e["idle_w"] == pytest.approx(2.0)
    # charge counter: 560 µAh over 2 s at 4 V = 8.06 J, against 8 J integrated: a cross-check, not the figure
    assert e["charge_counter_j"] == pytest.approx(560e-6 * 3600 * 4) and e["integrated_j"] == pytest.approx(8.0)
    # Without the runner's stamps the phases hang off the process's end.
    no_clock = {k: v for k, v in record.items() if k != "phase_clock"}
    e2 = energy.run_energy(samples, no_clock, idle, 102.0)
    assert e2["decode"]["seconds"] == pytest.approx(1.5) and "exit" in e2["phases_from"]
    # A gauge in mA (some vendors): the magnitude gives it away.
    e3 = energy.run_energy([_sample(100 + i, -1000, 4_000_000) for i in range(3)], record, None, 102.0)
    assert e3["units"] == "mA" and e3["decode"]["j_per_token"] == pytest.approx(4 * 1.5 / 30)
    # A charging battery gives no figure, and says why.
    charging = [_sample(100 + i, 800_000, 4_200_000, status="Charging") for i in range(3)]
    e4 = energy.run_energy(charging, record, None, 102)
    assert not e4["available"] and "Charging" in e4["reason"] and "cable" in e4["reason"]
    assert not energy.run_energy(samples[:1], record, None, 102)["available"]


def _battery_log(phone: Phone) -> list[str]:
    log = phone.sandbox / "data/misc/edgedeploy/battery.log"
    return log.read_text().split() if log.exists() else []


def test_energy_per_token_on_the_virtual_phone(host_bundle: Path, tmp_path: Path) -> None:
    phone = Phone(tmp_path / "sandbox", "--sensors", "idle_ma=200,per_cpu_ma=900")
    try:
        dev = AdbTcpDevice(phone.serial)
        # The gauge as a device command reads it: µA, negative while discharging; µV; µAh.
        r = dev.shell("cat /sys/class/power_supply/battery/current_now /sys/class/power_supply/battery/voltage_now")
        ua, uv = (int(x) for x in r.stdout.split())
        assert ua == -200_000 and 3_500_000 < uv < 4_300_000
        dev.close()
        out = tmp_path / "r"
        assert main(["profile", str(host_bundle), "--device", f"tcp:127.0.0.1:{phone.port}", "--out", str(out),
                     *FAST]) == 0
        assert _battery_log(phone) == ["unplug", "reset"]  # unplugged for the runs, reset after
        # dumpsys battery is back to live updates
        dev = AdbTcpDevice(phone.serial)
        assert "UPDATES STOPPED" not in dev.shell("dumpsys battery").stdout
        dev.close()
    finally:
        phone.stop()
    model = json.loads((out / "results.json").read_text())["models"][0]
    assert model["energy"]["available"] and model["energy"]["gauge"] == "/sys/class/power_supply/battery"
    assert model["energy"]["unplugged"] is True and model["energy"]["reset"] is True
    for run in model["prompts"][0]["runs"]:
        e = run["energy"]
        assert e["available"] and e["phases_from"] == "runner's CLOCK_BOOTTIME stamps"
        volts = 4.3
        low, high = 0.2 * 3.5, (0.2 + 0.9 * os.cpu_count()) * volts  # the model's idle and full-load power
        assert low * 0.95 <= e["idle_w"] <= 0.2 * volts
        for phase, tokens in (("prefill", run["prompt_tokens"]), ("decode", run["decode_tokens"])):
            p = e[phase]
            assert p["tokens"] == tokens and p["seconds"] > 0
            watts = p["joules"] / p["seconds"]
            assert low * 0.95 <= watts <= high, (phase, watts)
            assert p["j_per_token"] == pytest.approx(p["joules"] / tokens)
        # The charge counter integrates the same current: the two agree within the sampling's slack. On a
        # loaded 2-CPU CI host the phone's gauge ticks and the profiler's samples both stall (1.86 J against
        # 1.02 J seen), so the check is a factor of two, not a tolerance of the method.
        assert 0.5 * e["integrated_j"] - 0.3 <= e["charge_counter_j"] <= 2.0 * e["integrated_j"] + 0.3
    summary = model["prompts"][0]["energy"]
    assert summary["available"] and summary["decode_j_per_token"] > 0 and summary["prefill_j_per_token"] > 0
    report = (out / "report.md").read_text()
    assert "| energy chat-short | prefill " in report and "J/token" in report
    assert "| energy method |" in report and "| energy limits |" in report and "Discharging" in report


@pytest.mark.parametrize("sensors, reason, touched", [
    ("battery=0", "no fuel gauge", []),
    ("charger=1", "battery status Charging during the run", ["unplug", "reset"]),
])
def test_energy_not_available_says_why(host_bundle: Path, tmp_path: Path, sensors: str, reason: str,
                                       touched: list[str]) -> None:
    phone = Phone(tmp_path / "sandbox", "--sensors", sensors)
    try:
        out = tmp_path / "r"
        assert main(["profile", str(host_bundle), "--device", f"tcp:127.0.0.1:{phone.port}", "--out", str(out),
                     *FAST]) == 0
        assert _battery_log(phone) == touched
    finally:
        phone.stop()
    model = json.loads((out / "results.json").read_text())["models"][0]
    assert model["energy"]["available"] is False and reason in model["energy"]["reason"]
    line = next(ln for ln in (out / "report.md").read_text().splitlines() if ln.startswith("| energy |"))
    assert f"not available: {reason}" in line


def test_no_energy_leaves_the_battery_alone(host_bundle: Path, tmp_path: Path) -> None:
    phone = Phone(tmp_path / "sandbox")
    try:
        assert main(["profile", str(host_bundle), "--device", f"tcp:127.0.0.1:{phone.port}", "--out",
                     str(tmp_path / "r"), "--no-energy", *FAST]) == 0
        assert _battery_log(phone) == []
    finally:
        phone.stop()
    model = json.loads((tmp_path / "r" / "results.json").read_text())["models"][0]
    assert model["energy"] == {**model["energy"], "available": False, "reason": "--no-energy"}


def test_battery_is_reset_when_the_profile_is_interrupted(host_bundle: Path, tmp_path: Path) -> None:
    phone = Phone(tmp_path / "sandbox")
    proc = None
    try:
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        proc = subprocess.Popen([sys.executable, "-m", "edgedeploy.cli", "profile", str(host_bundle), "--device",
                                 f"tcp:127.0.0.1:{phone.port}", "--out", str(tmp_path / "r"), "--prompts", "chat-short",
                                 "--runs", "50", "--warmup", "0", "--cooldown", "0.5", "--no-history"],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while _battery_log(phone) != ["unplug"]:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.1)
        time.sleep(1.0)  # in the middle of the runs
        os.kill(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 130, err
        assert "dumpsys battery reset done" in err
        assert _battery_log(phone) == ["unplug", "reset"]
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        phone.stop()
