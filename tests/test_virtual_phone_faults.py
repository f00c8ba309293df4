"""Fault injection and limits of the virtual phone: push quota, a connection cut mid-push, ABI and props.

Each test starts its own daemon subprocess (``Phone``: ephemeral port outside 5555-5585, stopped by pid).
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path
from typing import Any

import pytest

from edgedeploy.devices.virtual_phone import HOST_ABIS, VirtualPhone
from tests.test_virtual_phone import AdbServer, Phone, _sha256, _write_random, needs_adb

MB = 1 << 20


def _device(port: int, timeout: float = 10) -> Any:
    from adb_shell.adb_device import AdbDeviceTcp

    dev = AdbDeviceTcp("127.0.0.1", port, default_transport_timeout_s=timeout)
    assert dev.connect(auth_timeout_s=2)
    return dev


def test_disk_quota_fails_push_with_enospc_and_removes_file(tmp_path: Path) -> None:
    from adb_shell.exceptions import PushFailedError

    big, small = tmp_path / "big.bin", tmp_path / "small.bin"
    _write_random(big, 6)
    digest = _write_random(small, 1)
    p = Phone(tmp_path / "sb", "--disk-mb", "4")
    try:
        dev = _device(p.port)
        try:
            with pytest.raises(PushFailedError, match="No space left on device"):
                dev.push(str(big), "/data/local/tmp/big.bin")
            assert not (p.tmp / "big.bin").exists()
            dev.push(str(small), "/data/local/tmp/small.bin")  # the connection is still usable after FAIL
            assert _sha256(p.tmp / "small.bin") == digest
            # Shell writes are not refused, but they count against later pushes.
            assert dev.shell("head -c 3500000 /dev/zero > /sdcard/fill && echo ok") == "ok\n"
            with pytest.raises(PushFailedError, match="No space left on device"):
                dev.push(str(small), "/data/local/tmp/small2.bin")
        finally:
            dev.close()
    finally:
        p.stop()


@needs_adb
def test_disk_quota_message_through_debian_adb(tmp_path: Path) -> None:
    _write_random(tmp_path / "big.bin", 3)
    p = Phone(tmp_path / "sb", "--disk-mb", "1")
    server = AdbServer(tmp_path / "adbhome")
    try:
        server.connect(p.serial)
        r = server.adb("-s", p.serial, "push", str(tmp_path / "big.bin"), "/data/local/tmp/big.bin")
        out = r.stdout + r.stderr  # adb 29 prints the error on stdout when it is not a terminal
        assert r.returncode != 0
        assert "adb: error: failed to copy" in out and "remote No space left on device" in out, out
        assert not (p.tmp / "big.bin").exists()
    finally:
        server.stop()
        p.stop()


def test_drop_after_bytes_cuts_one_push_then_retry_succeeds(tmp_path: Path) -> None:
    src = tmp_path / "model.bin"
    digest = _write_random(src, 20)
    p = Phone(tmp_path / "sb", "--drop-after-bytes", str(5 * MB))
    try:
        dev = _device(p.port)
        try:
            # adb-shell surfaces a cut link as a socket error or as a read timeout on the dead connection.
            from adb_shell.exceptions import AdbConnectionError, TcpTimeoutException

            with pytest.raises((OSError, AdbConnectionError, TcpTimeoutException)):
                dev.push(str(src), "/data/local/tmp/m/model.bin")
        finally:
            dev.close()
        assert (p.tmp / "m/model.bin").stat().st_size == 5 * MB  # what arrived before the cut stays
        dev = _device(p.port)
        try:
            dev.push(str(src), "/data/local/tmp/m/model.bin")
            assert dev.shell("sha256sum /data/local/tmp/m/model.bin").split()[0] == digest
        finally:
            dev.close()
    finally:
        p.stop()


def test_abi_and_edgedeploy_props(tmp_path: Path) -> None:
    p = Phone(tmp_path / "sb", "--abi", "arm64-v8a")
    try:
        dev = _device(p.port)
        try:
            out = dev.shell("getprop ro.product.cpu.abi; getprop ro.edgedeploy.python; getprop ro.edgedeploy.virtual")
            assert out.splitlines() == ["arm64-v8a", sys.executable, "1"]
        finally:
            dev.close()
    finally:
        p.stop()


def test_abi_defaults_to_host_and_props_win(tmp_path: Path) -> None:
    host = VirtualPhone(tmp_path / "a", 0)
    expected = HOST_ABIS.get(platform.machine().lower(), platform.machine().lower())
    assert host.abi == host.props["ro.product.cpu.abi"] == host.props["ro.product.cpu.abilist"] == expected
    assert host.props["ro.edgedeploy.python"] == sys.executable
    props = {"ro.product.cpu.abi": "x86", "ro.edgedeploy.python": "/opt/py", "ro.edgedeploy.virtual": "0"}
    vp = VirtualPhone(tmp_path / "b", 0, props, abi="arm64-v8a")
    assert (vp.abi, vp.props["ro.edgedeploy.python"], vp.props["ro.edgedeploy.virtual"]) == ("x86", "/opt/py", "0")
    assert "ro.product.cpu.abi=x86\n" in (vp.root / "system/build.prop").read_text()
