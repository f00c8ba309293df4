"""The fast push path: its pieces against their definitions, and a pipelined push over both transports.

Throughput itself is measured by ``bench/push_speed.py``; these tests check that what makes it fast
(numpy packet checksums, 64 KiB sync packets sent by us, device hashes beside the transfer, the
virtual phone's hardware SHA-256) computes exactly what the slow way did.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from edgedeploy.devices.adb import fast_checksum
from edgedeploy.devices.virtual_phone import _sha256sum_script


@pytest.mark.parametrize("data", [b"", b"\xff" * 70000, os.urandom(1 << 20), bytearray(os.urandom(4097)), "OKAY"])
def test_fast_checksum_is_the_adb_byte_sum(data: bytes | bytearray | str) -> None:
    raw = data.encode() if isinstance(data, str) else bytes(data)
    assert fast_checksum(data) == sum(raw) & 0xFFFFFFFF


def test_virtual_phone_sha256sum_prints_what_coreutils_prints(tmp_path: Path) -> None:
    script = tmp_path / "sha256sum"
    script.write_text(_sha256sum_script())
    payload = tmp_path / "payload.bin"
    payload.write_bytes(os.urandom(3 << 20))
    want = hashlib.sha256(payload.read_bytes()).hexdigest()
    out = subprocess.run(["sh", str(script), str(payload)], capture_output=True, text=True, check=True)
    assert out.stdout == f"{want}  {payload}\n"
    piped = subprocess.run(["sh", str(script)], input=payload.read_bytes(), capture_output=True, check=True)
    assert piped.stdout.decode() == f"{want}  -\n"
    missing = subprocess.run(["sh", str(script), str(payload), str(tmp_path / "nope")], capture_output=True, text=True)
    assert missing.returncode == 1 and missing.stdout.startswith(want)
    if shutil.which("openssl"):
        assert "openssl" in script.read_text()  # the accelerated path is the one tested


def _bundle(tmp_path: Path, shards: int) -> Path:
    from edgedeploy.bundle import Manifest, write_manifest
    from edgedeploy.checkpoint.config import load_config

    cfg, _ = load_config(Path(__file__).parent / "data" / "reference_configs" / "llama-3-8b")
    out = tmp_path / "bundle"
    out.mkdir()
    for i in range(shards):
        (out / f"params_shard_{i}.bin").write_bytes(os.urandom((1 << 20) + 4096 * i))
    (out / "model.so").write_bytes(b"\0")
    write_manifest(out, Manifest(
        architecture=cfg.architecture, family=cfg.family, config=cfg.to_dict(), parameters=0, dtype="float16",
        target="host", target_triple="host", context_window=1, prefill_chunk=1, library="model.so",
        weights_index="params_shard_0.bin", weights_bytes=0, tokenizer_files=[], stop_token_ids=[],
        tvm_version="", edgedeploy_version="", source="", created=""))
    return out


@pytest.mark.parametrize("transport", ["tcp", "adb-server"])
def test_pipelined_push_lands_every_file_verified(tmp_path: Path, transport: str) -> None:
    """Several files, each checked on a second handle while the next is sent; a second push sends nothing."""
    from edgedeploy.devices.adb import AdbServerDevice, AdbTcpDevice
    from edgedeploy.profile.push import push_bundle, state_path
    from tests.test_virtual_phone import ADB, AdbServer, Phone

    if transport == "adb-server" and ADB is None:
        pytest.skip("Debian's adb client is not installed (apt-get install adb)")
    bundle = _bundle(tmp_path, shards=6)
    phone = Phone(tmp_path / "sandbox")
    server = AdbServer(tmp_path / "adbhome") if transport == "adb-server" else None
    try:
        if server is not None:
            server.connect(phone.serial)
            dev = AdbServerDevice(phone.serial, f"127.0.0.1:{server.port}")
        else:
            dev = AdbTcpDevice(phone.serial)
        try:
            got = push_bundle(dev, bundle, "/data/local/tmp/b")
            assert got.files_sent == 8 and got.verified_on_device and not got.retries
            again = push_bundle(dev, bundle, "/data/local/tmp/b")
            assert again.files_sent == 0 and again.files_skipped == 8 and again.files_rehashed == 0
            assert dev.stat(state_path("/data/local/tmp/b")) is not None
            assert dev.stat("/data/local/tmp/b/params_shard_5.bin").size == (1 << 20) + 4096 * 5
        finally:
            dev.close()
    finally:
        if server is not None:
            server.stop()
        phone.stop()
    landed = phone.tmp / "b"
    assert sorted(p.name for p in landed.iterdir()) == sorted(p.name for p in bundle.iterdir())
    for f in bundle.iterdir():
        assert (landed / f.name).read_bytes() == f.read_bytes(), f.name
