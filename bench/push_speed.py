"""Push throughput to the virtual reference phone: our bundle push against Debian ``adb push``.

Usage: ``python bench/push_speed.py [--size-mb 256] [--repeat 3]``. Prints MB/s (best of ``--repeat``) for
Debian ``adb push``, adb-shell's raw ``push``, and edgedeploy's ``push_bundle`` (differential, verified with
the device's sha256sum) over both of its transports (direct ``tcp:`` with adb-shell, and through the adb
server with adbutils), then each ÷ ``adb push``. Everything (sandbox, adb server HOME and log) lives in a
temporary folder.
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


def _synthetic_bundle(src: Path, out: Path) -> Path:
    """A bundle folder holding only ``src`` as its weights, so push_bundle moves the same bytes as adb."""
    from edgedeploy.bundle import Manifest, write_manifest

    out.mkdir()
    os.link(src, out / "params_shard_0.bin")
    (out / "model.so").write_bytes(b"\0")
    write_manifest(out, Manifest(
        architecture="bench", family="bench", config={}, parameters=0, dtype="float16", target="host",
        target_triple="host", context_window=1, prefill_chunk=1, library="model.so",
        weights_index="params_shard_0.bin", weights_bytes=src.stat().st_size, tokenizer_files=[],
        stop_token_ids=[], tvm_version="", edgedeploy_version="", source="", created=""))
    return out


def _bench_ours(device: object, bundle: Path, repeat: int, size: int) -> float:
    from edgedeploy.profile.push import push_bundle

    times = []
    for i in range(repeat):
        t0 = time.perf_counter()
        stats = push_bundle(device, bundle, f"/data/local/tmp/bench_ours_{i}")  # type: ignore[arg-type]
        times.append(time.perf_counter() - t0)
        assert stats.files_sent >= 1 and stats.verified_on_device
        device.remove(f"/data/local/tmp/bench_ours_{i}")  # type: ignore[attr-defined]
    return size / 1e6 / min(times)


def _bench_ours_via_server(adb: str, port: int, bundle: Path, home: Path, repeat: int, size: int) -> float:
    from edgedeploy.devices.adb import AdbServerDevice

    home.mkdir(parents=True, exist_ok=True)
    server = str(_free_port())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANDROID_", "ADB_"))}
    env.update(HOME=str(home), TMPDIR=str(home))
    subprocess.run([adb, "-P", server, "start-server"], env=env, stdin=subprocess.DEVNULL, capture_output=True,
                   check=True)
    try:
        dev = AdbServerDevice(f"127.0.0.1:{port}", f"127.0.0.1:{server}")
        return _bench_ours(dev, bundle, repeat, size)
    finally:
        subprocess.run([adb, "-P", server, "kill-server"], env=env, capture_output=True)


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
            from edgedeploy.devices.adb import AdbTcpDevice

            bundle = _synthetic_bundle(src, work / "bundle")
            size = src.stat().st_size
            tcp = AdbTcpDevice(f"127.0.0.1:{port}")
            ours_tcp = _bench_ours(tcp, bundle, args.repeat, size)
            tcp.close()
            ours_srv = _bench_ours_via_server(adb, port, bundle, work / "adbhome2", args.repeat, size) if adb else None
        finally:
            os.kill(phone.pid, signal.SIGTERM)
            phone.wait(timeout=10)
    print(f"payload: {args.size_mb} MiB, best of {args.repeat}")
    print(f"Debian adb push : {adb_mbs:8.1f} MB/s" if adb_mbs else "Debian adb push : (adb not installed)")
    print(f"adb-shell push  : {shell_mbs:8.1f} MB/s")
    print(f"ours, tcp:      : {ours_tcp:8.1f} MB/s  (push_bundle via adb-shell, incl. device sha256 check)")
    if ours_srv:
        print(f"ours, adb server: {ours_srv:8.1f} MB/s  (push_bundle via adbutils, incl. device sha256 check)")
    if adb_mbs:
        print(f"ratio adb-shell / adb         : {shell_mbs / adb_mbs:.2f}")
        print(f"ratio ours (tcp:) / adb       : {ours_tcp / adb_mbs:.2f}")
        if ours_srv:
            print(f"ratio ours (adb server) / adb : {ours_srv / adb_mbs:.2f}")


if __name__ == "__main__":
    main()
