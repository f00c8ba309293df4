"""Confinement of the virtual phone's sync service and its own files to the sandbox, under attack.

Each test starts its own daemon subprocess (``Phone``: ephemeral loopback port, stopped by pid) and drives it
with a real client (adb-shell; Debian ``adb`` where installed). "Outside" is a folder of ``tmp_path`` beside
the sandbox, standing in for the host.
"""

from __future__ import annotations

import ctypes
import io
import os
import select
import shlex
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from edgedeploy.devices.virtual_phone import VirtualPhone
from tests.test_virtual_phone import AdbServer, Phone, needs_adb
from tests.test_virtual_phone_faults import _device

RACE_ITERATIONS = 1500  # push+pull pairs per race test, at most
RACE_SECONDS = 6.0  # and at most this long
SWAPPER_SECONDS = 20.0  # the swapper stops by itself after this, whatever happens to the test

# Swaps two names atomically (renameat2 RENAME_EXCHANGE) in a tight loop, in its own process so that the GIL
# does not pace it against the client. It counts swaps, and iterations where `watch` (the outside folder) held
# anything but what it started with. Stops on a line (or EOF) on stdin, or after its time limit.
_SWAPPER = r"""
import ctypes, os, select, sys, time
a, b, watch, limit = os.fsencode(sys.argv[1]), os.fsencode(sys.argv[2]), sys.argv[3], float(sys.argv[4])
libc = ctypes.CDLL(None, use_errno=True)
baseline = sorted(os.listdir(watch))
swaps = leaks = 0
deadline = time.monotonic() + limit
print("ready", flush=True)
while time.monotonic() < deadline:
    if libc.renameat2(-100, a, -100, b, 2) != 0:
        raise OSError(ctypes.get_errno(), "renameat2")
    swaps += 1
    if sorted(os.listdir(watch)) != baseline:
        leaks += 1
    if swaps % 128 == 0 and select.select([sys.stdin], [], [], 0)[0]:
        break
print(swaps, leaks, flush=True)
"""


def _has_rename_exchange() -> bool:
    return hasattr(ctypes.CDLL(None), "renameat2")


class Swapper:
    """The swapper process: started with ``a`` and ``b`` to exchange, stopped by pid."""

    def __init__(self, a: Path, b: Path, watch: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SWAPPER, str(a), str(b), str(watch), str(SWAPPER_SECONDS)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        ready, _, _ = select.select([self.proc.stdout], [], [], 30)
        if not (ready and self.proc.stdout.readline() == "ready\n"):  # type: ignore[union-attr]
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError("the swapper did not start")

    def stop(self) -> tuple[int, int]:
        """Stop it; returns (swaps, iterations that saw something new outside)."""
        try:
            out, _ = self.proc.communicate("stop\n", timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        assert self.proc.returncode == 0, out
        swaps, leaks = out.split()
        return int(swaps), int(leaks)


def _race(dev: Any) -> dict[str, int]:
    """Push new files into, and pull a file that only `outside` has through, /data/local/tmp/race."""
    from adb_shell.exceptions import AdbCommandFailureException, PushFailedError

    counts = dict.fromkeys(("pushed", "push_refused", "pulled", "pull_refused"), 0)
    deadline = time.monotonic() + RACE_SECONDS
    for i in range(RACE_ITERATIONS):
        if time.monotonic() > deadline:
            break
        try:
            dev.push(io.BytesIO(b"planted"), f"/data/local/tmp/race/f{i}", read_timeout_s=10)
            counts["pushed"] += 1
        except PushFailedError:
            counts["push_refused"] += 1
        try:
            dev.pull("/data/local/tmp/race/secret", io.BytesIO(), read_timeout_s=10)
            counts["pulled"] += 1
        except AdbCommandFailureException:
            counts["pull_refused"] += 1
    return counts


@pytest.mark.skipif(not _has_rename_exchange(), reason="the C library has no renameat2 (atomic exchange)")
@pytest.mark.parametrize("inside_kind", ["directory", "in-sandbox symlink"])
def test_component_swapped_for_outside_symlink_never_escapes(tmp_path: Path, inside_kind: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("host secret")
    p = Phone(tmp_path / "sb")
    # /data/local/tmp/race flips between a safe state and a symlink to `outside`; race_alt holds the other one.
    if inside_kind == "directory":
        (p.tmp / "race").mkdir()  # the directory itself moves between the two names
    else:
        (p.tmp / "real").mkdir()
        (p.tmp / "race").symlink_to("real")  # relative, inside: followed by the phone
    (p.tmp / "race_alt").symlink_to(outside)
    swapper = None
    try:
        dev = _device(p.port)
        try:
            swapper = Swapper(p.tmp / "race", p.tmp / "race_alt", outside)
            counts = _race(dev)
        finally:
            dev.close()
    finally:
        swaps, leaks = swapper.stop() if swapper else (0, 0)
        p.stop()
    # The race was real: many swaps, and the phone met both states (some pushes went in, some were refused).
    assert swaps > 1000, swaps
    assert counts["pushed"] > 0 and counts["push_refused"] > 0, counts
    # And it never escaped: nothing appeared outside at any time, nothing was read from there.
    assert leaks == 0 and sorted(os.listdir(outside)) == ["secret"], os.listdir(outside)
    assert (outside / "secret").read_text() == "host secret"
    assert counts["pulled"] == 0, counts
    # Every push that went through is in the sandbox's real folder (whichever name it has now).
    homes = [d for d in (p.tmp / "race", p.tmp / "race_alt", p.tmp / "real") if d.is_dir() and not d.is_symlink()]
    assert len(homes) == 1 and len(list(homes[0].glob("f*"))) == counts["pushed"]


def test_push_over_hard_link_to_host_file_is_refused(tmp_path: Path) -> None:
    from adb_shell.exceptions import PushFailedError

    host_file = tmp_path / "host.txt"
    host_file.write_text("host data")
    p = Phone(tmp_path / "sb")
    try:
        dev = _device(p.port)
        try:
            out = dev.shell(f"ln {shlex.quote(str(host_file))} /data/local/tmp/hl && echo linked")
            assert out == "linked\n" and (p.tmp / "hl").stat().st_nlink == 2
            with pytest.raises(PushFailedError, match="hard links"):
                dev.push(io.BytesIO(b"overwritten"), "/data/local/tmp/hl")
            dev.push(io.BytesIO(b"fine"), "/data/local/tmp/plain")  # the connection still works
        finally:
            dev.close()
    finally:
        p.stop()
    assert host_file.read_text() == "host data"
    assert (p.tmp / "hl").stat().st_nlink == 2  # left as it was, not replaced either
    assert (p.tmp / "plain").read_bytes() == b"fine"


@needs_adb
def test_debian_adb_push_over_hard_link_is_refused(tmp_path: Path) -> None:
    host_file = tmp_path / "host.txt"
    host_file.write_text("host data")
    (tmp_path / "evil.txt").write_text("overwritten")
    p = Phone(tmp_path / "sb")
    server = AdbServer(tmp_path / "adbhome")
    try:
        server.connect(p.serial)
        r = server.adb("-s", p.serial, "shell", f"ln {shlex.quote(str(host_file))} /data/local/tmp/hl")
        assert r.returncode == 0, r.stderr
        r = server.adb("-s", p.serial, "push", str(tmp_path / "evil.txt"), "/data/local/tmp/hl")
        assert r.returncode != 0 and "hard links" in r.stdout + r.stderr, r.stdout + r.stderr
    finally:
        server.stop()
        p.stop()
    assert host_file.read_text() == "host data"


def test_symlinks_inside_followed_outside_refused(tmp_path: Path) -> None:
    from adb_shell.exceptions import AdbCommandFailureException, PushFailedError

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("host file")
    p = Phone(tmp_path / "sb")
    try:
        dev = _device(p.port)
        try:
            # Links as a phone user makes them: relative, and absolute device paths (rewritten by the shell).
            q = shlex.quote(str(outside))
            dev.shell(f"cd /data/local/tmp && mkdir real && ln -s real rel && ln -s /data/local/tmp/real abs "
                      f"&& ln -s {q} out && ln -s {q}/victim final && ln -s loop loop")
            dev.push(io.BytesIO(b"via rel"), "/data/local/tmp/rel/a")
            dev.push(io.BytesIO(b"via abs"), "/data/local/tmp/abs/sub/b")  # parents made through the link
            assert (p.tmp / "real/a").read_bytes() == b"via rel" and (p.tmp / "real/sub/b").read_bytes() == b"via abs"
            back = io.BytesIO()
            dev.pull("/data/local/tmp/abs/a", back)
            assert back.getvalue() == b"via rel"
            assert dev.stat("/data/local/tmp/rel/a")[1] == 7
            assert sorted(f.filename for f in dev.list("/data/local/tmp/abs")) == [b"a", b"sub"]
            # Out of the sandbox: refused for every sync request.
            with pytest.raises(PushFailedError, match="leaves the sandbox"):
                dev.push(io.BytesIO(b"x"), "/data/local/tmp/out/planted")
            with pytest.raises(AdbCommandFailureException, match="leaves the sandbox"):
                dev.pull("/data/local/tmp/out/victim", io.BytesIO())
            with pytest.raises(AdbCommandFailureException, match="leaves the sandbox"):
                dev.pull("/data/local/tmp/final", io.BytesIO())
            assert dev.stat("/data/local/tmp/out/victim") == (0, 0, 0)
            assert list(dev.list("/data/local/tmp/out")) == []
            with pytest.raises(AdbCommandFailureException, match="symbolic links"):
                dev.pull("/data/local/tmp/loop", io.BytesIO())
            # A push to a link replaces the link itself (as adbd does); it never writes through it.
            dev.push(io.BytesIO(b"new file"), "/data/local/tmp/final")
        finally:
            dev.close()
    finally:
        p.stop()
    assert os.listdir(outside) == ["victim"] and (outside / "victim").read_text() == "host file"
    assert stat.S_ISREG(os.lstat(p.tmp / "final").st_mode) and (p.tmp / "final").read_bytes() == b"new file"


def test_phone_files_are_not_written_through_planted_links(tmp_path: Path) -> None:
    """A reused sandbox whose getprop, build.prop and logcat were replaced by links to host files: setting the
    phone up again and logging a kill must leave the host files alone."""
    sandbox = tmp_path / "sb"
    VirtualPhone(sandbox, 0)
    host = {name: tmp_path / f"host-{name}" for name in ("getprop", "build.prop", "logcat")}
    for f in host.values():
        f.write_text("host data\n")
    (sandbox / "system/bin/getprop").unlink()
    (sandbox / "system/bin/getprop").symlink_to(host["getprop"])
    (sandbox / "system/build.prop").unlink()
    os.link(host["build.prop"], sandbox / "system/build.prop")
    logcat = sandbox / "data/misc/logd/logcat.txt"
    logcat.unlink()
    logcat.symlink_to(host["logcat"])

    vp = VirtualPhone(sandbox, 0, memory_budget_bytes=1 << 20)
    assert all(f.read_text() == "host data\n" for f in host.values())
    for name in ("system/bin/getprop", "system/build.prop", "data/misc/logd/logcat.txt"):
        st = os.lstat(sandbox / name)
        assert stat.S_ISREG(st.st_mode) and st.st_nlink == 1, name
    # Replaced again after setup (a phone user can do this at any time): the kill is not logged outside.
    logcat.unlink()
    logcat.symlink_to(host["logcat"])
    vp._log_kill("hog", 1234, 5 << 20)
    assert host["logcat"].read_text() == "host data\n"
    logcat.unlink()
    vp._log_kill("hog", 1234, 5 << 20)  # a missing log is created, inside
    assert "Kill 'hog' (1234)" in logcat.read_text()
