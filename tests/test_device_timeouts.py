"""A slow command or run ends the same way on every backend: exit 124, the transport still usable,
and a profile that records the timed-out run as a FAIL with the figures it had, instead of aborting."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgedeploy.cli import main
from edgedeploy.devices.adb import AdbServerDevice, AdbTcpDevice
from edgedeploy.devices.base import TIMEOUT_EXIT, Device
from edgedeploy.devices.local import LocalDevice

from .test_virtual_phone import ADB, AdbServer, Phone


@pytest.fixture
def phone(tmp_path: Path) -> Iterator[Phone]:
    p = Phone(tmp_path / "sandbox")
    yield p
    p.stop()


@pytest.fixture(params=["local", "tcp", "adb-server"])
def device(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Device]:
    if request.param == "local":
        with LocalDevice(tmp_path / "host") as dev:
            yield dev
        return
    phone = request.getfixturevalue("phone")
    if request.param == "tcp":
        with AdbTcpDevice(f"127.0.0.1:{phone.port}") as dev:
            yield dev
        return
    if ADB is None:
        pytest.skip("Debian's adb is not installed (package adb; CI installs it)")
    server = AdbServer(tmp_path / "adb-home")
    try:
        server.connect(phone.serial)
        with AdbServerDevice(phone.serial, server=f"127.0.0.1:{server.port}") as dev:
            yield dev
    finally:
        server.adb("kill-server")


def test_every_backend_reports_a_timeout_as_124_and_stays_usable(device: Device) -> None:
    t0 = time.monotonic()
    r = device.shell("sleep 20", timeout=1.5)
    assert r.exit_code == TIMEOUT_EXIT
    assert time.monotonic() - t0 < 15
    after = device.run_args(["echo", "still here"])
    assert (after.exit_code, after.stdout.strip()) == (0, "still here")


def test_profile_records_a_timed_out_run_as_fail_with_partial_figures(host_bundle: Path, phone: Phone,
                                                                      tmp_path: Path, capsys) -> None:
    out = tmp_path / "report"
    # The runner needs ~0.7 s to import TVM and load: 0.2 s ends every run mid-way.
    rc = main(["profile", str(host_bundle), "--device", f"tcp:127.0.0.1:{phone.port}", "--out", str(out),
               "--prompts", "chat-short", "--runs", "2", "--warmup", "0", "--timeout", "0.2"])
    assert rc == 1, capsys.readouterr().err
    model = json.loads((out / "results.json").read_text())["models"][0]
    assert model["verdict"] == "FAIL"
    checks = {c["name"]: c for c in model["checks"]}
    assert checks["run"]["status"] == "FAIL" and "timed out after 0.2 s" in checks["run"]["message"]
    run = model["prompts"][0]["runs"][0]
    assert run["timed_out"] is True and run["exit_code"] == TIMEOUT_EXIT
    assert run["timeline"] and run["last_rss_bytes"] > 0  # the samples taken before the end are kept
    assert len(model["prompts"][0]["runs"]) == 1  # the next run would time out the same way
    assert "timed out" in (out / "report.md").read_text()
