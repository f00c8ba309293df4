"""Start and stop a virtual phone in a child process (demo, benches); the daemon is ``virtual_phone``."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path


class VirtualPhoneProcess:
    """``edgedeploy virtual-phone`` on a free loopback port; stopped by pid when the block ends."""

    def __init__(self, sandbox: Path, profile: str = "reference-12gb", *extra: str):
        self.sandbox = Path(sandbox)
        self._cmd = [sys.executable, "-m", "edgedeploy.cli", "virtual-phone", "--profile", profile, "--port", "0",
                     "--sandbox", str(self.sandbox), *extra]
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0

    def __enter__(self) -> VirtualPhoneProcess:
        self.proc = subprocess.Popen(self._cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if "listening on" not in line:
            self.stop()
            raise RuntimeError(f"virtual phone did not start ({line.strip() or 'no output'})")
        self.port = int(line.rsplit(":", 1)[1])
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def __exit__(self, *exc: object) -> None:
        self.stop()
