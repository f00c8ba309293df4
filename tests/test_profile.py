"""Profiling over ADB against the virtual phone: end to end, faults, quoting, report formats."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest

from edgedeploy.cli import main
from edgedeploy.devices.adb import AdbTcpDevice
from edgedeploy.profile.push import push_bundle

from .test_virtual_phone import ADB, AdbServer, Phone

PROPS = ["--prop", "ro.product.model=Reference 12GB", "--prop", "ro.build.version.release=14"]
FAST = ["--prompts", "chat-short", "--runs", "2", "--warmup", "0"]


@pytest.fixture
def phone(tmp_path: Path):
    p = Phone(tmp_path / "sandbox", *PROPS)
    yield p
    p.stop()


def _leftovers(phone: Phone) -> list[str]:
    root = phone.tmp / "edgedeploy"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_profile_virtual_phone_pass(host_bundle: Path, phone: Phone, tmp_path: Path, capsys) -> None:
    out = tmp_path / "report"
    rc = main(["profile", str(host_bundle), "--device", f"tcp:127.0.0.1:{phone.port}", "--out", str(out),
               "--prompts", "chat-short", "doc-1k", "--runs", "2", "--warmup", "1"])
    assert rc == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert results["schema_version"] == 1 and results["verdict"] == "PASS"
    model = results["models"][0]
    assert {c["name"]: c["status"] for c in model["checks"]} == {
        "rule-check": "PASS", "run": "PASS", "memory-fit": "PASS", "parity": "PASS"}
    assert model["device"]["model"] == "Reference 12GB" and model["device"]["android_release"] == "14"
    doc = model["prompts"][1]
    assert doc["name"] == "doc-1k" and doc["clipped_from"] == 1024  # the tiny bundle's window is 128
    assert len(doc["runs"]) == 2 and len(doc["warmup"]) == 1
    assert doc["summary"]["decode_tok_s"]["n"] == 2
    run = doc["runs"][0]
    assert run["peak_rss_bytes"] >= max(s["rss_bytes"] for s in run["timeline"]) > 0
    touched = [r["kv_touched"] for p in model["prompts"] for r in p["warmup"] + p["runs"]]
    assert touched == [True] + [False] * (len(touched) - 1)  # the first run of the model writes the KV cache
    assert model["measured_peak_bytes"] == max(r["peak_rss_bytes"] for p in model["prompts"]
                                               for r in p["runs"] + p["warmup"])
    assert model["estimate"]["peak_bytes"] > 0 and model["peak_error_pct"] is not None
    junit = ET.parse(out / "report.junit.xml").getroot()
    cases = junit.findall(".//testcase")
    assert len(cases) == 4 and not junit.findall(".//failure")
    assert "PASS" in (out / "report.md").read_text() and "<html>" in (out / "report.html").read_text()
    # No --threads: the runner chose one thread per CPU it may use, and the report says so.
    assert all(r["threads_default"] and r["threads"] == len(r["cpus"]) for r in doc["runs"])
    report = (out / "report.md").read_text()
    assert f"| threads | {doc['runs'][0]['threads']} (default: one per CPU it may use" in report
    assert _leftovers(phone) == []  # bundle and run files removed without --keep


def test_budget_too_small_fails_with_kill_reason(host_bundle: Path, tmp_path: Path, capsys) -> None:
    phone = Phone(tmp_path / "sandbox", "--budget-mb", "40", *PROPS)
    try:
        out = tmp_path / "report"
        rc = main(["profile", str(host_bundle), "--device", f"tcp:127.0.0.1:{phone.port}", "--out", str(out), *FAST])
    finally:
        phone.stop()
    assert rc == 1
    model = json.loads((out / "results.json").read_text())["models"][0]
    assert model["verdict"] == "FAIL"
    reasons = " ".join(model["reasons"])
    assert "killed at" in reasons and "exit 137" in reasons and "lowmemorykiller" in reasons
    run = model["prompts"][0]["warmup"] + model["prompts"][0]["runs"]
    killed = run[0]["killed"]
    # lmkd names the runner itself (not its shell), and the runner had loaded TVM when it died.
    assert killed["lmkd"]["pid"] == run[0]["device_pid"]
    assert 20 * 2**20 < killed["killed_at_bytes"] < 200 * 2**20
    failures = ET.parse(out / "report.junit.xml").getroot().findall(".//failure")
    assert {f.get("message").split(" ")[0] for f in failures} >= {"runner", "killed"}


@pytest.mark.skipif(ADB is None, reason="Debian adb is not installed")
def test_profile_through_adb_server_and_unknown_serial(host_bundle: Path, phone: Phone, tmp_path: Path,
                                                      capsys) -> None:
    server = AdbServer(tmp_path / "adbhome")
    try:
        server_addr = f"127.0.0.1:{server.port}"
        rc = main(["profile", str(host_bundle), "--device", phone.serial, "--adb-server", server_addr,
                   "--out", str(tmp_path / "r"), *FAST])
        assert rc == 0, capsys.readouterr().err
        assert json.loads((tmp_path / "r" / "results.json").read_text())["device"]["backend"] == "adb"
        capsys.readouterr()
        rc = main(["profile", str(host_bundle), "--device", "no-such-phone", "--adb-server", server_addr])
        err = capsys.readouterr().err
        assert rc == 2 and "'no-such-phone' not found" in err and phone.serial in err
    finally:
        server.stop()


def test_unreachable_and_unauthorized_devices(host_bundle: Path, tmp_path: Path, capsys,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from adb_shell.auth.keygen import keygen

    rc = main(["profile", str(host_bundle), "--device", "tcp:127.0.0.1:1"])
    assert rc == 2 and "cannot connect to tcp:127.0.0.1:1" in capsys.readouterr().err
    keygen(str(tmp_path / "theirkey"))
    (tmp_path / "adb_keys").write_text((tmp_path / "theirkey.pub").read_text())
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # we have no key the phone accepts
    phone = Phone(tmp_path / "sandbox", "--auth-keys", str(tmp_path / "adb_keys"))
    try:
        rc = main(["profile", str(host_bundle), "--device", f"tcp:127.0.0.1:{phone.port}"])
    finally:
        phone.stop()
    assert rc == 2 and "unauthorized" in capsys.readouterr().err


def test_dropped_connection_resumes_and_next_push_sends_nothing(host_bundle: Path, tmp_path: Path) -> None:
    phone = Phone(tmp_path / "sandbox", "--drop-after-bytes", "400000")
    try:
        # A short read timeout: adb-shell notices a cut connection only when a read times out.
        dev = AdbTcpDevice(f"127.0.0.1:{phone.port}", timeout=3)
        first = push_bundle(dev, host_bundle, "/data/local/tmp/edgedeploy/bundles/b")
        assert first.retries >= 1 and first.verified_on_device
        manifest = json.loads((host_bundle / "bundle.json").read_text())
        for rel, meta in manifest["files"].items():
            assert dev.sha256(f"/data/local/tmp/edgedeploy/bundles/b/{rel}") == meta["sha256"]
        assert not list((phone.tmp / "edgedeploy/bundles/b").glob("*.part"))
        second = push_bundle(dev, host_bundle, "/data/local/tmp/edgedeploy/bundles/b")
        assert second.files_sent == 0 and second.files_skipped == first.files_sent + first.files_skipped
        dev.close()
    finally:
        phone.stop()


def test_device_disk_full_is_a_clear_error(host_bundle: Path, tmp_path: Path, capsys) -> None:
    phone = Phone(tmp_path / "sandbox", "--disk-mb", "0.2")
    try:
        rc = main(["profile", str(host_bundle), "--device", f"tcp:127.0.0.1:{phone.port}", *FAST])
    finally:
        phone.stop()
    err = capsys.readouterr().err
    assert rc == 2 and "storage is full" in err and "Traceback" not in err


def test_hostile_names_are_never_executed(host_bundle: Path, phone: Phone, tmp_path: Path, capsys) -> None:
    evil = tmp_path / "m; touch PWNED1 $(touch PWNED2) `touch PWNED3`"
    shutil.copytree(host_bundle, evil)
    prompt = tmp_path / "p; rm -rf $(touch PWNED4).json"
    prompt.write_text(json.dumps({"name": "x; touch PWNED5", "text": "hello there", "max_new_tokens": 4}))
    rc = main(["profile", str(evil), "--device", f"tcp:127.0.0.1:{phone.port}", "--prompts", str(prompt),
               "--runs", "1", "--warmup", "0", "--out", str(tmp_path / "r")])
    assert rc == 0, capsys.readouterr().err
    for root in (phone.sandbox, tmp_path, Path.cwd()):
        assert not [p for p in root.rglob("PWNED*")], root


def test_bad_prompt_file_exit_2(host_bundle: Path, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"text": "unterminated')
    assert main(["profile", str(host_bundle), "--prompts", str(bad)]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_local_profile_and_report_rerender(host_bundle: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "local"
    assert main(["profile", str(host_bundle), "--out", str(out), *FAST]) == 0
    capsys.readouterr()
    assert main(["report", str(out / "results.json"), "--format", "junit"]) == 0
    root = ET.fromstring(capsys.readouterr().out)
    assert [c.get("name") for c in root.iter("testcase")] == ["rule-check", "run", "memory-fit", "parity"]
    assert main(["report", str(out / "results.json"), "--format", "md"]) == 0
    assert "| memory-fit | PASS |" in capsys.readouterr().out
    (tmp_path / "junk.json").write_text("[]")
    assert main(["report", str(tmp_path / "junk.json")]) == 2


def test_lmkd_line_is_matched_by_pid_and_time() -> None:
    from edgedeploy.profile.session import lmkd_kill

    line = "11-29 01:{} I lowmemorykiller: Kill '{}' ({}), uid 2000, oom_score_adj 0 to free {}kB rss, 0kB swap"
    log = "\n".join([line.format("09:54.062", "old", 100, 10), line.format("10:54.062", "runner", 200, 20),
                     line.format("10:55.062", "other", 300, 30)])
    assert lmkd_kill(log, 200, "11-29 01:10:00")["freed_bytes"] == 20 * 1024
    assert lmkd_kill(log, None, "11-29 01:10:00")["process"] == "other"  # no pid: the newest kill
    assert lmkd_kill(log, 100, "11-29 01:10:00")["pid"] == 300  # an earlier run's kill is never blamed
    assert lmkd_kill(log, 1, "11-29 02:00:00") is None


def test_virtual_phone_cli_serves_the_profile(tmp_path: Path) -> None:
    """`edgedeploy virtual-phone --profile reference-12gb`: the phone states the profile's model and RAM."""
    from edgedeploy.devices.virtual_phone_process import VirtualPhoneProcess

    with VirtualPhoneProcess(tmp_path / "sandbox", profile="reference-12gb") as phone:
        dev = AdbTcpDevice(f"127.0.0.1:{phone.port}")
        facts = dev.facts()
        dev.close()
    assert facts.model == "Reference 12GB" and facts.soc == "SM8650"
    assert facts.mem_total_bytes == 12288 * 2**20
    assert facts.props["ro.edgedeploy.profile"] == "reference-12gb"


def test_gpu_memory_from_dumpsys_counts_in_the_peak(host_bundle: Path, phone: Phone, tmp_path: Path) -> None:
    """On Adreno, OpenCL buffers are outside RSS; dumpsys meminfo's GL mtrack row counts them."""
    dumpsys = phone.sandbox / "system/bin/dumpsys"
    dumpsys.write_text("#!/bin/sh\necho ' GL mtrack    51200    51200        0        0'\necho ' Graphics:    51200'\n")
    dumpsys.chmod(0o755)
    out = tmp_path / "r"
    assert main(["profile", str(host_bundle), "--device", f"tcp:127.0.0.1:{phone.port}", "--out", str(out),
                 *FAST]) == 0
    model = json.loads((out / "results.json").read_text())["models"][0]
    runs = model["prompts"][0]["runs"]
    assert all(r["gpu_peak_bytes"] == 50 * 2**20 for r in runs)
    assert model["measured_peak_bytes"] == max(r["peak_rss_bytes"] for r in runs) + 50 * 2**20
    assert "| GPU memory (GL mtrack) | 50.0 MiB |" in (out / "report.md").read_text()
