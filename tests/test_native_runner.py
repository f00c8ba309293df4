"""The native C++ runner (android_template/runner) against the Python runner.

Host build: token ids and result fields identical to ``python -m edgedeploy.runtime.runner`` on a tiny
bundle of every family, and the same guards. aarch64 build: cross-compiled against PyPI's aarch64
wheels and run under qemu-user on a ``linux-aarch64`` bundle, same tokens as the host. Android: only the
command and its error paths (no NDK here).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgedeploy.runtime import native
from edgedeploy.runtime.launch import parse_result
from edgedeploy.tiny import FAMILIES

CONTEXT, CHUNK = 128, 32
#: 40 tokens: two prefill chunks of 32 and 8.
PROMPT = [1, 5, 9, 33, 100, 7, *range(8, 42)]
MAX_NEW = 12


#: Built once per session even when test_jni.py imports these fixtures (pytest then holds two
#: definitions of each; conftest.py is not this file's to extend).
_SESSION: dict[str, object] = {}


@pytest.fixture(scope="session")
def host_runner_build(tmp_path_factory: pytest.TempPathFactory) -> native.RunnerBuild:
    """The runner and, when a JDK is there, the JNI bridge, built once for the host."""
    if "runner" not in _SESSION:
        for tool, pkg in (("cmake", "cmake"), ("g++", "g++")):
            if not shutil.which(tool):
                pytest.skip(f"{tool} not installed (Debian package {pkg}; CI installs it from .ci/apt-packages.txt)")
        jni = shutil.which("javac") is not None
        _SESSION["runner"] = native.build_host_runner(tmp_path_factory.mktemp("native-host"), jni=jni)
    return _SESSION["runner"]  # type: ignore[return-value]


@pytest.fixture(scope="session")
def family_bundles(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A host bundle of every family (context 128, prefill chunk 32)."""
    if "bundles" not in _SESSION:
        from edgedeploy.compile.build import build_bundle

        root = tmp_path_factory.mktemp("native-bundles")
        out = {}
        for fam in FAMILIES:
            out[fam] = root / fam
            build_bundle(tiny_models[fam], out[fam], target="host", context_window=CONTEXT, prefill_chunk=CHUNK)
        _SESSION["bundles"] = out
    return _SESSION["bundles"]  # type: ignore[return-value]


def write_prompt(path: Path, ids: list[int], **extra: object) -> Path:
    path.write_text(json.dumps({"token_ids": ids, **extra}))
    return path


def run_python(bundle: Path, prompt_file: Path, *args: str) -> dict:
    env = {**os.environ, "TVM_USE_RUNTIME_LIB": "1"}
    proc = subprocess.run([sys.executable, "-m", "edgedeploy.runtime.runner", str(bundle), "--prompt-file",
                           str(prompt_file), *args], capture_output=True, text=True, env=env, timeout=300)
    return parse_result(proc.stdout, proc.returncode, proc.stderr)


def run_native(argv: list[str], bundle: Path, prompt_file: Path, *args: str) -> dict:
    proc = subprocess.run([*argv, str(bundle), "--prompt-file", str(prompt_file), *args],
                          capture_output=True, text=True, timeout=300)
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, (proc.stdout, proc.stderr)  # exactly ONE result line, even on errors
    return parse_result(proc.stdout, proc.returncode, proc.stderr)


SAME_FIELDS = ("schema_version", "runner_abi", "threads", "target", "dtype", "context_window", "kv_bytes_per_token",
               "prompt_tokens", "token_ids", "finish_reason", "prefill_tokens", "decode_tokens", "kv_touched", "error")


@pytest.mark.parametrize("family", FAMILIES)
def test_host_native_matches_python(family: str, family_bundles: dict[str, Path],
                                    host_runner_build: native.RunnerBuild, tmp_path: Path) -> None:
    bundle = family_bundles[family]
    prompt = write_prompt(tmp_path / "p.json", PROMPT, max_new_tokens=MAX_NEW, stop_token_ids=[])
    py = run_python(bundle, prompt, "--threads", "2")
    nat = run_native([str(host_runner_build.runner)], bundle, prompt, "--threads", "2")
    assert py["error"] is None and py["exit_code"] == 0
    assert nat["exit_code"] == 0 and nat["runner"] == "native"
    assert set(nat) == set(py), "the native result line must have the Python runner's fields"
    for key in SAME_FIELDS:
        assert nat[key] == py[key], key
    assert len(nat["token_ids"]) == MAX_NEW and nat["decode_tokens"] == MAX_NEW - 1
    assert nat["pid"] != py["pid"]
    for key in ("load_s", "ttft_s", "prefill_tok_s", "decode_tok_s"):
        assert isinstance(nat[key], float) and nat[key] > 0, key
    # A native process holds no Python or compiler: far below the Python runner's ~80 MB.
    assert 0 < nat["peak_rss_bytes"] < py["peak_rss_bytes"]
    assert nat["maxrss_bytes"] > 0 and 0 < nat["rss_bytes"] <= nat["peak_rss_bytes"]


def test_host_native_touch_kv_and_cache_full(family_bundles: dict[str, Path], host_runner_build: native.RunnerBuild,
                                             tmp_path: Path) -> None:
    bundle = family_bundles["llama"]
    prompt = write_prompt(tmp_path / "p.json", PROMPT, max_new_tokens=500, stop_token_ids=[])
    py = run_python(bundle, prompt, "--touch-kv")
    nat = run_native([str(host_runner_build.runner)], bundle, prompt, "--touch-kv")
    assert nat["finish_reason"] == py["finish_reason"] == "context"  # the cache filled before 500 tokens
    assert nat["token_ids"] == py["token_ids"] and len(nat["token_ids"]) == CONTEXT - len(PROMPT) + 1
    assert nat["kv_touched"] is True
    # --max-new-tokens overrides the prompt file; a stop id ends generation early.
    first = nat["token_ids"][0]
    stop = write_prompt(tmp_path / "s.json", PROMPT, max_new_tokens=5, stop_token_ids=[nat["token_ids"][2]])
    nat2 = run_native([str(host_runner_build.runner)], bundle, stop, "--max-new-tokens", "9")
    py2 = run_python(bundle, stop, "--max-new-tokens", "9")
    assert nat2["token_ids"] == py2["token_ids"] and nat2["token_ids"][0] == first
    assert nat2["finish_reason"] == py2["finish_reason"] == "stop"


@pytest.mark.parametrize("case", ["too_long", "out_of_vocab", "not_json", "no_ids", "no_bundle", "bare_list"])
def test_host_native_guards(case: str, family_bundles: dict[str, Path], host_runner_build: native.RunnerBuild,
                            tmp_path: Path) -> None:
    bundle = family_bundles["qwen2"]
    prompt = tmp_path / "p.json"
    if case == "too_long":
        write_prompt(prompt, [3] * (CONTEXT + 1))
    elif case == "out_of_vocab":
        write_prompt(prompt, [1, 2, 100000])
    elif case == "not_json":
        prompt.write_text("{token_ids: [1")
    elif case == "no_ids":
        write_prompt(prompt, [])
    elif case == "bare_list":
        prompt.write_text(json.dumps(PROMPT[:5]))
    if case == "no_bundle":
        write_prompt(prompt, [1, 2])
        bundle = tmp_path / "missing"
    py = run_python(bundle, prompt, "--max-new-tokens", "3")
    nat = run_native([str(host_runner_build.runner)], bundle, prompt, "--max-new-tokens", "3")
    assert nat["exit_code"] == py["exit_code"]
    assert nat.get("error_kind") == py.get("error_kind")
    if case == "bare_list":
        assert nat["error"] is None and nat["token_ids"] == py["token_ids"]
        return
    assert nat["exit_code"] == 2 and nat["error"]
    assert "token_ids" not in nat
    expected = {"too_long": "longer than the context window", "out_of_vocab": "outside the vocabulary",
                "not_json": "not valid JSON", "no_ids": "non-empty list", "no_bundle": "no such bundle folder"}[case]
    assert expected in nat["error"] and expected in py["error"]


def test_host_native_usage_and_bad_library(family_bundles: dict[str, Path], host_runner_build: native.RunnerBuild,
                                           tmp_path: Path) -> None:
    runner = str(host_runner_build.runner)
    proc = subprocess.run([runner, "--bogus"], capture_output=True, text=True)
    line = json.loads(proc.stdout)
    assert proc.returncode == 2 and "unknown option --bogus" in line["error"] and line["runner"] == "native"
    prompt = write_prompt(tmp_path / "p.json", [1, 2])
    junk = tmp_path / "junk.so"
    junk.write_bytes(b"not an ELF file")
    nat = run_native([runner], family_bundles["llama"], prompt, "--library", str(junk))
    assert nat["exit_code"] == 2 and "cannot load model library" in nat["error"]
    # A .tar library (phone objects) without a linked .so beside it is named, not crashed on.
    tar_bundle = tmp_path / "tarbundle"
    shutil.copytree(family_bundles["llama"], tar_bundle)
    manifest = json.loads((tar_bundle / "bundle.json").read_text())
    manifest["library"] = "model.tar"
    manifest["files"]["model.tar"] = manifest["files"].pop("model.so")
    (tar_bundle / "model.so").rename(tar_bundle / "model.tar")
    (tar_bundle / "bundle.json").write_text(json.dumps(manifest))
    nat = run_native([runner], tar_bundle, prompt)
    assert nat["exit_code"] == 2 and "link_aarch64_library" in nat["error"]


# -- aarch64 Linux under qemu-user --------------------------------------------------------------------

def _aarch64_tools_missing() -> str | None:
    for tool, pkg in (("cmake", "cmake"), (native.AARCH64_CXX, "g++-aarch64-linux-gnu"), ("qemu-aarch64", "qemu-user")):
        if not shutil.which(tool):
            return f"{tool} not installed (Debian package {pkg}; CI installs it from .ci/apt-packages.txt)"
    if not Path(native.AARCH64_SYSROOT, "lib", "ld-linux-aarch64.so.1").exists():
        return "no aarch64 C library (Debian package libc6-dev-arm64-cross)"
    return None


@pytest.fixture(scope="session")
def aarch64_runner_build(tmp_path_factory: pytest.TempPathFactory) -> native.RunnerBuild:
    why = _aarch64_tools_missing()
    if why:
        pytest.skip(why)
    # The wheels (~100 MB) are downloaded once per machine into the user cache.
    return native.build_aarch64_runner(tmp_path_factory.mktemp("native-aarch64"))


def test_aarch64_native_under_qemu_matches_host(tiny_models: dict[str, Path], family_bundles: dict[str, Path],
                                                aarch64_runner_build: native.RunnerBuild,
                                                host_runner_build: native.RunnerBuild, tmp_path: Path) -> None:
    from edgedeploy.compile.build import build_bundle

    bundle = tmp_path / "llama-aarch64"
    build_bundle(tiny_models["llama"], bundle, target="linux-aarch64", context_window=CONTEXT, prefill_chunk=CHUNK)
    assert (bundle / "model.tar").is_file()
    so = native.link_aarch64_library(bundle / "model.tar")
    assert so == bundle / "model.so"
    assert so.read_bytes()[:4] == b"\x7fELF" and so.read_bytes()[18] == 183  # e_machine EM_AARCH64
    prompt = write_prompt(tmp_path / "p.json", PROMPT, max_new_tokens=MAX_NEW, stop_token_ids=[])
    argv = native.runner_command(aarch64_runner_build.runner, bundle, prompt, max_new_tokens=MAX_NEW, threads=2)
    assert argv[1:] == [str(bundle), "--prompt-file", str(prompt), "--max-new-tokens", str(MAX_NEW), "--threads", "2"]
    arm = run_native(native.qemu_command([str(aarch64_runner_build.runner)]), bundle, prompt)
    host = run_native([str(host_runner_build.runner)], family_bundles["llama"], prompt)
    assert arm["exit_code"] == 0, arm
    assert arm["runner_abi"] == "aarch64" and arm["target"] == "linux-aarch64"
    assert arm["token_ids"] == host["token_ids"]
    assert arm["finish_reason"] == host["finish_reason"] and arm["decode_tokens"] == host["decode_tokens"]
    assert arm["peak_rss_bytes"] > 0
    assert [p.name for p in aarch64_runner_build.files_to_push()] == ["edgedeploy-runner", *native.RUNTIME_LIBS]


# -- Android: the command and its errors (no NDK here) ------------------------------------------------

def _fake_ndk(root: Path) -> Path:
    ndk = root / "ndk"
    (ndk / "build" / "cmake").mkdir(parents=True)
    (ndk / "build" / "cmake" / "android.toolchain.cmake").write_text("# fake\n")
    return ndk


def _fake_tvm(root: Path, opencl: bool) -> Path:
    tvm = root / "tvm"
    files = ["CMakeLists.txt", "src/runtime/vm/paged_kv_cache.cc", "include/tvm/runtime/base.h",
             "3rdparty/tvm-ffi/CMakeLists.txt"] + (["src/runtime/opencl/opencl_module.cc"] if opencl else [])
    for f in files:
        (tvm / f).parent.mkdir(parents=True, exist_ok=True)
        (tvm / f).write_text("")
    return tvm


def test_android_cmake_command(tmp_path: Path) -> None:
    ndk, tvm = _fake_ndk(tmp_path), _fake_tvm(tmp_path, opencl=True)
    cmd = native.android_cmake_command(ndk, tvm, tmp_path / "out", opencl=True, jni=True)
    assert cmd[:3] == ["cmake", "-S", str(native.runner_source_dir())]
    for define in (f"-DCMAKE_TOOLCHAIN_FILE={ndk.resolve()}/build/cmake/android.toolchain.cmake",
                   "-DANDROID_ABI=arm64-v8a", "-DANDROID_PLATFORM=android-28", "-DANDROID_STL=c++_shared",
                   f"-DTVM_SOURCE_DIR={tvm.resolve()}", "-DEDGEDEPLOY_OPENCL=ON", "-DEDGEDEPLOY_JNI=ON"):
        assert define in cmd
    # The host builds differ only in these defines: same source folder, same CMakeLists.
    assert not any(c.startswith("-DTVM_PREBUILT_DIR") for c in cmd)


def test_android_cmake_command_errors(tmp_path: Path) -> None:
    ndk = _fake_ndk(tmp_path)
    with pytest.raises(native.ToolMissing, match="not an Android NDK"):
        native.android_cmake_command(tmp_path / "nondk", tmp_path, tmp_path / "out")
    with pytest.raises(native.ToolMissing, match="not a usable TVM source tree.*paged_kv_cache.cc"):
        native.android_cmake_command(ndk, tmp_path / "empty", tmp_path / "out")
    tvm = _fake_tvm(tmp_path, opencl=False)
    native.android_cmake_command(ndk, tvm, tmp_path / "out")  # CPU build: fine
    with pytest.raises(native.ToolMissing, match="OpenCL"):
        native.android_cmake_command(ndk, tvm, tmp_path / "out", opencl=True)
    with pytest.raises(native.ToolMissing, match="clang"):
        native.link_android_library(tmp_path / "model.tar", ndk)


def test_cmake_rejects_missing_tvm_source(tmp_path: Path) -> None:
    """The CMakeLists itself names a missing TVM tree (what an Android Studio build would show)."""
    if not shutil.which("cmake"):
        pytest.skip("cmake not installed")
    proc = subprocess.run(native.cmake_configure_command(tmp_path / "b", {"TVM_SOURCE_DIR": str(tmp_path / "no")}),
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "is not a TVM source tree" in proc.stderr
