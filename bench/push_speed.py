"""Push throughput to the virtual reference phone: our bundle push against Debian ``adb push``.

Usage: ``python bench/push_speed.py [--size-mb 256] [--repeat 3]``. The payload is laid out as a bundle's
weights are (``params_shard_N.bin`` of the build's 32 MiB shard size). Prints MB/s (best of ``--repeat``) for
Debian ``adb push`` of that folder, adb-shell's raw ``push`` of its files, and edgedeploy's ``push_bundle``
(differential, every file verified with the device's sha256sum) over both of its transports (direct
``tcp:`` with adb-shell, and through the adb server), then each ÷ ``adb push``. Everything (sandbox, adb
server HOME and log) lives in a temporary folder.
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


def _size(src: Path) -> int:
    return sum(f.stat().st_size for f in src.iterdir())


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
            run("-s", f"127.0.0.1:{port}", "push", str(src), "/data/local/tmp/bench_adb")
            times.append(time.perf_counter() - t0)
            run("-s", f"127.0.0.1:{port}", "shell", "rm", "-rf", "/data/local/tmp/bench_adb")
        return _size(src) / 1e6 / min(times)
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
            for f in sorted(src.iterdir()):
                dev.push(str(f), f"/data/local/tmp/bench_adb_shell_{f.name}")
            times.append(time.perf_counter() - t0)
        return _size(src) / 1e6 / min(times)
    finally:
        dev.close()


def _synthetic_bundle(src: Path, out: Path) -> Path:
    """A bundle folder holding only ``src``'s shards as its weights, so push_bundle moves the same bytes as adb."""
    from edgedeploy.bundle import Manifest, write_manifest
    from edgedeploy.checkpoint.config import load_config

    cfg, _ = load_config(REPO_ROOT / "tests" / "data" / "reference_configs" / "llama-3-8b")
    out.mkdir()
    for f in src.iterdir():
        os.link(f, out / f.name)
    (out / "model.so").write_bytes(b"\0")
    write_manifest(out, Manifest(
        architecture=cfg.architecture, family=cfg.family, config=cfg.to_dict(), parameters=0, dtype="float16",
        target="host",
        target_triple="host", context_window=1, prefill_chunk=1, library="model.so",
        weights_index="params_shard_0.bin", weights_bytes=_size(src), tokenizer_files=[],
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
        from edgedeploy.compile.weights import SHARD_CAP_BYTES

        src = work / "payload"
        src.mkdir()
        per_shard = SHARD_CAP_BYTES >> 20
        for i in range(0, args.size_mb, per_shard):
            with open(src / f"params_shard_{i // per_shard}.bin", "wb") as f:
                for _ in range(min(per_shard, args.size_mb - i)):
                    f.write(os.urandom(1 << 20))
        phone, port = _start_phone(work / "sandbox")
        try:
            adb = shutil.which("adb")
            adb_mbs = _bench_adb(adb, port, src, work / "adbhome", args.repeat) if adb else None
            shell_mbs = _bench_adb_shell(port, src, args.repeat)
            from edgedeploy.devices.adb import AdbTcpDevice

            bundle = _synthetic_bundle(src, work / "bundle")
            size = _size(src)
            tcp = AdbTcpDevice(f"127.0.0.1:{port}")
            ours_tcp = _bench_ours(tcp, bundle, args.repeat, size)
            tcp.close()
            ours_srv = _bench_ours_via_server(adb, port, bundle, work / "adbhome2", args.repeat, size) if adb else None
        finally:
            os.kill(phone.pid, signal.SIGTERM)
            phone.wait(timeout=10)
    print(f"payload: {args.size_mb} MiB in {SHARD_CAP_BYTES >> 20} MiB shards, best of {args.repeat}")
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
