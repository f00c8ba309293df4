"""Phones over ADB: through an adb server (adbutils) or straight to a device over TCP (adb-shell).

``SERIAL`` and ``HOST:PORT`` go through an adb server (the local one, or ``--adb-server host:port`` as
``adb -H/-P`` does); ``tcp:HOST:PORT`` talks the device protocol directly, as STF-style farms hand out.
"""

from __future__ import annotations

import contextlib
import shlex
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from edgedeploy.devices.base import (
    TIMEOUT_EXIT,
    ByteProgress,
    ConnectionLost,
    Device,
    DeviceError,
    RemoteStat,
    ShellResult,
)

DEFAULT_SERVER = ("127.0.0.1", 5037)
#: adb-shell speaks only shell v1, which loses the exit code; this marker carries it on the last line.
_RC_MARKER = "__edgedeploy_rc="
_SYNC_DATA_MAX = 64 * 1024
#: Shell v2 packet kind that carries the exit code (1 stdout, 2 stderr).
_SHELL_EXIT = 3


#: Bytes read from the file per system call while pushing: 16 sync DATA chunks, sent with one sendall.
_PUSH_READ_BYTES = 16 * _SYNC_DATA_MAX


def sync_send(sock: socket.socket, f: BinaryIO, remote: str, mode: int, progress: ByteProgress | None) -> None:
    """Send file ``f`` as ``remote`` over a connection already switched to ``sync:``; raise on the device's FAIL.

    adbutils sends one 4 KiB DATA packet (two system calls) per read: 16x the packets and calls of
    64 KiB chunks, which is most of the time on a fast link. Here a 1 MiB read becomes 16 full DATA
    packets in one ``sendall``.
    """
    path = f"{remote},{mode}".encode()
    sock.sendall(b"SEND" + struct.pack("<I", len(path)) + path)
    buf = bytearray(_PUSH_READ_BYTES)
    view = memoryview(buf)
    sent = 0
    while n := f.readinto(buf):
        packets = []
        for off in range(0, n, _SYNC_DATA_MAX):
            chunk = view[off:min(off + _SYNC_DATA_MAX, n)]
            packets += (b"DATA" + struct.pack("<I", len(chunk)), chunk)
        sock.sendall(b"".join(packets))
        sent += n
        if progress:
            progress(sent)
    sock.sendall(b"DONE" + struct.pack("<I", int(time.time())))
    reply, length = _recv_exact(sock, 4), struct.unpack("<I", _recv_exact(sock, 4))[0]
    if reply == b"OKAY":
        return
    message = _recv_exact(sock, min(length, 4096)).decode(errors="replace") if reply == b"FAIL" else repr(reply)
    raise OSError(f"the device refused the file: {message}")


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        got = sock.recv(n - len(data))
        if not got:
            raise ConnectionResetError("the connection closed during a sync reply")
        data += got
    return data


def fast_checksum(data: bytes | bytearray | str) -> int:
    """The ADB packet checksum (sum of the payload bytes, mod 2**32) with numpy.

    adb-shell sums every packet in pure Python, which caps its pushes near 100 MB/s; it looks the
    function up in its ``adb_message`` module per packet, so :func:`_speed_up_adb_shell` swaps this in.
    """
    raw = data.encode() if isinstance(data, str) else data
    return int(np.frombuffer(raw, np.uint8).sum(dtype=np.uint64)) & 0xFFFFFFFF


def _speed_up_adb_shell() -> None:
    import adb_shell.adb_message

    adb_shell.adb_message.checksum = fast_checksum


def parse_host_port(text: str, what: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DeviceError(f"{what} must be HOST:PORT, got {text!r}")
    return host, int(port)


class AdbServerDevice(Device):
    """A device that an adb server lists (USB serial, ``adb connect``-ed ``host:port``)."""

    backend = "adb"

    def __init__(self, serial: str, server: str | None = None, timeout: float = 30.0):
        super().__init__(serial)
        import adbutils

        host, port = parse_host_port(server, "--adb-server") if server else DEFAULT_SERVER
        self._server = f"{host}:{port}"
        if server and not _reachable(host, port):
            raise DeviceError(f"cannot reach the adb server at {self._server} (is `adb -a -P {port} server` running?)")
        self._timeout = timeout
        self.client = adbutils.AdbClient(host=host, port=port, socket_timeout=timeout)
        # adbutils parses the server's hex lengths with int(): a garbled reply is a ValueError.
        self._errors: tuple[type[BaseException], ...] = (adbutils.AdbError, OSError, ValueError)
        self._resolve()

    def _states(self) -> dict[str, str]:
        try:
            return {d.serial: d.state for d in self.client.list()}
        except self._errors as e:
            raise DeviceError(f"cannot list devices on the adb server at {self._server}: {e}") from None

    def _resolve(self) -> None:
        states = self._states()
        if self.serial not in states and ":" in self.serial:
            # A host:port the server does not know yet: connect it, as `adb connect` would.
            try:
                self.client.connect(self.serial, timeout=self._timeout)
            except self._errors as e:
                raise DeviceError(f"adb connect {self.serial} failed: {e}") from None
            states = self._states()
        state = states.get(self.serial)
        if state is None:
            known = ", ".join(f"{s} ({st})" for s, st in states.items()) or "none"
            raise DeviceError(f"device {self.serial!r} not found on the adb server at {self._server} "
                              f"(devices: {known})")
        if state == "unauthorized":
            raise DeviceError(f"device {self.serial} is unauthorized: accept the USB debugging prompt on the phone")
        if state != "device":
            raise DeviceError(f"device {self.serial} is {state}; reconnect it (adb reconnect) and retry")
        self.dev = self.client.device(self.serial)

    def reconnect(self) -> None:
        self._resolve()

    def shell(self, command: str, timeout: float | None = None) -> ShellResult:
        """Run ``command`` with the shell v2 protocol (separate stdout/stderr and the exit code)."""
        out: dict[int, bytearray] = {1: bytearray(), 2: bytearray()}
        try:
            with self._service(f"shell,v2,raw:{command}", timeout) as sock:
                while True:
                    kind, length = struct.unpack("<BI", _recv_exact(sock, 5))
                    data = _recv_exact(sock, length)
                    if kind == _SHELL_EXIT:
                        return ShellResult(data[0] if data else 255, out[1].decode(errors="replace"),
                                           out[2].decode(errors="replace"))
                    if kind in out:
                        out[kind] += data
        except TimeoutError as e:
            if timeout is None:
                raise ConnectionLost(f"{self.serial}: shell stopped answering: {e}") from None
            return _timed_out(self, timeout)
        except self._errors as e:
            raise ConnectionLost(f"{self.serial}: shell failed: {e}") from None

    @contextlib.contextmanager
    def _service(self, service: str, timeout: float | None) -> Iterator[socket.socket]:
        """A connection to ``service`` (``sync:``, ``shell,v2,raw:...``) on the device through the server.

        Opened here rather than with adbutils, whose connections sleep 10 ms on close and read sync
        replies in small pieces: a push of a bundle makes a few connections per file, which was a quarter
        of its time. ``timeout`` bounds each read after the handshake (None: wait as long as it takes).
        """
        host, port = parse_host_port(self._server, "--adb-server")
        with socket.create_connection((host, port), timeout=self._timeout) as sock:
            for request in (f"host:transport:{self.serial}", service):
                sock.sendall(f"{len(request):04x}{request}".encode())
                status = _recv_exact(sock, 4)
                if status != b"OKAY":
                    detail = _recv_exact(sock, int(_recv_exact(sock, 4), 16)) if status == b"FAIL" else status
                    raise OSError(f"the adb server refused {request.split(':')[0]}: {detail.decode(errors='replace')}")
            sock.settimeout(timeout)
            yield sock

    @contextlib.contextmanager
    def _sync(self) -> Iterator[socket.socket]:
        with self._service("sync:", self._timeout) as sock:
            yield sock
            sock.sendall(b"QUIT" + struct.pack("<I", 0))

    def push(self, local: Path, remote: str, progress: ByteProgress | None = None) -> None:
        try:
            with open(local, "rb") as f, self._sync() as sock:
                sync_send(sock, f, remote, 0o100644, progress)
        except self._errors as e:
            _raise_transfer(self.serial, "push", remote, e)

    def pull(self, remote: str, local: Path) -> None:
        try:
            self.dev.sync.pull(remote, str(local))
        except self._errors as e:
            _raise_transfer(self.serial, "pull", remote, e)

    def stat(self, remote: str) -> RemoteStat | None:
        path = remote.encode()
        try:
            with self._sync() as sock:
                sock.sendall(b"STAT" + struct.pack("<I", len(path)) + path)
                reply = _recv_exact(sock, 16)
        except self._errors as e:
            raise ConnectionLost(f"{self.serial}: stat failed: {e}") from None
        if reply[:4] != b"STAT":
            raise ConnectionLost(f"{self.serial}: stat failed: unexpected reply {reply[:4]!r}")
        mode, size, mtime = struct.unpack("<III", reply[4:])
        return None if mode == 0 else RemoteStat(size, mode, mtime)


class AdbTcpDevice(Device):
    """A device reached directly over TCP with adb-shell (no adb server), e.g. ``tcp:127.0.0.1:6001``."""

    backend = "adb-tcp"

    def __init__(self, address: str, key_path: Path | None = None, timeout: float = 30.0):
        super().__init__(f"tcp:{address}")
        self._host, self._port = parse_host_port(address, "tcp: device address")
        self._key_path = key_path
        self._timeout = timeout
        self._dev: Any = None
        self.reconnect()

    def _signer(self) -> list[Any]:
        """The user's adb key (``~/.android/adbkey``), the same one the adb server would offer."""
        from adb_shell.auth.sign_pythonrsa import PythonRSASigner

        path = self._key_path or Path.home() / ".android" / "adbkey"
        if not path.is_file():
            return []
        pub = Path(str(path) + ".pub")
        try:
            return [PythonRSASigner(pub.read_text() if pub.is_file() else "", path.read_text())]
        except (ValueError, OSError, IndexError) as e:
            raise DeviceError(f"{path}: not a usable adb key ({e})") from None

    def reconnect(self) -> None:
        from adb_shell.adb_device import AdbDevice
        from adb_shell.exceptions import AdbConnectionError, DeviceAuthError

        _speed_up_adb_shell()

        if self._dev is not None:
            self.close()
        # AdbDeviceTcp is this with adb-shell's own TcpTransport, which spins on a closed socket.
        dev = AdbDevice(_eof_aware_transport(self._host, self._port), default_transport_timeout_s=self._timeout)
        keys = self._signer()
        try:
            dev.connect(rsa_keys=keys or None, auth_timeout_s=5.0, read_timeout_s=self._timeout)
        except DeviceAuthError:
            raise DeviceError(f"{self.serial} is unauthorized: its adbd does not accept this host's adb key") from None
        except (OSError, AdbConnectionError) as e:
            raise DeviceError(f"cannot connect to {self.serial}: {e}") from None
        except Exception as e:  # noqa: BLE001 - adb-shell raises bare protocol errors on a wrong peer
            raise DeviceError(f"{self.serial} did not complete the ADB handshake ({type(e).__name__}: {e}); "
                              "offline or unauthorized") from None
        self._dev = dev

    def companion(self) -> Device:
        # adb-shell's connection serves one stream at a time: a second thread gets its own.
        return AdbTcpDevice(f"{self._host}:{self._port}", self._key_path, self._timeout)

    def _errors(self) -> tuple[type[BaseException], ...]:
        from adb_shell.exceptions import AdbConnectionError, AdbTimeoutError, TcpTimeoutException

        return (OSError, AdbConnectionError, AdbTimeoutError, TcpTimeoutException)

    def shell(self, command: str, timeout: float | None = None) -> ShellResult:
        # stderr is folded into stdout by the v1 shell service; the exit code rides on the last line.
        # Keep $? before the separating echo overwrites it.
        wrapped = f"{command}\n__edgedeploy_rc=$?; echo; echo {_RC_MARKER}$__edgedeploy_rc"
        from adb_shell.exceptions import AdbTimeoutError, TcpTimeoutException

        try:
            out = self._dev.shell(wrapped, timeout_s=timeout, read_timeout_s=timeout or self._timeout)
        except (AdbTimeoutError, TcpTimeoutException, TimeoutError) as e:
            if timeout is None:
                raise ConnectionLost(f"{self.serial}: shell stopped answering: {e}") from None
            return _timed_out(self, timeout)
        except self._errors() as e:
            raise ConnectionLost(f"{self.serial}: shell failed: {e}") from None
        head, sep, tail = out.rpartition(_RC_MARKER)
        if not sep:
            raise ConnectionLost(f"{self.serial}: shell output ended before the exit code")
        code = tail.strip()
        return ShellResult(int(code) if code.isdigit() else 255, head[:-1] if head.endswith("\n") else head)

    def push(self, local: Path, remote: str, progress: ByteProgress | None = None) -> None:
        sent = 0

        def cb(_path: str, chunk: int, _total: int) -> None:
            nonlocal sent
            sent += chunk  # adb-shell reports each chunk's size, not the running total
            if progress:
                progress(sent)

        try:
            self._dev.push(str(local), remote, st_mode=0o100644, progress_callback=cb,
                           read_timeout_s=self._timeout)
        except self._errors() as e:
            _raise_transfer(self.serial, "push", remote, e)
        except Exception as e:  # noqa: BLE001 - adb-shell reports a device-side FAIL as a plain exception
            if "No space left" in str(e):
                raise DeviceError(f"{self.serial}: push {remote} failed: the device's storage is full") from None
            raise DeviceError(f"{self.serial}: push to {remote} failed: {e}") from None

    def pull(self, remote: str, local: Path) -> None:
        try:
            self._dev.pull(remote, str(local), read_timeout_s=self._timeout)
        except self._errors() as e:
            _raise_transfer(self.serial, "pull", remote, e)
        except Exception as e:  # noqa: BLE001
            raise DeviceError(f"{self.serial}: pull of {remote} failed: {e}") from None

    def stat(self, remote: str) -> RemoteStat | None:
        try:
            mode, size, mtime = self._dev.stat(remote)
        except self._errors() as e:
            raise ConnectionLost(f"{self.serial}: stat failed: {e}") from None
        return None if mode == 0 else RemoteStat(size, mode, mtime)

    def close(self) -> None:
        if self._dev is not None:
            try:
                self._dev.close()
            except Exception:  # noqa: BLE001 - closing a dead connection must not mask the real error
                pass


def _eof_aware_transport(host: str, port: int) -> Any:
    """adb-shell's TCP transport, but a closed peer raises instead of reading b"" until the read timeout.

    adb-shell's ``bulk_read`` returns ``b""`` when the device closes the socket and its callers loop on it
    (busy, for up to the read timeout: 15 minutes for a profile run), so a phone that drops mid-run would
    hang the profiler; ``ConnectionResetError`` makes it :class:`ConnectionLost` at once.
    """
    from adb_shell.transport.tcp_transport import TcpTransport

    class EofAwareTcpTransport(TcpTransport):  # type: ignore[misc]
        def bulk_read(self, numbytes: int, transport_timeout_s: float | None) -> bytes:
            data = super().bulk_read(numbytes, transport_timeout_s)
            if not data and numbytes:
                raise ConnectionResetError(f"{host}:{port} closed the connection")
            return data

    return EofAwareTcpTransport(host, port)


def _timed_out(device: Device, timeout: float) -> ShellResult:
    """The shared answer to a shell that ran past its timeout: its stream is abandoned, so reconnect."""
    try:
        device.reconnect()
    except DeviceError:
        pass  # the next command reports the device's state
    return ShellResult(TIMEOUT_EXIT, "", f"timed out after {timeout:g} s")


def _raise_transfer(serial: str, verb: str, remote: str, e: BaseException) -> None:
    text = str(e)
    if "No space left" in text:
        raise DeviceError(f"{serial}: {verb} {remote} failed: the device's storage is full") from None
    if isinstance(e, OSError) and not isinstance(e, (ConnectionError, TimeoutError, socket.timeout)):
        raise DeviceError(f"{serial}: {verb} {remote} failed: {e}") from None
    raise ConnectionLost(f"{serial}: {verb} {remote} interrupted: {e}") from None


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=3):
            return True
    except OSError:
        return False


def open_device(spec: str | None = None, adb_server: str | None = None) -> Device:
    """The device named by ``--device``: none/``local`` = this host, ``tcp:H:P`` = direct, else an adb serial."""
    if spec in (None, "", "local"):
        from edgedeploy.devices.local import LocalDevice

        return LocalDevice()
    assert spec is not None
    if spec.startswith("tcp:"):
        return AdbTcpDevice(spec[4:])
    if any(c.isspace() for c in spec) or spec != shlex.quote(spec).strip("'"):
        raise DeviceError(f"{spec!r} is not a device serial")
    return AdbServerDevice(spec, adb_server)
