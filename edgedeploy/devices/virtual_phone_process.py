"""Start and stop a virtual phone in a child process (demo, tests, benches); the daemon is ``virtual_phone``."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

START_TIMEOUT_S = 60.0


class VirtualPhoneProcess:
    """A virtual phone on a free loopback port, stopped by pid when the ``with`` block ends (or by :meth:`stop`).

    ``profile`` starts it through ``edgedeploy virtual-phone`` (the profile's props and budget); without
    one, the bare daemon module runs with ``args`` only. ``env`` replaces the child's environment. If the
    daemon does not announce itself within ``start_timeout_s``, or exits first (a bad option), :meth:`start`
    raises ``RuntimeError`` with the daemon's last stderr line (its one-line error).
    """

    def __init__(self, sandbox: Path, *args: str, profile: str | None = None, env: dict[str, str] | None = None,
                 start_timeout_s: float = START_TIMEOUT_S):
        self.sandbox = Path(sandbox)
        entry = (["edgedeploy.cli", "virtual-phone", "--profile", profile] if profile
                 else ["edgedeploy.devices.virtual_phone"])
        self._cmd = [sys.executable, "-m", *entry, "--port", "0", "--sandbox", str(self.sandbox), *args]
        self._env = env
        self._start_timeout_s = start_timeout_s
        self._stderr: IO[bytes] | None = None
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0

    def start(self) -> VirtualPhoneProcess:
        # stderr goes to a file, not a pipe: nobody reads it while the phone runs, and a full pipe would block it.
        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(self._cmd, stdout=subprocess.PIPE, stderr=self._stderr, text=True,
                                     env=self._env)
        line = self._first_line()
        if "listening on" not in line:
            self._terminate()
            message = line.strip() or self._last_error() or "no output"
            self.stop()
            raise RuntimeError(f"virtual phone did not start ({message})")
        self.port = int(line.rsplit(":", 1)[1])
        return self

    def _first_line(self) -> str:
        """The daemon's first stdout line, or "" if it exits or stays silent past the start timeout."""
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + self._start_timeout_s
        while (left := deadline - time.monotonic()) > 0:
            if select.select([self.proc.stdout], [], [], min(left, 0.5))[0]:
                return self.proc.stdout.readline()  # the readiness line is printed whole, with a flush
        return ""

    def _last_error(self) -> str:
        """The daemon's last stderr line (its one-line error when an option was bad)."""
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        lines = self._stderr.read().decode("utf-8", "replace").strip().splitlines()
        return lines[-1] if lines else ""

    def stop(self) -> None:
        """Stop the daemon (see :meth:`_terminate`) and release its pipes."""
        self._terminate()
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def _terminate(self) -> None:
        """SIGTERM by pid (SIGKILL after 10 s); a process already reaped is left alone (its pid may be reused)."""
        if self.proc is None or self.proc.poll() is not None:
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
