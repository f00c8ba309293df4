"""Profiling with the native runner: the aarch64 build on a virtual arm64 phone (qemu-user), the host
build on a virtual phone of this host's ABI, and the refusals when bundle target and device disagree."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from edgedeploy.cli import main
from edgedeploy.compile.build import build_bundle

from .test_native_runner import _aarch64_tools_missing, host_runner_build  # noqa: F401 - fixture
from .test_virtual_phone import REPO_ROOT, Phone

FAST = ["--prompts", "chat-short", "--runs", "1", "--warmup", "0"]
needs_cmake = pytest.mark.skipif(shutil.which("cmake") is None,
                                 reason="cmake not installed (Debian package cmake; CI installs it)")


@pytest.fixture(scope="module")
def aarch64_bundle(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    why = _aarch64_tools_missing()
    if why:
        pytest.skip(why)
    out = tmp_path_factory.mktemp("arm") / "llama-aarch64"
    # Same model, context and chunk as the host_bundle fixture: its tokens are the reference.
    build_bundle(tiny_models["llama"], out, target="linux-aarch64", context_window=128, prefill_chunk=32)
    return out


def test_aarch64_runner_on_arm64_virtual_phone(aarch64_bundle: Path, host_bundle: Path, tmp_path: Path,
                                               capsys) -> None:
    phone = Phone(tmp_path / "sandbox", "--abi", "arm64-v8a")
    try:
        rc = main(["profile", str(aarch64_bundle), "--device", f"tcp:127.0.0.1:{phone.port}",
                   "--reference", str(host_bundle), "--out", str(tmp_path / "r"), *FAST])
        leftovers = [p for p in (phone.tmp / "edgedeploy").rglob("*") if p.is_file()]
    finally:
        phone.stop()
    assert rc == 0, capsys.readouterr().err
    model = json.loads((tmp_path / "r" / "results.json").read_text())["models"][0]
    assert model["verdict"] == "PASS"
    assert model["runner"] == {"kind": "native", "abi": "arm64-v8a", "elf_machine": "aarch64"}
    assert model["device"]["abi"] == "arm64-v8a"
    run = model["prompts"][0]["runs"][0]
    assert run["runner"] == "native" and run["runner_abi"] == "aarch64" and run["target"] == "linux-aarch64"
    assert run["token_ids"] == model["prompts"][0]["reference"]["token_ids"]  # identical to the host run
    assert {c["name"]: c["status"] for c in model["checks"]}["parity"] == "PASS"
    assert "ELF aarch64" in (tmp_path / "r" / "report.md").read_text()
    assert leftovers == []  # runner, linked model.so and bundle removed without --keep


@needs_cmake
def test_host_native_runner_on_virtual_phone(host_bundle: Path, tmp_path: Path, capsys) -> None:
    phone = Phone(tmp_path / "sandbox")
    try:
        rc = main(["profile", str(host_bundle), "--device", f"tcp:127.0.0.1:{phone.port}", "--runner", "native",
                   "--out", str(tmp_path / "r"), *FAST])
    finally:
        phone.stop()
    assert rc == 0, capsys.readouterr().err
    model = json.loads((tmp_path / "r" / "results.json").read_text())["models"][0]
    assert model["runner"]["kind"] == "native" and model["runner"]["elf_machine"] == "x86_64"
    run = model["prompts"][0]["runs"][0]
    # The native runner carries no Python interpreter: its peak is far below the Python runner's ~80 MiB.
    assert run["runner"] == "native" and run["peak_rss_bytes"] < 60 * 2**20
    assert {c["name"]: c["status"] for c in model["checks"]}["parity"] == "PASS"


def test_target_and_device_must_match(host_bundle: Path, aarch64_bundle: Path, tmp_path: Path, capsys) -> None:
    arm = Phone(tmp_path / "arm", "--abi", "arm64-v8a")
    x86 = Phone(tmp_path / "x86")
    try:
        rc = main(["profile", str(host_bundle), "--device", f"tcp:127.0.0.1:{arm.port}", *FAST])
        err = capsys.readouterr().err
        assert rc == 2 and "host (x86_64) build and cannot run on this device (ABI arm64-v8a)" in err
        rc = main(["profile", str(aarch64_bundle), "--device", f"tcp:127.0.0.1:{x86.port}", *FAST])
        err = capsys.readouterr().err
        assert rc == 2 and "targets linux-aarch64 (aarch64) but the device's ABI is x86_64" in err
    finally:
        arm.stop()
        x86.stop()


@needs_cmake
def test_package_host_runner_and_android_errors(tmp_path: Path, capsys) -> None:
    assert main(["package", "--abi", "host", "--out", str(tmp_path / "host")]) == 0
    names = {p.name for p in (tmp_path / "host").iterdir() if p.is_file()}
    assert names == {"edgedeploy-runner", "libtvm_runtime.so", "libtvm_ffi.so"}
    capsys.readouterr()
    assert main(["package", "--out", str(tmp_path / "a")]) == 2
    assert "needs --ndk" in capsys.readouterr().err
    assert main(["package", "--out", str(tmp_path / "a"), "--ndk", str(tmp_path), "--tvm-source", str(tmp_path)]) == 2
    assert "not an Android NDK" in capsys.readouterr().err


# -- the harness app, emulated by the virtual phone with the host native runner ---------------------

def test_app_harness_pass_kill_and_not_installed(host_bundle: Path, host_runner_build, tmp_path: Path,  # noqa: F811
                                                 capsys) -> None:
    app_dir = str(host_runner_build.runner.parent)
    phone = Phone(tmp_path / "ok", "--app-harness", app_dir)
    try:
        rc = main(["profile", str(host_bundle), "--device", f"tcp:127.0.0.1:{phone.port}", "--harness", "app",
                   "--prompts", "chat-short", "--runs", "2", "--warmup", "1", "--out", str(tmp_path / "r")])
        app_files = phone.sandbox / "sdcard/Android/data/ai.edgedeploy.harness/files"
        leftovers = [p for p in app_files.rglob("*") if p.is_file()]
    finally:
        phone.stop()
    assert rc == 0, capsys.readouterr().err
    model = json.loads((tmp_path / "r" / "results.json").read_text())["models"][0]
    assert model["harness"] == "app" and model["runner"]["kind"] == "app"
    prompt = model["prompts"][0]
    assert len(prompt["warmup"]) == 1 and len(prompt["runs"]) == 2
    assert prompt["runs"][0]["runner"] == "native"
    assert prompt["runs"][0]["token_ids"] == prompt["reference"]["token_ids"]
    assert leftovers == []

    # The native runner of a tiny model lives ~20 ms, too briefly for the phone's 20 ms memory watch to
    # be sure to see it; an "app" that runs the Python runner (~80 MiB for a second) meets the budget surely.
    slow_app = tmp_path / "slow-app"
    slow_app.mkdir()
    script = slow_app / "edgedeploy-runner"
    script.write_text(f"#!/bin/sh\nexec env TVM_USE_RUNTIME_LIB=1 PYTHONPATH={REPO_ROOT} {sys.executable} "
                      "-m edgedeploy.runtime.runner \"$@\"\n")
    script.chmod(0o755)
    phone = Phone(tmp_path / "tight", "--app-harness", str(slow_app), "--budget-mb", "40")
    try:
        rc = main(["profile", str(host_bundle), "--device", f"tcp:127.0.0.1:{phone.port}", "--harness", "app",
                   "--prompts", "chat-short", "--runs", "1", "--warmup", "0", "--out", str(tmp_path / "k")])
    finally:
        phone.stop()
    assert rc == 1
    model = json.loads((tmp_path / "k" / "results.json").read_text())["models"][0]
    assert "app killed at" in " ".join(model["reasons"]) and "lowmemorykiller" in " ".join(model["reasons"])

    capsys.readouterr()
    phone = Phone(tmp_path / "none")
    try:
        rc = main(["profile", str(host_bundle), "--device", f"tcp:127.0.0.1:{phone.port}", "--harness", "app"])
    finally:
        phone.stop()
    assert rc == 2 and "harness app ai.edgedeploy.harness is not installed" in capsys.readouterr().err
