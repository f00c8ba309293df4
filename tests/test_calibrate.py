"""``edgedeploy calibrate`` against virtual phones: the ceiling within 2% of the budget, the runtime base,
the profile it writes (and how strictly profiles are checked), and the phone's /proc/meminfo.

Real processes throughout: each virtual phone is a subprocess on 127.0.0.1 enforcing its budget by polling
RSS every 20 ms and SIGKILLing; the probe is the C program built with this host's cc.
"""

from __future__ import annotations

import json
import threading
import time
import tomllib
from pathlib import Path

import pytest

from edgedeploy.cli import main
from edgedeploy.devices.adb import AdbTcpDevice
from edgedeploy.devices.base import parse_meminfo
from edgedeploy.devices.profiles import load_profile, user_profiles_dir
from edgedeploy.errors import InputError

from .test_error_shapes import assert_one_error_line, run_main
from .test_native_runner import host_runner_build  # noqa: F401 - the session fixture
from .test_virtual_phone import Phone

MIB = 2**20
TIMINGS: dict[int, float] = {}


@pytest.fixture
def config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Calibrated profiles go to a temporary user config folder."""
    monkeypatch.setenv("EDGEDEPLOY_CONFIG", str(tmp_path / "config"))
    return tmp_path / "config"


# -- /proc/meminfo on the virtual phone ------------------------------------------------------------

def test_virtual_phone_meminfo_shows_its_budget_and_what_runs(tmp_path: Path) -> None:
    phone = Phone(tmp_path / "sandbox", "--budget-mb", "700")
    try:
        dev = AdbTcpDevice(phone.serial)
        text = dev.run_args(["cat", "/proc/meminfo"]).stdout
        mem = parse_meminfo(text)
        assert mem["MemTotal"] == 700 * MIB and mem["SwapTotal"] == 0 and mem["SwapFree"] == 0
        assert 690 * MIB < mem["MemAvailable"] <= 700 * MIB
        assert text.startswith("MemTotal:         716800 kB\n")  # the kernel's column layout
        # grep through the shell sees the same file.
        line = dev.shell("grep MemAvailable /proc/meminfo").stdout.strip()
        assert line.startswith("MemAvailable:") and line.endswith(" kB")
        # A command holding 200 MiB (touched) lowers MemAvailable for the others while it runs.
        hog = threading.Thread(target=lambda: AdbTcpDevice(phone.serial).shell(
            "python3 -c \"import time; b = b'x' * (200 << 20); time.sleep(3)\"", timeout=30))
        hog.start()
        # Sample for as long as the hog lives: stopping at the first reading past a threshold could
        # catch it half-way through touching its 200 MiB.
        low = mem["MemAvailable"]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and hog.is_alive():
            time.sleep(0.2)
            low = min(low, parse_meminfo(dev.run_args(["cat", "/proc/meminfo"]).stdout)["MemAvailable"])
        hog.join()
        assert mem["MemAvailable"] - 260 * MIB < low < mem["MemAvailable"] - 190 * MIB
        after = parse_meminfo(dev.run_args(["cat", "/proc/meminfo"]).stdout)["MemAvailable"]
        assert after > mem["MemAvailable"] - 10 * MIB  # given back when it ended
        dev.close()
    finally:
        phone.stop()


def test_virtual_phone_without_budget_shows_the_hosts_meminfo(tmp_path: Path) -> None:
    phone = Phone(tmp_path / "sandbox")
    try:
        dev = AdbTcpDevice(phone.serial)
        mem = parse_meminfo(dev.run_args(["cat", "/proc/meminfo"]).stdout)
        dev.close()
    finally:
        phone.stop()
    host = parse_meminfo(Path("/proc/meminfo").read_text())
    assert mem["MemTotal"] == host["MemTotal"]


def test_virtual_phone_meminfo_never_writes_through_planted_links(tmp_path: Path) -> None:
    """A reused sandbox with a symlink and a hard link where the phone keeps its meminfo: both are replaced."""
    victim, linked = tmp_path / "victim.txt", tmp_path / "linked.txt"
    victim.write_text("keep")
    linked.write_text("keep too")
    proc = tmp_path / "sandbox" / "proc"
    proc.mkdir(parents=True)
    (proc / "meminfo").symlink_to(victim)
    (proc / ".meminfo.tmp").hardlink_to(linked)
    phone = Phone(tmp_path / "sandbox", "--budget-mb", "300")
    try:
        dev = AdbTcpDevice(phone.serial)
        assert parse_meminfo(dev.run_args(["cat", "/proc/meminfo"]).stdout)["MemTotal"] == 300 * MIB
        dev.close()
    finally:
        phone.stop()
    assert victim.read_text() == "keep" and linked.read_text() == "keep too"
    assert not (proc / "meminfo").is_symlink()


# -- the acceptance: the ceiling within 2% of the budget --------------------------------------------

@pytest.mark.parametrize("budget_mb", [1500, 3000, 6000])
def test_calibrate_finds_the_budget(budget_mb: int, host_bundle: Path, config_dir: Path, tmp_path: Path,
                                    capsys) -> None:
    phone = Phone(tmp_path / "sandbox", "--budget-mb", str(budget_mb))
    try:
        t0 = time.perf_counter()
        rc = main(["calibrate", "--device", f"tcp:127.0.0.1:{phone.port}", "--name", f"vp{budget_mb}",
                   "--bundle", str(host_bundle), "--json"])
        TIMINGS[budget_mb] = time.perf_counter() - t0
        out, err = capsys.readouterr()
    finally:
        phone.stop()
    assert rc == 0, err
    done = json.loads(out)
    path = Path(done["path"])
    assert path == user_profiles_dir() / f"vp{budget_mb}.toml" and path.parent == config_dir / "profiles"
    prof = load_profile(f"vp{budget_mb}")  # found by name in the user's folder
    cal = prof.calibration
    assert prof.calibrated and cal is not None and prof.source == str(path)
    error = (cal["ceiling_mb"] - budget_mb) / budget_mb
    print(f"budget {budget_mb} MiB: ceiling {cal['ceiling_mb']} MiB ({100 * error:+.2f}%), runs "
          f"{cal['ceiling_runs_mb']}, {TIMINGS[budget_mb]:.1f} s, passes {done['passes']}")
    assert abs(error) <= 0.02
    # The budget counts the whole command (shell included), so the probe can never hold more than it.
    assert cal["ceiling_mb"] < budget_mb
    runs = cal["ceiling_runs_mb"]
    assert len(runs) == 3 and max(runs) - min(runs) < 0.01 * budget_mb
    assert prof.usable_budget_mb == cal["ceiling_mb"] == min(cal["ceiling_runs_mb"])
    # The phone's meminfo before and after, and the kill that ended the probe.
    assert cal["mem_total_mb"] == budget_mb and 0.98 * budget_mb < cal["mem_available_before_mb"] <= budget_mb
    assert cal["mem_available_after_mb"] > 0.98 * budget_mb  # the probe's memory came back
    assert cal["swap_total_mb"] == 0 and "lowmemorykiller: Kill 'edgedeploy-memprobe'" in cal["lmkd"]
    # The runtime base: the Python runner before its weights (~80 MiB: TVM runtime, no torch).
    assert 40 < cal["runtime_rss_before_weights_mb"] <= cal["runtime_base_mb"] < cal["runtime_peak_mb"] + 1 < 200
    assert prof.runtime_base_mb == cal["runtime_base_mb"]
    assert cal["bandwidth_gbps"] > 0.5 and cal["bandwidth_buffer_mb"] >= 64
    assert set(cal["measured"]) == {"runtime_base", "ceiling", "bandwidth"}
    # Bisection, not a crawl: a handful of probe processes, each with a bounded number of steps.
    assert len(done["passes"]) <= 6 and all(p["levels"] <= 40 for p in done["passes"])
    assert TIMINGS[budget_mb] < 150


def test_estimate_uses_the_calibration(config_dir: Path, capsys) -> None:
    """A calibrated profile's runtime base and budget drive the estimate, and it says where they come from."""
    from .conftest import REFERENCE_CONFIGS

    base = load_profile("reference-12gb")
    text = (Path(base.source).read_text().replace('name = "reference-12gb"', 'name = "cal"')
            .replace("usable_budget_mb = 8192", "usable_budget_mb = 7000")
            .replace("runtime_base_mb = 200", "runtime_base_mb = 91.5")
            .replace("calibrated = false", "calibrated = true"))
    text += ('\n[calibration]\ndate = "2026-12-01T07:00:00Z"\nmethod = "test"\nceiling_mb = 7100.5\n'
             "ceiling_runs_mb = [7100.5, 7102.0, 7101.0]\nruntime_base_mb = 91.5\n")
    (config_dir / "profiles").mkdir(parents=True)
    (config_dir / "profiles" / "cal.toml").write_text(text)
    assert main(["estimate", str(REFERENCE_CONFIGS / "phi-2"), "--profile", "cal", "--json"]) == 0
    est = json.loads(capsys.readouterr().out)["estimate"]
    assert est["runtime_base_bytes"] == int(91.5 * MIB) and est["budget_bytes"] == 7000 * MIB
    assert est["base_source"].startswith("calibrated 2026-12-01") and "7,100 MiB" in est["budget_source"]
    assert main(["estimate", str(REFERENCE_CONFIGS / "phi-2"), "--json"]) == 0
    planning = json.loads(capsys.readouterr().out)["estimate"]
    assert planning["runtime_base_bytes"] == 200 * MIB and "not calibrated" in planning["base_source"]
    assert planning["peak_bytes"] - est["peak_bytes"] == int(200 * MIB) - int(91.5 * MIB)


# -- the profile schema stays strict ---------------------------------------------------------------

_GOOD = ('name = "x"\ndescription = "d"\nkind = "android"\nsoc = "s"\nabi = "arm64-v8a"\ntarget = "android"\n'
         'target_triple = "aarch64-linux-android"\ngpu_backend = "none"\nram_mb = 12288\nhard_limit_mb = 12288\n'
         "usable_budget_mb = 1400\nruntime_base_mb = 80\nmemory_bandwidth_gbps = 50\nbandwidth_efficiency = 0.5\n"
         "compute_gflops = 100\ncalibrated = true\n")
_CAL = '\n[calibration]\ndate = "2026-12-01"\nmethod = "m"\nceiling_mb = 1450\nceiling_runs_mb = [1450, 1451]\n'


@pytest.mark.parametrize(("edit", "needle"), [
    (lambda t: t + _CAL + "colour = 1\n", "unknown field 'colour'"),
    (lambda t: t + _CAL.replace("ceiling_mb = 1450", "ceiling_mb = -3"), "'ceiling_mb' must be a positive number"),
    (lambda t: t + _CAL.replace("[1450, 1451]", "[]"), "'ceiling_runs_mb' must be a list of positive numbers"),
    (lambda t: t + _CAL.replace('date = "2026-12-01"\n', ""), "lacks 'date'"),
    (lambda t: t + _CAL + 'harness = "adb"\n', "'harness' must be shell or app"),
    (lambda t: t + _CAL + "mem_available_before_mb = true\n", "must be a number >= 0"),
    (lambda t: t.replace("calibrated = true", "calibrated = false") + _CAL, "needs calibrated = true"),
    (lambda t: t.replace("usable_budget_mb = 1400", "usable_budget_mb = 1500") + _CAL, "above the calibrated ceiling"),
    (lambda t: t + "calibration = 3\n", "[calibration] must be a table"),
])
def test_calibration_table_is_validated(edit, needle: str, tmp_path: Path, capsys) -> None:
    path = tmp_path / "x.toml"
    path.write_text(_GOOD + _CAL)
    assert load_profile(path).calibration["ceiling_runs_mb"] == [1450, 1451]  # the good one loads
    path.write_text(edit(_GOOD))
    with pytest.raises(InputError, match=needle.replace("[", r"\[").replace("(", r"\(")):
        load_profile(path)
    rc, out, err = run_main(capsys, ["estimate", str(Path(__file__).parent / "data/reference_configs/phi-2"),
                                     "--profile", str(path)])
    assert_one_error_line(rc, out, err, 2, needle)


# -- bad input: one line, exit 2 ---------------------------------------------------------------------

def test_calibrate_bad_input(tmp_path: Path, config_dir: Path, capsys) -> None:
    rc, out, err = run_main(capsys, ["calibrate", "--device", "local"])
    assert_one_error_line(rc, out, err, 2, "give --device")
    phone = Phone(tmp_path / "sandbox")  # no budget: nothing but the host's OOM killer would stop the probe
    try:
        rc, out, err = run_main(capsys, ["calibrate", "--device", f"tcp:127.0.0.1:{phone.port}"])
        assert_one_error_line(rc, out, err, 2, "has no memory budget")
        rc, out, err = run_main(capsys, ["calibrate", "--device", f"tcp:127.0.0.1:{phone.port}", "--name", "../x"])
        assert_one_error_line(rc, out, err, 2, "profile name '../x' must be")
    finally:
        phone.stop()
    rc, out, err = run_main(capsys, ["calibrate", "--device", "tcp:127.0.0.1:1", "--hold-ms", "0"])
    assert_one_error_line(rc, out, err, 2, "--hold-ms")
    assert not (config_dir / "profiles").exists()  # nothing written


def test_calibrate_refuses_a_profile_file_without_toml(tmp_path: Path, config_dir: Path) -> None:
    from edgedeploy.calibrate import write_profile

    data = tomllib.loads(_GOOD + _CAL)
    with pytest.raises(InputError, match="must end in .toml"):
        write_profile(data, tmp_path / "x.txt")
    data["calibration"]["ceiling_mb"] = "big"
    with pytest.raises(InputError, match="'ceiling_mb' must be a positive number"):
        write_profile(data)  # validated before anything is written
    assert not (config_dir / "profiles").exists()
    del data["calibration"]["ceiling_mb"]
    data["calibration"]["ceiling_mb"] = 1450.0
    path = write_profile(data)
    assert load_profile("x").calibration["ceiling_mb"] == 1450.0 and path.parent == config_dir / "profiles"


# -- the runners report their base before weights ----------------------------------------------------

def test_runners_report_rss_before_weights(host_bundle: Path, host_runner_build, tmp_path: Path) -> None:  # noqa: F811
    """Both runners print base_rss_bytes (RSS before the weights load), below their peak."""
    import subprocess

    from edgedeploy.runtime import native
    from edgedeploy.runtime.launch import parse_result, run_local

    py = run_local(host_bundle, [1, 2, 3], 2)
    assert 40 * MIB < py["base_rss_bytes"] <= py["peak_rss_bytes"]
    prompt = tmp_path / "prompt.json"
    prompt.write_text(json.dumps({"token_ids": [1, 2, 3], "max_new_tokens": 2}))
    proc = subprocess.run(native.runner_command(host_runner_build.runner, host_bundle, prompt), capture_output=True,
                          text=True, timeout=120)
    nat = parse_result(proc.stdout, proc.returncode, proc.stderr)
    assert nat["runner"] == "native" and 1 * MIB < nat["base_rss_bytes"] <= nat["peak_rss_bytes"]
    assert nat["token_ids"] == py["token_ids"]


def test_calibrate_arm64_virtual_phone_runs_the_aarch64_probe_under_qemu(tmp_path: Path) -> None:
    """An arm64-v8a virtual phone: the probe is cross-built (static, aarch64) and started through the phone's
    exec wrapper (qemu-user); the ceiling still lands within 2% of the budget."""
    import shutil

    from edgedeploy.calibrate import calibrate

    for tool, pkg in (("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu"), ("qemu-aarch64", "qemu-user")):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (Debian package {pkg})")
    phone = Phone(tmp_path / "sandbox", "--budget-mb", "400", "--abi", "arm64-v8a")
    try:
        dev = AdbTcpDevice(phone.serial)
        done = calibrate(dev, load_profile("reference-12gb"), "arm", runtime_base=False, bandwidth=False)
        dev.close()
    finally:
        phone.stop()
    cal = done["profile"]["calibration"]
    assert "aarch64 build" in cal["method"] and cal["measured"] == ["ceiling"]
    assert abs(cal["ceiling_mb"] / 400 - 1) <= 0.02 and "runtime_base_mb" not in cal
    assert done["profile"]["runtime_base_mb"] == 200  # not measured: the base profile's figure stays
