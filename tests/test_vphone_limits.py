"""Limits of the virtual phone: what one misbehaving client can do to the daemon, and bad options.

A raw socket peer speaks the ADB transport where real clients cannot misbehave on purpose (flooding WRTEs,
stalling mid-packet); adb-shell is the well-behaved client. Each test starts its own daemon subprocess
(``Phone``: ephemeral loopback port, stopped by pid).
"""

from __future__ import annotations

import io
import os
import random
import re
import select
import socket
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgedeploy.devices.virtual_phone import VirtualPhone, load_auth_keys
from edgedeploy.errors import InputError
from tests.test_virtual_phone import REPO_ROOT, Phone
from tests.test_virtual_phone_faults import _device

MB = 1 << 20
FLOOD_BYTES = 256 * MB  # what the flooding peer sends at most
RSS_GROWTH_LIMIT = 64 * MB


def _wire(name: bytes) -> int:
    return struct.unpack("<I", name)[0]


CNXN, OPEN, OKAY, CLSE, WRTE = map(_wire, (b"CNXN", b"OPEN", b"OKAY", b"CLSE", b"WRTE"))
HEADER = struct.Struct("<6I")


class RawPeer:
    """A host-side ADB peer on a plain socket: it sends exactly what a test tells it to, nothing else."""

    def __init__(self, port: int, timeout: float = 10) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)

    @staticmethod
    def packet(cmd: int, arg0: int, arg1: int, data: bytes = b"") -> bytes:
        return HEADER.pack(cmd, arg0, arg1, len(data), sum(data) & 0xFFFFFFFF, cmd ^ 0xFFFFFFFF) + data

    def send(self, cmd: int, arg0: int, arg1: int, data: bytes = b"") -> None:
        self.sock.sendall(self.packet(cmd, arg0, arg1, data))

    def _recv_exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionResetError("closed by the phone")
            data += chunk
        return data

    def recv(self) -> tuple[int, int, int, bytes]:
        cmd, arg0, arg1, length, _, _ = HEADER.unpack(self._recv_exactly(HEADER.size))
        return cmd, arg0, arg1, self._recv_exactly(length)

    def handshake(self) -> None:
        self.send(CNXN, 0x01000000, MB, b"host::\0")
        assert self.recv()[0] == CNXN

    def open(self, local_id: int, service: bytes) -> int:
        """OPEN a service; the phone's stream id (or 0 if it answered CLSE)."""
        self.send(OPEN, local_id, 0, service + b"\0")
        cmd, remote, _, _ = self.recv()
        return remote if cmd == OKAY else 0

    def closed_by_phone(self, within: float) -> bool:
        """Whether the phone closes the connection within ``within`` seconds (data before the close is read)."""
        self.sock.settimeout(within)
        try:
            while self.sock.recv(65536):
                pass
            return True
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()


def _status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


# -- flow control and memory -------------------------------------------------------------------------------
@pytest.mark.parametrize("service, first", [
    (b"sync:", struct.pack("<4sI", b"STAT", 15) + b"/data/local/tmp"),  # then waits for an OKAY that never comes
    (b"exec:sleep 30", b""),  # never reads its stdin
], ids=["sync-stat-unacked", "exec-stdin-unread"])  # fmt: skip
def test_flood_ignoring_flow_control_is_cut_with_bounded_memory(tmp_path: Path, service: bytes, first: bytes) -> None:
    p = Phone(tmp_path / "sb")
    peer = RawPeer(p.port)
    try:
        peer.handshake()
        remote = peer.open(1, service)
        assert remote
        if first:
            peer.send(WRTE, 1, remote, first)
        assert p.proc is not None
        rss_before = _status_kb(p.proc.pid, "VmRSS") * 1024
        flood = RawPeer.packet(WRTE, 1, remote, bytes(MB))
        sent, cut = 0, False
        deadline = time.monotonic() + 30
        try:
            while sent < FLOOD_BYTES and time.monotonic() < deadline:
                peer.sock.sendall(flood)  # never reading: no OKAY is awaited
                sent += MB
        except (BrokenPipeError, ConnectionResetError):
            cut = True
        except TimeoutError:
            pass  # the phone stopped reading without closing: asserted below
        closed = cut or peer.closed_by_phone(within=10)
        growth = _status_kb(p.proc.pid, "VmHWM") * 1024 - rss_before
    finally:
        peer.close()
        p.stop()
    assert closed, f"the phone kept the connection after {sent >> 20} MiB sent past flow control"
    assert sent < 64 * MB, sent  # cut early, not after absorbing the flood
    assert growth < RSS_GROWTH_LIMIT, f"daemon peak RSS grew by {growth >> 20} MiB"


def test_compliant_peer_is_paced_not_cut(tmp_path: Path) -> None:
    """A peer that waits for each OKAY is never disconnected: with 20 streams whose command never reads stdin,
    OKAYs stop once the connection holds 64 MiB, and the phone still serves that connection."""
    p = Phone(tmp_path / "sb")
    peer = RawPeer(p.port)
    try:
        peer.handshake()
        remote = {i: peer.open(i, b"exec:sleep 30") for i in range(1, 21)}
        assert all(remote.values())
        ready, sent, payload = set(remote), 0, bytes(MB)
        while ready and sent < FLOOD_BYTES:
            for i in ready:
                peer.send(WRTE, i, remote[i], payload)
                sent += MB
            ready = set()
            while select.select([peer.sock], [], [], 0.3)[0]:  # the OKAYs of this round, until a quiet moment
                cmd, _, local, _ = peer.recv()
                assert cmd == OKAY
                ready.add(local)
        assert not ready, f"still accepting after {sent >> 20} MiB"
        assert 60 * MB <= sent <= 90 * MB, sent >> 20  # 64 MiB for the connection, plus one packet per stream
        assert peer.open(99, b"shell:echo alive")
        assert peer.recv()[3] == b"alive\n"
    finally:
        peer.close()
        p.stop()


def test_streams_per_connection_are_capped(tmp_path: Path) -> None:
    from edgedeploy.devices.virtual_phone import MAX_STREAMS

    p = Phone(tmp_path / "sb")
    peer = RawPeer(p.port)
    try:
        peer.handshake()
        ids = [peer.open(i, b"sync:") for i in range(1, MAX_STREAMS + 3)]
        assert all(ids[:MAX_STREAMS]) and ids[MAX_STREAMS:] == [0, 0]
        peer.send(CLSE, 1, ids[0])  # closing one makes room for another
        assert peer.recv()[0] == CLSE
        assert peer.open(1000, b"sync:")
    finally:
        peer.close()
        p.stop()


# -- half packets ------------------------------------------------------------------------------------------
def test_half_packet_is_dropped_after_timeout_but_idle_is_fine(tmp_path: Path) -> None:
    p = Phone(tmp_path / "sb", "--packet-timeout", "1")
    half_header, half_payload, idle = RawPeer(p.port), RawPeer(p.port), RawPeer(p.port)
    try:
        half_payload.handshake()
        idle.handshake()
        half_header.sock.sendall(RawPeer.packet(CNXN, 0x01000000, MB, b"host::\0")[:10])
        half_payload.sock.sendall(RawPeer.packet(OPEN, 1, 0, b"shell:echo never\0")[:30])
        started = time.monotonic()
        assert half_header.closed_by_phone(within=6)
        assert half_payload.closed_by_phone(within=6)
        waited = time.monotonic() - started
        assert 0.5 < waited < 6, waited
        # A connection that sent whole packets and then idled longer than the timeout is still served.
        time.sleep(max(0.0, 1.5 - waited))
        remote = idle.open(1, b"shell:echo hi")
        assert remote
        cmd, _, _, data = idle.recv()
        assert (cmd, data) == (WRTE, b"hi\n")
    finally:
        for peer in (half_header, half_payload, idle):
            peer.close()
        p.stop()


# -- FIFOs and other non-regular files ---------------------------------------------------------------------
def test_fifo_is_refused_and_others_are_still_served(tmp_path: Path) -> None:
    from adb_shell.exceptions import AdbCommandFailureException, PushFailedError

    p = Phone(tmp_path / "sb")
    fifo = p.tmp / "fifo"
    os.mkfifo(fifo)
    try:
        first, second = _device(p.port, timeout=5), _device(p.port, timeout=5)
        try:
            started = time.monotonic()
            with pytest.raises(AdbCommandFailureException, match="not a regular file"):
                first.pull("/data/local/tmp/fifo", io.BytesIO(), read_timeout_s=5)
            with pytest.raises(PushFailedError, match="not a regular file"):
                first.push(io.BytesIO(b"data"), "/data/local/tmp/fifo", read_timeout_s=5)
            with pytest.raises(AdbCommandFailureException, match="Is a directory"):
                first.pull("/data/local/tmp", io.BytesIO(), read_timeout_s=5)
            assert second.shell("echo still here", read_timeout_s=5) == "still here\n"
            assert first.shell("echo me too", read_timeout_s=5) == "me too\n"
            assert time.monotonic() - started < 5  # nothing waited for a FIFO peer
        finally:
            first.close()
            second.close()
    finally:
        p.stop()
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)  # refused, not replaced


# -- odd sandbox paths -------------------------------------------------------------------------------------
def test_sandbox_path_with_shell_characters(tmp_path: Path) -> None:
    sandbox = tmp_path / "my phone's $HOME `x` \"q\""
    p = Phone(sandbox)
    try:
        dev = _device(p.port)
        try:
            dev.push(io.BytesIO(b"pushed\n"), "/data/local/tmp/d/f.txt")
            assert (sandbox / "data/local/tmp/d/f.txt").read_bytes() == b"pushed\n"
            out = dev.shell("cat /data/local/tmp/d/f.txt '/data/local/tmp/d/f.txt' \"/data/local/tmp/d/f.txt\"; "
                            "echo made > /sdcard/m; cd /data/local/tmp && cat d/f.txt; getprop ro.product.name")
            assert out == "pushed\n" * 4 + "edgedeploy_ref\n"
            assert (sandbox / "sdcard/m").read_text() == "made\n"
            alias = dev.shell("echo $EDGEDEPLOY_DEVICE_ROOT").strip()
            assert alias != str(sandbox) and os.path.realpath(alias) == str(sandbox.resolve())
        finally:
            dev.close()
    finally:
        p.stop()
    assert not os.path.lexists(alias)  # the alias goes with the daemon


# -- bad options -------------------------------------------------------------------------------------------
def _truncated_key(tmp_path: Path) -> bytes:
    from adb_shell.auth.keygen import keygen

    keygen(str(tmp_path / "k"))
    line = (tmp_path / "k.pub").read_bytes()
    return line[: len(line) // 2] + b"\n"


@pytest.mark.parametrize("kind", ["random bytes", "empty", "comments only", "truncated key", "missing"])
def test_bad_auth_keys_file_is_an_input_error_naming_it(tmp_path: Path, kind: str) -> None:
    keys = tmp_path / "adb_keys"
    content = {
        "random bytes": random.Random(11).randbytes(600),
        "empty": b"",
        "comments only": b"# no keys here\n\n",
        "truncated key": _truncated_key(tmp_path) if kind == "truncated key" else b"",
    }
    if kind != "missing":
        keys.write_bytes(content[kind])
    with pytest.raises(InputError, match=re.escape(str(keys))):
        load_auth_keys(keys)


@pytest.mark.parametrize("args, message", [
    (["--port", "70000"], "port 70000 is out of range"),
    (["--budget-mb", "-5"], "memory budget must be positive"),
    (["--disk-mb", "-1"], "disk quota must not be negative"),
    (["--drop-after-bytes", "-1"], "drop-after-bytes must not be negative"),
    (["--packet-timeout", "0"], "packet timeout must be positive"),
    (["--auth-keys", "KEYS"], "is not an adb public key"),
    (["--sandbox", "FILE"], "not a folder"),
    (["--sandbox", "PLANTED"], "cannot set up the phone's files (/system/bin)"),
    (["--app-harness", "EMPTY"], "no edgedeploy-runner"),
], ids=lambda v: v if isinstance(v, str) else " ".join(v))  # fmt: skip
def test_bad_option_is_one_line_and_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    """``python -m edgedeploy.devices.virtual_phone`` with a bad option: exit 2, one ``error:`` line, no traceback.
    A subprocess with a timeout, so a phone that wrongly accepts the option cannot hang the test."""
    (tmp_path / "KEYS").write_bytes(b"not a key\n")
    (tmp_path / "FILE").write_text("a file, not a folder")
    (tmp_path / "EMPTY").mkdir()
    (tmp_path / "PLANTED").mkdir()
    (tmp_path / "PLANTED/system").symlink_to(tmp_path)  # a reused sandbox whose /system leads out of it
    args = [str(tmp_path / a) if a in ("KEYS", "FILE", "EMPTY", "PLANTED") else a for a in args]
    if "--sandbox" not in args:
        args += ["--sandbox", str(tmp_path / "sb")]
    if "--port" not in args:
        args += ["--port", "0"]
    r = subprocess.run([sys.executable, "-m", "edgedeploy.devices.virtual_phone", *args], capture_output=True,
                       text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    assert r.returncode == 2 and r.stdout == "", (r.returncode, r.stdout)
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
    assert not (tmp_path / "bin").exists()  # PLANTED: setup did not follow /system out of the sandbox


def test_constructor_validates_options(tmp_path: Path) -> None:
    for options in ({"port": -1}, {"port": 65536}, {"memory_budget_bytes": 0}, {"disk_bytes": -1},
                    {"packet_timeout_s": -1.0}):
        with pytest.raises(InputError):
            VirtualPhone(tmp_path / "sb", **{"port": 0, **options})
    assert not (tmp_path / "sb").exists()  # refused before anything was created
