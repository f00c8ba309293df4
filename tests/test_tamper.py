"""Tampered or stray weights never produce tokens: on the host, in the native runner, and on a device.

Every byte a runner reads must be covered by the manifest's hashes: an unlisted file in the bundle, a
weights index naming a shard the manifest does not list, an altered shard, or a device copy that
changed after it was pushed (also with ``--keep``) is refused or replaced, and the error names the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from edgedeploy.bundle import MANIFEST, sha256_file
from edgedeploy.devices.adb import AdbTcpDevice
from edgedeploy.devices.base import DeviceError
from edgedeploy.devices.local import LocalDevice
from edgedeploy.errors import InputError
from edgedeploy.profile.push import push_bundle, state_path

from .test_native_runner import host_runner_build, run_native, run_python, write_prompt  # noqa: F401
from .test_virtual_phone import Phone

PROMPT = [1, 5, 9, 33, 100, 7]


@pytest.fixture
def bundle(host_bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(host_bundle, tmp_path / "bundle"))


def shard_of(bundle: Path) -> Path:
    return sorted(bundle.glob("params_shard_*.bin"))[0]


def flip_byte(path: Path, offset: int = 100) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def rehash_in_manifest(bundle: Path, rel: str) -> None:
    """What an attacker who edits one file and its manifest entry (but not the rest) would do."""
    m = json.loads((bundle / MANIFEST).read_text())
    m["files"][rel] = {"sha256": sha256_file(bundle / rel), "bytes": (bundle / rel).stat().st_size}
    (bundle / MANIFEST).write_text(json.dumps(m))


def repoint_index(bundle: Path, data_path: str) -> None:
    """Point the first shard of the weights index at ``data_path`` (a copy of the real shard's bytes)."""
    index = json.loads((bundle / "tensor-cache.json").read_text())
    index["records"][0]["dataPath"] = data_path
    (bundle / "tensor-cache.json").write_text(json.dumps(index))
    rehash_in_manifest(bundle, "tensor-cache.json")


def runners(native_build) -> dict[str, object]:  # noqa: ANN001
    return {"python": lambda b, p, *a: run_python(b, p, *a),
            "native": lambda b, p, *a: run_native([str(native_build.runner)], b, p, *a)}


CASES = {
    "unlisted file": (lambda b: (b / "evil.bin").write_bytes(b"x" * 64), "evil.bin is not listed"),
    "unlisted shard named by the index": (
        lambda b: (shutil.copy(shard_of(b), b / "params_shard_99.bin"), repoint_index(b, "params_shard_99.bin")),
        "params_shard_99.bin"),
    "index escapes the bundle": (
        lambda b: (shutil.copy(shard_of(b), b.parent / "outside.bin"), repoint_index(b, "../outside.bin")),
        "../outside.bin"),
    "shard replaced by a link": (
        lambda b: (shutil.copy(shard_of(b), b.parent / "real.bin"), shard_of(b).unlink(),
                   Path(b / "params_shard_0.bin").symlink_to(b.parent / "real.bin")),
        "params_shard_0.bin"),
    "shard grew": (lambda b: shard_of(b).open("ab").write(b"\0" * 16), "params_shard_0.bin was altered"),
}


@pytest.mark.parametrize("runner", ["python", "native"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_runner_refuses_tampered_bundle(case: str, runner: str, bundle: Path, tmp_path: Path,
                                        request: pytest.FixtureRequest) -> None:
    if runner == "native":
        build = request.getfixturevalue("host_runner_build")
    tamper, needle = CASES[case]
    assert shard_of(bundle).name == "params_shard_0.bin"
    tamper(bundle)
    prompt = write_prompt(tmp_path / "p.json", PROMPT, max_new_tokens=4)
    # --no-verify (what a device run uses) skips only the re-hash: these must be caught without it.
    run = run_python if runner == "python" else (lambda b, p, *a: run_native([str(build.runner)], b, p, *a))
    r = run(bundle, prompt, "--no-verify")
    assert r["exit_code"] == 2 and needle in r["error"], r
    assert not r.get("token_ids")


def test_same_size_alteration_is_caught_by_the_hash(bundle: Path, tmp_path: Path) -> None:
    flip_byte(shard_of(bundle))
    r = run_python(bundle, write_prompt(tmp_path / "p.json", PROMPT, max_new_tokens=4))
    assert r["exit_code"] == 2 and "params_shard_0.bin was altered (sha256" in r["error"]


# -- on a device -------------------------------------------------------------------------------------


@pytest.fixture
def phone(tmp_path: Path):
    p = Phone(tmp_path / "sandbox")
    yield p
    p.stop()


def device_file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_kept_copy_changed_on_device_is_rehashed_and_replaced(bundle: Path, phone: Phone) -> None:
    remote = "/data/local/tmp/edgedeploy/bundles/b"
    on_host = phone.tmp / "edgedeploy/bundles/b"
    with AdbTcpDevice(f"127.0.0.1:{phone.port}") as dev:
        first = push_bundle(dev, bundle, remote)
        assert first.files_sent == len(json.loads((bundle / MANIFEST).read_text())["files"]) + 1
        # --keep, then the device copy is altered (same size; its mtime moves as any write's does).
        target = on_host / "params_shard_0.bin"
        flip_byte(target)
        st = target.stat()
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10**9))
        (on_host / "stray.bin").write_bytes(b"left over")
        again = push_bundle(dev, bundle, remote)
        assert again.changed_on_device == ["params_shard_0.bin"] and again.files_sent == 1
        assert again.removed_unlisted == 1 and not (on_host / "stray.bin").exists()
        assert device_file_sha(target) == sha256_file(shard_of(bundle))
        # Nothing changed: nothing is hashed or sent.
        quiet = push_bundle(dev, bundle, remote)
        assert (quiet.files_sent, quiet.files_rehashed, quiet.changed_on_device) == (0, 0, [])
        # A change that kept size and mtime is found when asked to re-hash (--reverify).
        st = target.stat()
        flip_byte(target, 200)
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
        asked = push_bundle(dev, bundle, remote, rehash=True)
        assert asked.changed_on_device == ["params_shard_0.bin"] and asked.files_sent == 1
        assert device_file_sha(target) == sha256_file(shard_of(bundle))
    assert (phone.tmp / "edgedeploy/bundles/.b.edgedeploy-pushed.json").is_file()
    assert state_path(remote).endswith("/bundles/.b.edgedeploy-pushed.json")


def test_local_alteration_is_named_as_local(bundle: Path, tmp_path: Path) -> None:
    flip_byte(shard_of(bundle))  # same size: only the device's hash can see it
    with LocalDevice(tmp_path / "dev") as dev, pytest.raises(InputError, match="differs locally"):
        push_bundle(dev, bundle, str(tmp_path / "dev" / "b"))


class CorruptingDevice(LocalDevice):
    """The host as a device whose transfers flip one byte of every weight shard (a bad cable, a bad card)."""

    def push(self, local: Path, remote: str, progress=None) -> None:  # noqa: ANN001
        Path(remote).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local, remote)  # a copy, not LocalDevice's hard link to the bundle's own file
        if "params_shard" in remote:
            flip_byte(Path(remote), 10)


def test_corrupt_transfer_is_named_as_corrupt(bundle: Path, tmp_path: Path) -> None:
    with CorruptingDevice(tmp_path / "dev") as dev, pytest.raises(DeviceError, match="arrived corrupt"):
        push_bundle(dev, bundle, str(tmp_path / "dev" / "b"), retries=1)


def test_profile_keep_then_tamper_runs_verified_weights(bundle: Path, phone: Phone, tmp_path: Path) -> None:
    from edgedeploy.cli import main

    args = ["profile", str(bundle), "--device", f"tcp:127.0.0.1:{phone.port}", "--prompts", "chat-short",
            "--runs", "1", "--warmup", "0", "--keep"]
    assert main([*args, "--out", str(tmp_path / "r1")]) == 0
    target = phone.tmp / "edgedeploy/bundles/bundle/params_shard_0.bin"
    flip_byte(target)
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10**9))
    assert main([*args, "--out", str(tmp_path / "r2")]) == 0
    model = json.loads((tmp_path / "r2" / "results.json").read_text())["models"][0]
    assert model["push"]["changed_on_device"] == ["params_shard_0.bin"]
    assert {c["name"]: c["status"] for c in model["checks"]}["parity"] == "PASS"
    assert device_file_sha(target) == sha256_file(shard_of(bundle))


def test_profile_reverify_finds_a_change_that_kept_size_and_mtime(bundle: Path, phone: Phone, tmp_path: Path) -> None:
    from edgedeploy.cli import main

    args = ["profile", str(bundle), "--device", f"tcp:127.0.0.1:{phone.port}", "--prompts", "chat-short",
            "--runs", "1", "--warmup", "0", "--keep"]
    assert main([*args, "--out", str(tmp_path / "r1")]) == 0
    target = phone.tmp / "edgedeploy/bundles/bundle/params_shard_0.bin"
    st = target.stat()
    flip_byte(target)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert main([*args, "--reverify", "--out", str(tmp_path / "r2")]) == 0
    model = json.loads((tmp_path / "r2" / "results.json").read_text())["models"][0]
    assert model["push"]["changed_on_device"] == ["params_shard_0.bin"]
    assert model["push"]["files_rehashed"] >= len(json.loads((bundle / MANIFEST).read_text())["files"])
