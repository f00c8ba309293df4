"""Phones over ADB: through an adb server (adbutils) or straight to a device over TCP (adb-shell).

``SERIAL`` and ``HOST:PORT`` go through an adb server (the local one, or ``--adb-server host:port`` as
``adb -H/-P`` does); ``tcp:HOST:PORT`` talks the device protocol directly, as STF-style farms hand out.
"""

from __future__ import annotations

import io
import shlex
import socket
from pathlib import Path
from typing import Any, BinaryIO

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


class _CountingReader(io.RawIOBase):
    """Wraps a file so a library that reads it reports progress without knowing about it."""

    def __init__(self, f: BinaryIO, progress: ByteProgress | None):
        self._f, self._progress, self.sent = f, progress, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        n = self._f.readinto(buf)
        self.sent += n or 0
        if self._progress and n:
            self._progress(self.sent)
        return n or 0

    def read(self, size: int = -1) -> bytes:
        # adbutils asks for 4 KiB at a time and sends one DATA packet per read; a sync DATA packet may
        # carry 64 KiB, and 16x fewer packets is most of the throughput on a fast link.
        data = self._f.read(max(size, _SYNC_DATA_MAX) if size >= 0 else size)
        self.sent += len(data)
        if self._progress and data:
            self._progress(self.sent)
        return data


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
        import adbutils

        try:
            r = self.dev.shell2(command, timeout=timeout, v2=True)
        except (adbutils.AdbTimeout, TimeoutError) as e:
            if timeout is None:
                raise ConnectionLost(f"{self.serial}: shell stopped answering: {e}") from None
            return _timed_out(self, timeout)
        except self._errors as e:
            raise ConnectionLost(f"{self.serial}: shell failed: {e}") from None
        return ShellResult(r.returncode, r.stdout or r.output or "", r.stderr or "")

    def push(self, local: Path, remote: str, progress: ByteProgress | None = None) -> None:
        try:
            with open(local, "rb") as f:
                self.dev.sync.push(_CountingReader(f, progress), remote, mode=0o644)
        except self._errors as e:
            _raise_transfer(self.serial, "push", remote, e)

    def pull(self, remote: str, local: Path) -> None:
        try:
            self.dev.sync.pull(remote, str(local))
        except self._errors as e:
            _raise_transfer(self.serial, "pull", remote, e)

    def stat(self, remote: str) -> RemoteStat | None:
        try:
            info = self.dev.sync.stat(remote)
        except self._errors as e:
            raise ConnectionLost(f"{self.serial}: stat failed: {e}") from None
        if info.mode == 0:
            return None
        mtime = info.mtime.timestamp() if hasattr(info.mtime, "timestamp") else info.mtime or 0
        return RemoteStat(info.size, info.mode, int(mtime))


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
        from adb_shell.adb_device import AdbDeviceTcp
        from adb_shell.exceptions import AdbConnectionError, DeviceAuthError

        if self._dev is not None:
            self.close()
        dev = AdbDeviceTcp(self._host, self._port, default_transport_timeout_s=self._timeout)
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
