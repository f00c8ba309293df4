"""Start and stop a virtual phone in a child process (demo, tests, benches); the daemon is ``virtual_phone``."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path


class VirtualPhoneProcess:
    """A virtual phone on a free loopback port, stopped by pid when the ``with`` block ends (or by :meth:`stop`).

    ``profile`` starts it through ``edgedeploy virtual-phone`` (the profile's props and budget); without
    one, the bare daemon module runs with ``args`` only. ``env`` replaces the child's environment.
    """

    def __init__(self, sandbox: Path, *args: str, profile: str | None = None, env: dict[str, str] | None = None):
        self.sandbox = Path(sandbox)
        entry = (["edgedeploy.cli", "virtual-phone", "--profile", profile] if profile
                 else ["edgedeploy.devices.virtual_phone"])
        self._cmd = [sys.executable, "-m", *entry, "--port", "0", "--sandbox", str(self.sandbox), *args]
        self._env = env
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0

    def start(self) -> VirtualPhoneProcess:
        self.proc = subprocess.Popen(self._cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                     env=self._env)
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

    def __enter__(self) -> VirtualPhoneProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
