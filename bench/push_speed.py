"""Push throughput to the virtual reference phone: Debian ``adb push`` against adb-shell's ``push``.

Usage: ``python bench/push_speed.py [--size-mb 256] [--repeat 3]``. Prints MB/s (best of ``--repeat``) for each
client and the ratio adb-shell / adb. Everything (sandbox, adb server HOME and log) lives in a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_phone(sandbox: Path) -> tuple[subprocess.Popen[str], int]:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    cmd = [sys.executable, "-m", "edgedeploy.devices.virtual_phone", "--port", "0", "--sandbox", str(sandbox)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()  # type: ignore[union-attr]
    return proc, int(line.rsplit(":", 1)[1])


def _bench_adb(adb: str, port: int, src: Path, home: Path, repeat: int) -> float:
    home.mkdir(parents=True, exist_ok=True)
    server = str(_free_port())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANDROID_", "ADB_"))}
    env.update(HOME=str(home), TMPDIR=str(home))

    def run(*args: str) -> None:
        subprocess.run([adb, "-P", server, *args], env=env, stdin=subprocess.DEVNULL, capture_output=True, check=True)

    run("start-server")
    try:
        run("connect", f"127.0.0.1:{port}")
        run("-s", f"127.0.0.1:{port}", "wait-for-device")
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            run("-s", f"127.0.0.1:{port}", "push", str(src), "/data/local/tmp/bench_adb.bin")
            times.append(time.perf_counter() - t0)
        return src.stat().st_size / 1e6 / min(times)
    finally:
        subprocess.run([adb, "-P", server, "kill-server"], env=env, capture_output=True)


def _bench_adb_shell(port: int, src: Path, repeat: int) -> float:
    from adb_shell.adb_device import AdbDeviceTcp

    dev = AdbDeviceTcp("127.0.0.1", port, default_transport_timeout_s=60)
    dev.connect()
    try:
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            dev.push(str(src), "/data/local/tmp/bench_adb_shell.bin")
            times.append(time.perf_counter() - t0)
        return src.stat().st_size / 1e6 / min(times)
    finally:
        dev.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mb", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="push_speed_") as tmp:
        work = Path(tmp)
        src = work / "payload.bin"
        with open(src, "wb") as f:
            for _ in range(args.size_mb):
                f.write(os.urandom(1 << 20))
        phone, port = _start_phone(work / "sandbox")
        try:
            adb = shutil.which("adb")
            adb_mbs = _bench_adb(adb, port, src, work / "adbhome", args.repeat) if adb else None
            shell_mbs = _bench_adb_shell(port, src, args.repeat)
        finally:
            os.kill(phone.pid, signal.SIGTERM)
            phone.wait(timeout=10)
    print(f"payload: {args.size_mb} MiB, best of {args.repeat}")
    print(f"Debian adb push : {adb_mbs:8.1f} MB/s" if adb_mbs else "Debian adb push : (adb not installed)")
    print(f"adb-shell push  : {shell_mbs:8.1f} MB/s")
    if adb_mbs:
        print(f"ratio adb-shell / adb: {shell_mbs / adb_mbs:.2f}")


if __name__ == "__main__":
    main()
