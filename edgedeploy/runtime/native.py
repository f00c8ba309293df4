"""Build the native runner (``android_template/runner``) for the host, aarch64 Linux and Android.

One CMake project, three builds; only the toolchain file and where the TVM runtime comes from differ:

* host x86-64: the installed wheels' ``libtvm_runtime.so``/``libtvm_ffi.so`` (:func:`build_host_runner`);
* aarch64 Linux (glibc): the same libraries from PyPI's aarch64 wheels, cross-compiled with Debian's
  ``g++-aarch64-linux-gnu`` and run under ``qemu-aarch64 -L /usr/aarch64-linux-gnu``
  (:func:`build_aarch64_runner`, :func:`qemu_command`);
* Android arm64-v8a: the NDK's toolchain file, and the runtime compiled from a TVM source tree the user
  provides (:func:`android_cmake_command`), because the wheels hold no bionic build and their sources are
  incomplete.

A bundle built for ``linux-aarch64`` or ``android`` holds ``model.tar`` (aarch64 ELF objects). It is
linked into ``model.so`` beside the tar, for the C library that will load it, by
:func:`link_aarch64_library` (glibc) or :func:`link_android_library` (bionic, NDK clang); the native
runner loads ``model.so`` when the manifest names ``model.tar``. Linking at deploy time keeps bundles
free of any toolchain and keeps the manifest's hashes valid (``model.so`` is not one of its files).

Every build returns a :class:`RunnerBuild`: the runner binary and the runtime libraries that must be
pushed beside it (the binary's RUNPATH is ``$ORIGIN``).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from edgedeploy.errors import EdgeDeployError, InputError

RUNNER_NAME = "edgedeploy-runner"
JNI_LIB_NAME = "libedgedeploy_jni.so"
RUNTIME_LIBS = ("libtvm_runtime.so", "libtvm_ffi.so")
AARCH64_CXX = "aarch64-linux-gnu-g++"
AARCH64_SYSROOT = "/usr/aarch64-linux-gnu"
#: PyPI platform tag of the aarch64 wheels (glibc 2.28+, so Debian 10+/Ubuntu 20.04+ and qemu-user).
AARCH64_PLATFORM = "manylinux_2_28_aarch64"
ANDROID_ABI = "arm64-v8a"
ANDROID_MIN_API = 28


class ToolMissing(EdgeDeployError):
    """A compiler, emulator, NDK or source tree that a native build needs is not there (exit code 2)."""

    exit_code = 2


class NativeBuildFailed(EdgeDeployError):
    """CMake, the compiler or the linker failed, or the disk filled up under them: a tool error (exit code 2).

    The message is one line: the step, how the tool ended, and the line of its output that says why.
    """

    exit_code = 2


@dataclass
class RunnerBuild:
    """A built runner: what to run, and what to push beside it to a device."""

    runner: Path
    abi: str
    #: Shared libraries the runner needs at run time (pushed into the runner's folder).
    libs: list[Path] = field(default_factory=list)
    #: The JNI bridge library, when built.
    jni: Path | None = None

    def files_to_push(self) -> list[Path]:
        return [self.runner, *self.libs]


def runner_source_dir() -> Path:
    """``android_template/runner`` of this checkout (override: ``EDGEDEPLOY_RUNNER_SRC``)."""
    env = os.environ.get("EDGEDEPLOY_RUNNER_SRC")
    src = Path(env) if env else Path(__file__).resolve().parents[2] / "android_template" / "runner"
    if not (src / "CMakeLists.txt").is_file():
        raise ToolMissing(f"{src}: no runner sources (CMakeLists.txt); set EDGEDEPLOY_RUNNER_SRC to "
                          "android_template/runner of an edgedeploy checkout")
    return src


def _package_dir(name: str) -> Path:
    """Folder of an installed package, found without importing it (importing tvm pulls in torch)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ToolMissing(f"the Python package {name!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


@dataclass(frozen=True)
class TvmPrebuilt:
    """Where the runtime libraries and the tvm-ffi headers are."""

    runtime_dir: Path  # libtvm_runtime.so
    ffi_lib_dir: Path  # libtvm_ffi.so
    ffi_include: Path

    def libs(self) -> list[Path]:
        return [self.runtime_dir / RUNTIME_LIBS[0], self.ffi_lib_dir / RUNTIME_LIBS[1]]


def host_tvm() -> TvmPrebuilt:
    """The installed wheels' runtime (host architecture)."""
    tvm_dir, ffi_dir = _package_dir("tvm"), _package_dir("tvm_ffi")
    found = TvmPrebuilt(tvm_dir / "lib", ffi_dir / "lib", ffi_dir / "include")
    for lib in found.libs():
        if not lib.is_file():
            raise ToolMissing(f"{lib}: missing from the installed TVM wheels")
    return found


def _which(tool: str, why: str) -> str:
    path = shutil.which(tool)
    if not path:
        raise ToolMissing(f"{tool} not found: {why}")
    return path


#: Lines that only report that something above them failed (collect2 after ld, ninja and make after a
#: compiler, CMake's epilogue); the line worth quoting is an earlier one.
_SUMMARY_LINE = re.compile(r"collect2: error: ld returned|ninja: build stopped|make(\[\d+\])?: \*\*\*"
                           r"|clang(\+\+)?: error: linker command failed|compilation terminated"
                           r"|^\d+ errors? generated|Configuring incomplete|^FAILED: ")
_TELLING_WORDS = re.compile(r"error|failed|fatal|cannot|can't|no space|too large|denied|not found", re.IGNORECASE)


def telling_line(output: str, limit: int = 300) -> str:
    """The line of a tool's output that says what went wrong, for a one-line message.

    The last line that mentions an error and is not a mere summary of one (``collect2: error: ld
    returned 1 exit status``), else the last non-empty line ("" when there is none); cut to ``limit``
    characters.
    """
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    own = [ln for ln in lines if not _SUMMARY_LINE.search(ln)]
    telling = [ln for ln in own if _TELLING_WORDS.search(ln)]
    line = (telling or own or lines or [""])[-1]
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _ended(returncode: int) -> str:
    """``exit 1``, or ``killed by SIGXFSZ: file size limit exceeded`` for a tool that a signal ended."""
    if returncode >= 0:
        return f"exit {returncode}"
    try:
        sig = signal.Signals(-returncode)
    except ValueError:
        return f"killed by signal {-returncode}"
    return f"killed by {sig.name}: {(signal.strsignal(sig) or '').lower()}".rstrip(": ")


def _save_log(log: Path, cmd: list[str], output: str) -> Path | None:
    """Write a failed step's command and full output to ``log``; None when that fails too (a full disk)."""
    try:
        log.write_text(f"$ {' '.join(cmd)}\n{output}", encoding="utf-8")
    except OSError:
        return None
    return log


def _run(cmd: list[str], what: str, cwd: Path | None = None, log: Path | None = None) -> None:
    """Run one build step; :class:`NativeBuildFailed` in one line when it cannot start or fails.

    A compiler's diagnostics do not fit on one line: with ``log`` the full output is saved there and the
    message names it.
    """
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, errors="replace")
    except OSError as e:
        raise NativeBuildFailed(f"{what}: cannot start {cmd[0]} ({e.strerror or e})") from None
    if proc.returncode != 0:
        # stderr last: compilers and linkers print their verdict there.
        output = proc.stdout + ("\n" if proc.stdout else "") + proc.stderr
        saved = _save_log(log, cmd, output) if log else None
        line = telling_line(output)
        raise NativeBuildFailed(f"{what} failed ({_ended(proc.returncode)})" + (f": {line}" if line else "")
                                + (f" (full output: {saved})" if saved else ""))


@contextmanager
def _os_step(what: str) -> Iterator[None]:
    """Turn an OSError inside ``what`` (disk full, file too large, a path that is not a folder) into a
    one-line :class:`NativeBuildFailed` naming the step and the file."""
    try:
        yield
    except OSError as e:
        on = f" ({e.filename})" if e.filename else ""
        raise NativeBuildFailed(f"{what} failed: {e.strerror or e}{on}") from None


def cmake_configure_command(build_dir: Path, defines: dict[str, str], source_dir: Path | None = None) -> list[str]:
    """``cmake -S <runner> -B <build_dir> -D...`` (Ninja when installed, else the default generator)."""
    cmd = ["cmake", "-S", str(source_dir or runner_source_dir()), "-B", str(build_dir)]
    if shutil.which("ninja"):
        cmd += ["-G", "Ninja"]
    return cmd + [f"-D{k}={v}" for k, v in defines.items()]


def _prebuilt_defines(tvm: TvmPrebuilt) -> dict[str, str]:
    return {"TVM_PREBUILT_DIR": str(tvm.runtime_dir), "TVM_FFI_LIB_DIR": str(tvm.ffi_lib_dir),
            "TVM_FFI_INCLUDE_DIR": str(tvm.ffi_include), "CMAKE_BUILD_TYPE": "Release"}


def jdk_include_dir() -> Path:
    """The JDK's include folder (``jni.h``), from ``JAVA_HOME`` or the ``javac`` on PATH."""
    homes = [Path(os.environ["JAVA_HOME"])] if os.environ.get("JAVA_HOME") else []
    javac = shutil.which("javac")
    if javac:
        homes.append(Path(os.path.realpath(javac)).parent.parent)
    for home in homes:
        if (home / "include" / "jni.h").is_file():
            return home / "include"
    raise ToolMissing("no JDK with include/jni.h found (set JAVA_HOME or put a JDK's javac on PATH)")


def _cmake_build(build_dir: Path, defines: dict[str, str], jni: bool, abi: str, libs: list[Path]) -> RunnerBuild:
    _which("cmake", "install CMake (Debian: apt-get install cmake)")
    build_dir = Path(build_dir).resolve()
    with _os_step(f"creating the build folder {build_dir}"):
        build_dir.mkdir(parents=True, exist_ok=True)
    if jni:
        defines = {**defines, "EDGEDEPLOY_JNI": "ON"}
        if "CMAKE_TOOLCHAIN_FILE" not in defines:
            defines["JNI_INCLUDE_DIR"] = str(jdk_include_dir())
    _run(cmake_configure_command(build_dir, defines), "CMake configure", log=build_dir / "edgedeploy-configure.log")
    _run(["cmake", "--build", str(build_dir), "--parallel", str(os.cpu_count() or 2)], "CMake build",
         log=build_dir / "edgedeploy-build.log")
    runner = build_dir / RUNNER_NAME
    if not runner.is_file():
        raise NativeBuildFailed(f"{runner}: the build produced no runner")
    return RunnerBuild(runner=runner, abi=abi, libs=libs, jni=build_dir / JNI_LIB_NAME if jni else None)


def build_host_runner(out_dir: Path | str, jni: bool = False) -> RunnerBuild:
    """Build the runner (and, with ``jni``, the JNI bridge) for this machine against the installed wheels."""
    import platform

    tvm = host_tvm()
    return _cmake_build(Path(out_dir), _prebuilt_defines(tvm), jni, platform.machine(), tvm.libs())


def runner_command(runner: Path | str, bundle_dir: Path | str, prompt_file: Path | str,
                   max_new_tokens: int | None = None, threads: int | None = None, touch_kv: bool = False,
                   verify: bool = True, library: str | None = None) -> list[str]:
    """The native runner's argv: the Python runner's options (:func:`~edgedeploy.runtime.launch.runner_args`)
    plus ``--library``."""
    from edgedeploy.runtime.launch import runner_args

    cmd = [str(runner), *runner_args(bundle_dir, prompt_file, max_new_tokens, threads, touch_kv, verify)]
    return cmd + (["--library", library] if library else [])


# -- aarch64 Linux -------------------------------------------------------------------------------------


def default_wheel_cache() -> Path:
    """``$XDG_CACHE_HOME/edgedeploy/aarch64-wheels`` (default ``~/.cache/...``)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "edgedeploy" / "aarch64-wheels"


def _installed_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        raise ToolMissing(f"{dist} is not installed; its aarch64 twin must match its version") from None


def fetch_aarch64_runtime(wheel_dir: Path | str | None = None) -> TvmPrebuilt:
    """aarch64 ``libtvm_runtime.so``/``libtvm_ffi.so`` from PyPI's wheels of the installed versions.

    Downloaded once into ``wheel_dir`` (default :func:`default_wheel_cache`), keyed by version, and
    unpacked to ``<wheel_dir>/<tvm>-<ffi>/lib``; later calls reuse them. The headers are the host
    tvm-ffi's (same version, architecture-independent).
    """
    wheel_dir = Path(wheel_dir) if wheel_dir else default_wheel_cache()
    versions = {dist: _installed_version(dist) for dist in ("apache-tvm", "apache-tvm-ffi")}
    lib_dir = wheel_dir / f"tvm{versions['apache-tvm']}-ffi{versions['apache-tvm-ffi']}" / "lib"
    wanted = {"tvm/lib/libtvm_runtime.so": "libtvm_runtime.so", "tvm_ffi/lib/libtvm_ffi.so": "libtvm_ffi.so"}
    if not all((lib_dir / name).is_file() for name in wanted.values()):
        with _os_step(f"creating {wheel_dir}"):
            wheel_dir.mkdir(parents=True, exist_ok=True)
        wheels = _aarch64_wheels(wheel_dir, versions)
        if len(wheels) < 2:
            _run([sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--platform", AARCH64_PLATFORM,
                  "--python-version", f"{sys.version_info.major}.{sys.version_info.minor}", "--no-deps",
                  "--disable-pip-version-check", "-d", str(wheel_dir),
                  *(f"{d}=={v}" for d, v in versions.items())], "pip download of the aarch64 TVM wheels")
            wheels = _aarch64_wheels(wheel_dir, versions)
        with _os_step(f"unpacking the aarch64 TVM wheels into {lib_dir}"):
            _unpack_runtime(wheels, wanted, wheel_dir, lib_dir)
    host = host_tvm()
    return TvmPrebuilt(lib_dir, lib_dir, host.ffi_include)


def _unpack_runtime(wheels: list[Path], wanted: dict[str, str], wheel_dir: Path, lib_dir: Path) -> None:
    """Extract the ``wanted`` members (wheel path -> file name) of ``wheels`` into ``lib_dir``, all or nothing."""
    tmp = Path(tempfile.mkdtemp(dir=wheel_dir, prefix=".unpack-"))
    try:
        for wheel in wheels:
            try:
                with zipfile.ZipFile(wheel) as z:
                    for member, name in wanted.items():
                        if member in z.namelist():
                            (tmp / name).write_bytes(z.read(member))
            except zipfile.BadZipFile as e:
                # A download cut short stays in the cache: name the file to delete so the next run fetches it.
                raise NativeBuildFailed(f"{wheel}: not a readable wheel ({e}); delete it to download it again"
                                        ) from None
        missing = [n for n in wanted.values() if not (tmp / n).is_file()]
        if missing:
            raise NativeBuildFailed(f"the aarch64 wheels in {wheel_dir} lack {', '.join(missing)}")
        lib_dir.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(lib_dir, ignore_errors=True)
        tmp.rename(lib_dir)  # atomic: a half-unpacked folder is never taken for a complete one
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _aarch64_wheels(wheel_dir: Path, versions: dict[str, str]) -> list[Path]:
    out = []
    for dist, version in versions.items():
        stem = dist.replace("-", "_") + "-" + version + "-"
        out += sorted(p for p in wheel_dir.glob(f"{stem}*aarch64*.whl"))[:1]
    return out


def aarch64_toolchain_file() -> Path:
    return runner_source_dir() / "cmake" / "aarch64-linux-gnu.toolchain.cmake"


def build_aarch64_runner(out_dir: Path | str, wheel_dir: Path | str | None = None, jni: bool = False) -> RunnerBuild:
    """Cross-build the runner for aarch64 Linux (glibc) against the aarch64 wheels' runtime."""
    _which(AARCH64_CXX, "install Debian's g++-aarch64-linux-gnu (see .ci/apt-packages.txt)")
    tvm = fetch_aarch64_runtime(wheel_dir)
    defines = {**_prebuilt_defines(tvm), "CMAKE_TOOLCHAIN_FILE": str(aarch64_toolchain_file())}
    if jni:
        defines["JNI_INCLUDE_DIR"] = str(jdk_include_dir())  # jni.h is portable; jni_md.h is the JDK's
    return _cmake_build(Path(out_dir), defines, jni, "aarch64", tvm.libs())


def qemu_command(argv: list[str], sysroot: str = AARCH64_SYSROOT) -> list[str]:
    """``argv`` (an aarch64 program and its arguments) run under qemu-user on another architecture."""
    qemu = _which("qemu-aarch64", "install Debian's qemu-user (see .ci/apt-packages.txt)")
    if not Path(sysroot, "lib", "ld-linux-aarch64.so.1").exists():
        raise ToolMissing(f"{sysroot}: no aarch64 C library (install Debian's libc6-dev-arm64-cross)")
    return [qemu, "-L", sysroot, *argv]


def _extract_objects(tar: Path, into: Path) -> list[str]:
    """Extract the top-level ``.o`` members of ``tar`` into ``into``; return their paths."""
    try:
        with tarfile.open(tar) as tf:
            members = [m for m in tf.getmembers() if m.isfile() and m.name.endswith(".o") and "/" not in m.name]
            if not members:
                raise InputError(f"{tar}: holds no object files")
            tf.extractall(into, members=members, filter="data")
    except tarfile.TarError as e:
        raise InputError(f"{tar}: not a readable tar archive ({e})") from None
    return [str(into / m.name) for m in members]


def _link_objects(tar: Path, out_so: Path, cxx: list[str]) -> Path:
    """Link the objects in ``tar`` into the shared library ``out_so``, which appears only when complete.

    Every failure, the disk filling up included, is one line naming the step: extracting the objects,
    linking them (with the linker's own line), or moving the library into place.
    """
    tar, out_so = Path(tar), Path(out_so)
    if not tar.is_file():
        raise InputError(f"{tar}: no such library archive")
    tmp_so = out_so.with_name(f".{out_so.name}.tmp{os.getpid()}")
    try:
        with tempfile.TemporaryDirectory(prefix="edgedeploy-link-") as tmp:
            with _os_step(f"extracting the objects of {tar.name}"):
                objects = _extract_objects(tar, Path(tmp))
            _run([*cxx, "-shared", "-fPIC", "-o", str(tmp_so), *objects], f"linking {tar.name} into {out_so}")
            with _os_step(f"moving the linked {out_so.name} into place"):
                os.replace(tmp_so, out_so)
    finally:
        # A leftover hidden temporary is harmless; a failure to remove it must not hide why the link failed.
        with suppress(OSError):
            tmp_so.unlink(missing_ok=True)
    return out_so


def link_aarch64_library(tar: Path | str, out_so: Path | str | None = None, cxx: str = AARCH64_CXX) -> Path:
    """Link a ``linux-aarch64`` bundle's ``model.tar`` into ``model.so`` (default: beside the tar).

    The objects reference the runtime's ``TVMBackend*``/``TVMFFI*`` symbols, which resolve at load time
    against the ``libtvm_runtime.so``/``libtvm_ffi.so`` that the runner links, so nothing else is linked in.
    """
    tar = Path(tar)
    return _link_objects(tar, Path(out_so) if out_so else tar.with_suffix(".so"),
                         [_which(cxx, "install Debian's g++-aarch64-linux-gnu")])


def ndk_clang(ndk: Path | str, api: int = ANDROID_MIN_API) -> Path:
    """The NDK's ``aarch64-linux-android<api>-clang++``."""
    ndk = Path(ndk)
    hosts = sorted((ndk / "toolchains" / "llvm" / "prebuilt").glob("*/bin"))
    for bin_dir in hosts:
        clang = bin_dir / f"aarch64-linux-android{api}-clang++"
        if clang.exists():
            return clang
    raise ToolMissing(f"{ndk}: no aarch64-linux-android{api}-clang++ under toolchains/llvm/prebuilt (not an "
                      f"Android NDK, or one without API level {api})")


def link_android_library(tar: Path | str, ndk: Path | str, out_so: Path | str | None = None,
                         api: int = ANDROID_MIN_API) -> Path:
    """Link an ``android``/``android-opencl`` bundle's ``model.tar`` into ``model.so`` with the NDK's clang."""
    tar = Path(tar)
    return _link_objects(tar, Path(out_so) if out_so else tar.with_suffix(".so"), [str(ndk_clang(ndk, api))])


# -- Android -------------------------------------------------------------------------------------------


def check_tvm_source(tvm_source: Path | str, opencl: bool = False) -> Path:
    """Check that ``tvm_source`` is a TVM source tree the runtime can be built from; return it resolved."""
    src = Path(tvm_source).expanduser().resolve()
    need = ["CMakeLists.txt", "src/runtime/vm/paged_kv_cache.cc", "include/tvm/runtime/base.h",
            "3rdparty/tvm-ffi/CMakeLists.txt"]
    if opencl:
        need.append("src/runtime/opencl/opencl_module.cc")
    missing = [n for n in need if not (src / n).exists()]
    if missing:
        raise ToolMissing(
            f"{src}: not a usable TVM source tree (missing {', '.join(missing)}). The Android runtime is built "
            f"from TVM's sources: clone TVM at the installed wheel's version (`git clone --recursive --branch "
            f"v{_tvm_release()} <TVM repository>`), with its submodules, and pass that folder"
            + ("; the OpenCL variant needs its src/runtime/opencl" if opencl else ""))
    return src


def _tvm_release() -> str:
    try:
        return importlib.metadata.version("apache-tvm").split(".post")[0]
    except importlib.metadata.PackageNotFoundError:
        return "0.27.0"


def android_cmake_command(ndk: Path | str, tvm_source: Path | str, out: Path | str, opencl: bool = False,
                          api: int = ANDROID_MIN_API, jni: bool = False) -> list[str]:
    """The CMake configure command of the Android arm64-v8a runner: the same CMakeLists, the NDK's toolchain.

    Then ``cmake --build OUT`` builds ``OUT/edgedeploy-runner`` plus ``OUT/tvm/libtvm_runtime.so`` and
    ``libtvm_ffi.so`` (push them, and the NDK's ``libc++_shared.so``, into one folder on the phone).
    Raises :class:`ToolMissing` naming what is missing when the NDK or the TVM tree is not usable.
    """
    ndk = Path(ndk).expanduser().resolve()
    toolchain = ndk / "build" / "cmake" / "android.toolchain.cmake"
    if not toolchain.is_file():
        raise ToolMissing(f"{ndk}: not an Android NDK (no build/cmake/android.toolchain.cmake); install one "
                          "(Android Studio's SDK Manager, or the NDK zip) and pass its folder")
    if api < ANDROID_MIN_API:
        raise InputError(f"Android API level {api} is below the supported minimum {ANDROID_MIN_API}")
    src = check_tvm_source(tvm_source, opencl)
    defines = {"CMAKE_TOOLCHAIN_FILE": str(toolchain), "ANDROID_ABI": ANDROID_ABI,
               "ANDROID_PLATFORM": f"android-{api}", "ANDROID_STL": "c++_shared", "CMAKE_BUILD_TYPE": "Release",
               "TVM_SOURCE_DIR": str(src), "EDGEDEPLOY_OPENCL": "ON" if opencl else "OFF"}
    if jni:
        defines["EDGEDEPLOY_JNI"] = "ON"
    return cmake_configure_command(Path(out).expanduser().resolve(), defines)


def android_libcxx_shared(ndk: Path | str) -> Path:
    """The NDK's ``libc++_shared.so`` for arm64-v8a (the runner and the runtime are built with c++_shared)."""
    hits = sorted(Path(ndk).glob("toolchains/llvm/prebuilt/*/sysroot/usr/lib/aarch64-linux-android/libc++_shared.so"))
    if not hits:
        raise ToolMissing(f"{ndk}: no arm64 libc++_shared.so in the NDK")
    return hits[0]


def build_android_runner(ndk: Path | str, tvm_source: Path | str, out: Path | str, opencl: bool = False,
                         api: int = ANDROID_MIN_API, jni: bool = False) -> RunnerBuild:
    """Configure and build the Android runner (needs an NDK and a TVM source tree; untested without them)."""
    out = Path(out).expanduser().resolve()
    with _os_step(f"creating the build folder {out}"):
        out.mkdir(parents=True, exist_ok=True)
    _run(android_cmake_command(ndk, tvm_source, out, opencl, api, jni), "CMake configure (Android)",
         log=out / "edgedeploy-configure.log")
    targets = ["edgedeploy-runner", "tvm_runtime"] + (["edgedeploy_jni"] if jni else [])
    _run(["cmake", "--build", str(out), "--parallel", str(os.cpu_count() or 2), "--target", *targets],
         "CMake build (Android)", log=out / "edgedeploy-build.log")
    libs = [next(iter(sorted(out.rglob(name))), out / "tvm" / name) for name in RUNTIME_LIBS]
    return RunnerBuild(runner=out / RUNNER_NAME, abi=ANDROID_ABI, libs=[*libs, android_libcxx_shared(ndk)],
                       jni=out / JNI_LIB_NAME if jni else None)
