"""Variance control in `edgedeploy profile` (issue #13): statistics, cool-down, sensor sampling, CPU pinning,
--max-cv; and the virtual phone's thermal zones and CPU clocks that device shell commands see."""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

import pytest

from edgedeploy.cli import main
from edgedeploy.devices.adb import AdbTcpDevice
from edgedeploy.profile import variance

from .test_error_shapes import assert_one_error_line
from .test_virtual_phone import Phone

FAST = ["--prompts", "chat-short", "--no-history"]


# -- statistics -----------------------------------------------------------------------------------

def test_describe_gives_t_interval_and_cv() -> None:
    s = variance.describe([10.0, 12.0, 14.0])
    assert s["mean"] == 12 and s["median"] == 12 and s["stdev"] == pytest.approx(2.0) and s["n"] == 3
    half = 4.303 * 2.0 / math.sqrt(3)  # Student's t, 2 degrees of freedom, 95% two-sided
    assert (s["ci95_low"], s["ci95_high"]) == pytest.approx((12 - half, 12 + half))
    assert s["cv_pct"] == pytest.approx(100 * 2 / 12)
    one = variance.describe([5.0])
    assert one["stdev"] == 0 and "ci95_low" not in one and "cv_pct" not in one
    # Beyond the table: the Cornish-Fisher expansion against published quantiles.
    assert variance.t975(31) == pytest.approx(2.0395, abs=1e-3)
    assert variance.t975(100) == pytest.approx(1.9840, abs=1e-3)
    assert variance.t975(1000) == pytest.approx(1.9623, abs=1e-3)
    # Coverage: intervals built this way hold the true mean about 95% of the time (normal data, n=4).
    import random

    rng = random.Random(7)
    hits = 0
    for _ in range(4000):
        d = variance.describe([rng.gauss(100, 5) for _ in range(4)])
        hits += d["ci95_low"] <= 100 <= d["ci95_high"]
    assert 0.935 < hits / 4000 < 0.965


def test_sensor_line_parsing_skips_broken_zones() -> None:
    line = ("sens 1234.56 /sys/class/thermal/thermal_zone0/temp:41200 /sys/class/thermal/thermal_zone1/temp:-273000 "
            "/sys/class/thermal/thermal_zone7/temp:38 /sys/devices/system/cpu/cpu4/cpufreq/scaling_cur_freq:2419200 "
            "/sys/class/power_supply/battery/current_now:-412000 /sys/class/power_supply/battery/status:Discharging")
    s = variance.parse_sensor_line(line)
    assert s is not None and s["t"] == 1234.56
    assert s["temps_c"] == {"0": 41.2, "1": -273.0, "7": 38.0}  # 38: a driver reporting whole degrees
    assert variance.hottest(s["temps_c"]) == 41.2  # -273 °C is a sensor that is off, not a cold phone
    assert s["freq_khz"] == {"4": 2419200}
    assert s["gauge"] == {"current_now": -412000, "status": "Discharging"}
    assert variance.parse_sensor_line("mem VmRSS: 1 kB") is None
    assert variance.taskset_mask([4, 5, 6, 7]) == "f0" and variance.taskset_mask([0]) == "1"
    assert variance.parse_cpu_list("0,2,4-5") == [0, 2, 4, 5]
    with pytest.raises(ValueError):
        variance.parse_cpu_list("7-3")


# -- the virtual phone's sensors --------------------------------------------------------------------

def test_virtual_phone_zones_and_clocks_follow_cpu_time(tmp_path: Path) -> None:
    phone = Phone(tmp_path / "sandbox", "--sensors", "tau=4,per_cpu=40,big_cores=1")
    try:
        dev = AdbTcpDevice(phone.serial)
        # Device paths, as a phone's shell sees them.
        assert dev.shell("cat /sys/class/thermal/thermal_zone0/type").stdout.strip() == "cpu-0-0"
        cold = int(dev.shell("cat /sys/class/thermal/thermal_zone0/temp").stdout)
        assert cold == 30000  # ambient, millidegrees
        freqs = variance.cpu_max_freqs(dev)
        assert sorted(freqs.values())[-1] == 3_000_000 and len(set(freqs.values())) == (2 if len(freqs) > 1 else 1)
        # Two seconds of a busy loop started by a device command heat the CPU zone and raise its clock.
        r = dev.shell("timeout 2 sh -c 'while :; do :; done' & sleep 1.5; "
                      "cat /sys/class/thermal/thermal_zone0/temp; "
                      "cat /sys/devices/system/cpu/cpu*/cpufreq/scaling_cur_freq; wait")
        hot, *clocks = (int(x) for x in r.stdout.split())
        assert hot > cold + 1000, r.stdout  # > 1 °C warmer
        assert max(clocks) > 300_000, r.stdout  # above the idle clock
        status = dev.shell("dumpsys thermalservice").stdout
        assert re.search(r"Thermal Status: \d", status) and "mName=cpu-0-0" in status
        dev.close()
    finally:
        phone.stop()


# -- profile with cool-down, sampling, pinning --------------------------------------------------------

@pytest.fixture(scope="module")
def hot_profile(host_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    """A phone that starts at 95 °C and cools with a 4 s time constant (the battery zone 12 s): the first
    measured run must wait for it; two CPUs clocked differently, so auto pinning picks the big one."""
    root = tmp_path_factory.mktemp("hot")
    phone = Phone(root / "sandbox", "--sensors", "start=95,tau=4,big_cores=1")
    try:
        out = root / "report"
        rc = main(["profile", str(host_bundle), "--device", f"tcp:127.0.0.1:{phone.port}", "--out", str(out),
                   "--runs", "3", "--warmup", "0", "--cooldown-temp", "45", "--cooldown-max-s", "60", *FAST])
        assert rc in (0, 1)
    finally:
        phone.stop()
    return json.loads((out / "results.json").read_text()), (out / "report.md").read_text()


def test_first_measured_run_waits_for_the_zones(hot_profile: tuple[dict, str]) -> None:
    results, report = hot_profile
    runs = results["models"][0]["prompts"][0]["runs"]
    first = runs[0]["cooldown"]
    assert first["reached"] is True and first["start_c"] > 45 >= first["end_c"]
    assert first["waited_s"] > 1.0  # it really waited (95 °C takes ~18 s to fall to 45)
    assert all(r["cooldown"]["end_c"] <= 45 for r in runs)
    assert "| cool-down | before each of 3 measured runs: to 45 °C" in report


def test_temperatures_and_clocks_are_sampled_through_the_run(hot_profile: tuple[dict, str]) -> None:
    results, report = hot_profile
    model = results["models"][0]
    assert model["variance"]["zone_types"] == {"0": "cpu-0-0", "1": "skin", "2": "battery"}
    for run in model["prompts"][0]["runs"]:
        samples = run["sensors"]
        assert samples and all(set(s["temps_c"]) == {"0", "1", "2"} and s["freq_khz"] for s in samples)
        times = [s["t"] for s in samples]
        assert times == sorted(times) and run["device_clock"]["launch"] <= times[0] <= run["device_clock"]["end"]
        assert run["thermal"]["samples"] >= 1
    assert "temperatures (max during runs)" in report and "CPU clocks during runs" in report


def test_runner_is_pinned_to_the_big_cores(hot_profile: tuple[dict, str]) -> None:
    import os

    results, report = hot_profile
    model = results["models"][0]
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("one CPU: no little cluster to leave out")
    big = [cpus[-1]]
    assert model["variance"]["cpus"]["cpus"] == big
    for run in model["prompts"][0]["runs"]:
        assert run["pinned_cpus"] == big and run["cpus"] == big  # the runner's own affinity says so
        assert run["threads"] == 1
    assert f"| CPU pinning | CPUs {big[0]} (big cores" in report


def test_report_gives_mean_ci_and_cv(hot_profile: tuple[dict, str]) -> None:
    results, report = hot_profile
    p = results["models"][0]["prompts"][0]
    dec = p["summary"]["decode_tok_s"]
    values = [r["decode_tok_s"] for r in p["runs"]]
    assert dec["n"] == 3 and dec["mean"] == pytest.approx(statistics.fmean(values))
    assert dec["cv_pct"] == pytest.approx(100 * statistics.stdev(values) / statistics.fmean(values))
    assert dec["ci95_low"] < dec["mean"] < dec["ci95_high"]
    assert "prefill_tok_s" in p["summary"] and "cv_pct" in p["summary"]["prefill_tok_s"]
    line = next(ln for ln in report.splitlines() if ln.startswith("| spread chat-short"))
    assert "95% CI [" in line and "CV " in line
    # Without --max-cv a noisy set is flagged in the report, never failed.
    assert ("FLAGGED" in line) == (dec["cv_pct"] > 5)
    assert "variance" not in {c["name"] for c in results["models"][0]["checks"]}


def test_cooldown_gives_up_after_max_s(host_bundle: Path, tmp_path: Path) -> None:
    phone = Phone(tmp_path / "sandbox", "--sensors", "start=90,tau=200")
    try:
        out = tmp_path / "r"
        main(["profile", str(host_bundle), "--device", f"tcp:127.0.0.1:{phone.port}", "--out", str(out),
              "--runs", "1", "--warmup", "0", "--cooldown-temp", "45", "--cooldown-max-s", "1.5", *FAST])
    finally:
        phone.stop()
    model = json.loads((out / "results.json").read_text())["models"][0]
    cool = model["prompts"][0]["runs"][0]["cooldown"]
    assert cool["reached"] is False and 1.4 <= cool["waited_s"] < 10 and cool["end_c"] > 45
    assert "measured anyway" in cool["note"]
    assert "1 runs started above it (--cooldown-max-s reached)" in (out / "report.md").read_text()


def test_max_cv_fails_with_a_reason_and_passes_when_loose(host_bundle: Path, tmp_path: Path, capsys) -> None:
    phone = Phone(tmp_path / "sandbox")
    try:
        outs = {}
        for cv in ("0.000001", "100000"):
            outs[cv] = tmp_path / f"r{cv}"
            rc = main(["profile", str(host_bundle), "--device", f"tcp:127.0.0.1:{phone.port}", "--out",
                       str(outs[cv]), "--runs", "2", "--warmup", "0", "--max-cv", cv, *FAST])
            assert rc == (1 if cv == "0.000001" else 0), capsys.readouterr().err
    finally:
        phone.stop()
    strict = json.loads((outs["0.000001"] / "results.json").read_text())["models"][0]
    check = next(c for c in strict["checks"] if c["name"] == "variance")
    assert check["status"] == "FAIL" and "over --max-cv 1e-06%: chat-short" in check["message"]
    assert any(r.startswith("variance: decode tok/s coefficient of variation") for r in strict["reasons"])
    loose = json.loads((outs["100000"] / "results.json").read_text())["models"][0]
    assert next(c for c in loose["checks"] if c["name"] == "variance")["status"] == "PASS"
    # Re-rendering applies the same rule (the limit is stored with the results).
    assert main(["report", str(outs["0.000001"] / "results.json"), "--format", "md"]) == 1


@pytest.mark.parametrize("argv, needle", [
    (["--cpus", "7-3"], "--cpus"),
    (["--cpus", "x"], "--cpus"),
    (["--max-cv", "-1"], "--max-cv"),
    (["--max-cv", "0"], "--max-cv"),
    (["--cooldown-temp", "hot"], "--cooldown-temp"),
    (["--cooldown-max-s", "-5"], "--cooldown-max-s"),
])
def test_bad_variance_options_exit_2(host_bundle: Path, capsys, argv: list[str], needle: str) -> None:
    rc = main(["profile", str(host_bundle), *argv])
    out, err = capsys.readouterr()
    assert_one_error_line(rc, out, err, 2, needle)


def test_cpus_the_device_lacks_exit_2(host_bundle: Path, tmp_path: Path, capsys) -> None:
    phone = Phone(tmp_path / "sandbox")
    try:
        rc = main(["profile", str(host_bundle), "--device", f"tcp:127.0.0.1:{phone.port}", "--cpus", "200",
                   "--out", str(tmp_path / "r"), *FAST])
    finally:
        phone.stop()
    out, err = capsys.readouterr()
    assert_one_error_line(rc, out, err, 2, "--cpus 200: the device has no CPU 200", chatty=True)


def test_bad_sensor_spec_is_one_line(tmp_path: Path, capsys) -> None:
    rc = main(["virtual-phone", "--port", "0", "--sandbox", str(tmp_path / "s"), "--sensors", "heat=9"])
    out, err = capsys.readouterr()
    assert_one_error_line(rc, out, err, 2, "--sensors: 'heat=9' is not KEY=VALUE", chatty=True)


def _profile_with(tmp_path: Path, line: str) -> Path:
    src = Path(__file__).resolve().parents[1] / "profiles" / "reference-12gb.toml"
    text = src.read_text().replace('name = "reference-12gb"\n', f'name = "pinned"\n{line}\n', 1)
    path = tmp_path / "pinned.toml"
    path.write_text(text)
    return path


def test_profile_field_pins_and_cli_overrides(host_bundle: Path, tmp_path: Path) -> None:
    prof = _profile_with(tmp_path, 'pin_cpus = "0"')
    phone = Phone(tmp_path / "sandbox")  # no big cores: auto would not pin
    try:
        for extra, want in (([], [0]), (["--cpus", "all"], None)):
            out = tmp_path / f"r{len(extra)}"
            assert main(["profile", str(host_bundle), "--device", f"tcp:127.0.0.1:{phone.port}", "--profile",
                         str(prof), "--out", str(out), "--runs", "1", "--warmup", "0", *extra, *FAST]) == 0
            run = json.loads((out / "results.json").read_text())["models"][0]["prompts"][0]["runs"][0]
            assert run["pinned_cpus"] == want
            if want:
                assert run["cpus"] == want
    finally:
        phone.stop()


def test_bad_pin_cpus_in_a_profile_exit_2(host_bundle: Path, tmp_path: Path, capsys) -> None:
    rc = main(["profile", str(host_bundle), "--profile", str(_profile_with(tmp_path, 'pin_cpus = "big"'))])
    out, err = capsys.readouterr()
    assert_one_error_line(rc, out, err, 2, "field 'pin_cpus' must be auto, all or a CPU list")
