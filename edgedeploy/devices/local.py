"""This host as a device: the default when ``--device`` is not given."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from edgedeploy.devices.base import (
    TIMEOUT_EXIT,
    ByteProgress,
    Device,
    DeviceFacts,
    RemoteStat,
    ShellResult,
    parse_meminfo,
)


class LocalDevice(Device):
    """Runs the Python runner on this host; "device paths" live in a private temporary folder.

    Pushing hard-links files when it can, so profiling a multi-GB bundle on the host costs no copy.
    """

    backend = "local"

    def __init__(self, root: Path | None = None):
        super().__init__("local")
        self._own_root = root is None
        self.root = Path(root or tempfile.mkdtemp(prefix="edgedeploy-local-device-"))
        self.work_dir = str(self.root / "work")

    def shell(self, command: str, timeout: float | None = None) -> ShellResult:
        try:
            p = subprocess.run(["/bin/sh", "-c", command], capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            return ShellResult(TIMEOUT_EXIT, str(e.stdout or ""), f"timed out after {timeout} s")
        return ShellResult(p.returncode, p.stdout, p.stderr)

    def push(self, local: Path, remote: str, progress: ByteProgress | None = None) -> None:
        dst = Path(remote)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.exists():
            dst.unlink()
        try:
            os.link(local, dst)
        except OSError:
            shutil.copyfile(local, dst)
        if progress:
            progress(dst.stat().st_size)

    def pull(self, remote: str, local: Path) -> None:
        shutil.copyfile(remote, local)

    def stat(self, remote: str) -> RemoteStat | None:
        try:
            st = os.stat(remote)
        except FileNotFoundError:
            return None
        return RemoteStat(st.st_size, st.st_mode, int(st.st_mtime))

    def facts(self) -> DeviceFacts:
        if self._facts is None:
            mem = parse_meminfo(Path("/proc/meminfo").read_text())
            self._facts = DeviceFacts(
                serial="local", backend=self.backend, model=platform.node(), manufacturer="host",
                soc=platform.processor() or platform.machine(), abi=platform.machine(),
                mem_total_bytes=mem.get("MemTotal", 0), mem_available_bytes=mem.get("MemAvailable", 0),
                cpu_count=os.cpu_count() or 0, props={"ro.edgedeploy.python": sys.executable},
            )
        return self._facts

    def close(self) -> None:
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)
