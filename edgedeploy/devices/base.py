"""The device interface every backend (local host, adb server, adb over TCP) implements.

A backend provides five transport primitives (shell with exit code, push, pull, stat, close); the
rest — facts, quoting, removal — is shared here, so backends stay small and behave alike.
Every shell command that carries a user-supplied string (path, model name) is built with
:func:`shlex.quote`; callers pass argument lists to :meth:`Device.run_args` for that reason.
"""

from __future__ import annotations

import shlex
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgedeploy.errors import EdgeDeployError

#: The exit code every backend gives a shell command that ran past its timeout (as coreutils' timeout).
TIMEOUT_EXIT = 124

#: Called with the number of bytes sent so far.
ByteProgress = Callable[[int], None]


class DeviceError(EdgeDeployError):
    """A device cannot be reached or refused an operation (exit code 2)."""

    exit_code = 2


class ConnectionLost(DeviceError):
    """The transport dropped mid-operation; the caller may reconnect and retry."""


@dataclass
class ShellResult:
    exit_code: int
    stdout: str
    stderr: str = ""


@dataclass
class RemoteStat:
    size: int
    mode: int
    mtime: int


@dataclass
class DeviceFacts:
    """What the device says about itself; recorded in every report."""

    serial: str
    backend: str
    model: str = ""
    manufacturer: str = ""
    soc: str = ""
    android_release: str = ""
    sdk: str = ""
    abi: str = ""
    mem_total_bytes: int = 0
    mem_available_bytes: int = 0
    cpu_count: int = 0
    props: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_getprop(text: str) -> dict[str, str]:
    """``[key]: [value]`` lines of ``getprop`` into a dict."""
    props: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("[") and "]: [" in line and line.endswith("]"):
            key, _, value = line[1:-1].partition("]: [")
            props[key] = value
    return props


def parse_meminfo(text: str) -> dict[str, int]:
    """``/proc/meminfo`` fields in bytes."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key.strip()] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return out


class Device(ABC):
    """One device reached by some transport. Use as a context manager; it closes the transport."""

    backend = "abstract"
    #: Where the profiler keeps its files on the device.
    work_dir = "/data/local/tmp/edgedeploy"

    def __init__(self, serial: str):
        self.serial = serial
        self._facts: DeviceFacts | None = None

    # -- transport primitives --------------------------------------------------------------------

    @abstractmethod
    def shell(self, command: str, timeout: float | None = None) -> ShellResult:
        """Run ``command`` with the device's shell; the exit code is the command's.

        Past ``timeout`` seconds every backend returns exit code :data:`TIMEOUT_EXIT` (never raises),
        with whatever output it could keep, and leaves the transport usable.
        """

    @abstractmethod
    def push(self, local: Path, remote: str, progress: ByteProgress | None = None) -> None:
        """Copy a local file to ``remote`` (parents created), streaming it."""

    @abstractmethod
    def pull(self, remote: str, local: Path) -> None:
        """Copy ``remote`` to a local file, streaming it."""

    @abstractmethod
    def stat(self, remote: str) -> RemoteStat | None:
        """Size, mode and mtime of ``remote``, or None when it does not exist."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the transport."""

    def reconnect(self) -> None:  # noqa: B027 - optional hook
        """Re-open the transport after :class:`ConnectionLost` (backends with state override this)."""

    # -- shared operations -----------------------------------------------------------------------

    def run_args(self, args: Sequence[str], timeout: float | None = None) -> ShellResult:
        """Run a command given as an argument list; every argument is quoted, so none is interpreted."""
        return self.shell(" ".join(shlex.quote(str(a)) for a in args), timeout=timeout)

    def companion(self) -> Device:
        """A handle another thread may use while this one is busy (a push beside a hash).

        Devices whose every call opens its own connection return themselves; a device with one
        multiplexed connection that is not thread-safe opens a second one (close it when done).
        """
        return self

    def remove(self, remote: str) -> None:
        self.run_args(["rm", "-rf", remote])

    def mkdir(self, remote: str) -> None:
        r = self.run_args(["mkdir", "-p", remote])
        if r.exit_code:
            raise DeviceError(f"{self.serial}: cannot create {remote}: {(r.stderr or r.stdout).strip()}")

    def sha256(self, remote: str) -> str | None:
        """sha256 of a device file computed on the device (toybox has sha256sum), None if unavailable."""
        r = self.run_args(["sha256sum", remote])
        word = r.stdout.split()[0] if r.exit_code == 0 and r.stdout.split() else ""
        return word if len(word) == 64 else None

    def facts(self) -> DeviceFacts:
        """Model, SoC, Android version, ABI, memory and CPU count, read from the device once."""
        if self._facts is None:
            props = parse_getprop(self.shell("getprop").stdout)
            mem = parse_meminfo(self.run_args(["cat", "/proc/meminfo"]).stdout)
            cpus = self.shell("nproc 2>/dev/null || grep -c ^processor /proc/cpuinfo").stdout.strip()
            # The virtual phone runs on a host but stands in for a phone: it states the phone's RAM.
            mem_total = int(props.get("ro.edgedeploy.memtotal_kb", 0)) * 1024 or mem.get("MemTotal", 0)
            self._facts = DeviceFacts(
                serial=self.serial, backend=self.backend, model=props.get("ro.product.model", ""),
                manufacturer=props.get("ro.product.manufacturer", ""),
                soc=props.get("ro.soc.model", props.get("ro.board.platform", "")),
                android_release=props.get("ro.build.version.release", ""), sdk=props.get("ro.build.version.sdk", ""),
                abi=props.get("ro.product.cpu.abi", ""), mem_total_bytes=mem_total,
                mem_available_bytes=mem.get("MemAvailable", 0),
                cpu_count=int(cpus) if cpus.isdigit() else 0, props=props,
            )
        return self._facts

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
