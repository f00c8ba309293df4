"""Which runner runs a bundle on a device, and what must be pushed beside it.

The choice follows the device's ABI (``ro.product.cpu.abi``) and the bundle's target:

- ``host`` bundle, on this host or a virtual phone of the host's ABI: the Python runner
  (``--runner native``: the host build of the native runner).
- ``linux-aarch64`` bundle, on aarch64 Linux or a virtual phone started with ``--abi arm64-v8a``
  (qemu-user): the native runner cross-built against PyPI's aarch64 TVM wheels; ``model.tar`` is linked
  into ``model.so`` here and pushed beside the bundle.
- ``android``/``android-opencl`` bundle, on an Android phone (arm64-v8a): the NDK build of the native
  runner (``edgedeploy package``) given with ``--runner-dir``; ``model.so`` linked with the NDK (``--ndk``).

Anything else is refused before a byte is pushed.
"""

from __future__ import annotations

import hashlib
import platform
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgedeploy.bundle import Manifest
from edgedeploy.devices.base import DeviceError, DeviceFacts

#: platform.machine() -> Android ABI name.
HOST_ABIS = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "arm64-v8a", "arm64": "arm64-v8a"}
_ELF_MACHINES = {62: "x86_64", 183: "aarch64", 40: "arm", 3: "x86"}


@dataclass
class RunnerSpec:
    """How to start the runner on a device."""

    kind: str  # "python" or "native"
    abi: str
    #: The command before the bundle argument; native runners name their pushed binary by ``{runner_dir}``.
    argv: list[str]
    #: Runner files to push into the device's runner folder (native runners).
    files: dict[str, Path] = field(default_factory=dict)
    #: Files to push into the bundle folder besides the bundle (a ``model.so`` linked for the device).
    bundle_extra: dict[str, Path] = field(default_factory=dict)
    elf_machine: str | None = None

    def command(self, runner_dir: str) -> list[str]:
        return [a.replace("{runner_dir}", runner_dir) for a in self.argv]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "abi": self.abi, "elf_machine": self.elf_machine}


def elf_machine(path: Path) -> str | None:
    """The ELF ``e_machine`` of a binary as a name (``aarch64``, ``x86_64``), None if not ELF."""
    with open(path, "rb") as f:
        head = f.read(20)
    if head[:4] != b"\x7fELF" or len(head) < 20:
        return None
    code = int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")
    return _ELF_MACHINES.get(code, str(code))


def runner_cache_dir() -> Path:
    import os

    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "edgedeploy" / "runners"


def _sources_stamp() -> str:
    from edgedeploy.runtime.native import runner_source_dir

    h = hashlib.sha256()
    for p in sorted(runner_source_dir().rglob("*")):
        if p.is_file():
            h.update(p.relative_to(runner_source_dir()).as_posix().encode() + p.read_bytes())
    return h.hexdigest()[:16]


def cached_native_runner(abi: str) -> Any:
    """The native runner for ``abi`` (``x86_64`` host build or ``aarch64``), built once per source version."""
    from edgedeploy.runtime import native

    out = runner_cache_dir() / f"{abi}-{_sources_stamp()}"
    if abi == "aarch64":
        return native.build_aarch64_runner(out) if not (out / native.RUNNER_NAME).is_file() else \
            native.RunnerBuild(out / native.RUNNER_NAME, abi, native.fetch_aarch64_runtime().libs())
    if not (out / native.RUNNER_NAME).is_file():
        return native.build_host_runner(out)
    return native.RunnerBuild(out / native.RUNNER_NAME, abi, native.host_tvm().libs())


def _native(build: Any, abi: str, wrapper: list[str]) -> RunnerSpec:
    files = {p.name: p for p in build.files_to_push()}
    return RunnerSpec("native", abi, [*wrapper, "{runner_dir}/" + build.runner.name], files=files,
                      elf_machine=elf_machine(build.runner))


def _app_runner(facts: DeviceFacts, manifest: Manifest, bundle_dir: Path, ndk: Path | None,
                link_dir: Path) -> RunnerSpec:
    """The harness app carries its runner; only an Android bundle's model.so must be linked and pushed."""
    virtual = bool(facts.props.get("ro.edgedeploy.virtual"))
    if manifest.target == "host" and virtual:
        return RunnerSpec("app", facts.abi, [])  # the virtual phone's emulated app is the host runner
    if manifest.target not in ("android", "android-opencl") or virtual:
        raise DeviceError(f"{facts.serial}: the harness app runs android bundles on a phone (this is a "
                          f"{manifest.target} bundle on {'a virtual phone' if virtual else 'a phone'})")
    if ndk is None:
        raise DeviceError("--ndk NDK is needed to link the bundle's model.tar for the phone")
    from edgedeploy.runtime.native import link_android_library

    so = link_android_library(bundle_dir / manifest.library, ndk, link_dir / f".{bundle_dir.name}-model-android.so")
    return RunnerSpec("app", facts.abi, [], bundle_extra={"model.so": so})


def select_runner(facts: DeviceFacts, manifest: Manifest, bundle_dir: Path, prefer: str = "auto",
                  runner_dir: Path | None = None, ndk: Path | None = None, link_dir: Path | None = None,
                  harness: str = "shell") -> RunnerSpec:
    """The runner for ``manifest``'s target on the device ``facts`` describes; DeviceError when none fits.

    With ``harness="app"`` the runner is the one inside the harness app (kind ``app``).
    """
    host_abi = HOST_ABIS.get(platform.machine().lower(), platform.machine().lower())
    device_abi = facts.abi or "unknown"
    python = facts.props.get("ro.edgedeploy.python")
    wrapper = shlex.split(facts.props.get("ro.edgedeploy.exec_wrapper", ""))
    target = manifest.target
    if harness == "app":
        return _app_runner(facts, manifest, bundle_dir, ndk, link_dir or bundle_dir.parent)
    if target == "host":
        if device_abi != host_abi or not python:
            raise DeviceError(f"{facts.serial}: bundle {bundle_dir.name} is a host ({host_abi}) build and cannot run "
                              f"on this device (ABI {device_abi}); build it with --target android "
                              "(or linux-aarch64 for an aarch64 Linux board)")
        if prefer == "native":
            return _native(cached_native_runner(platform.machine()), device_abi, [])
        return RunnerSpec("python", device_abi, ["env", "TVM_USE_RUNTIME_LIB=1", python, "-m",
                                                 "edgedeploy.runtime.runner"], elf_machine=None)
    if device_abi != "arm64-v8a":
        raise DeviceError(f"{facts.serial}: bundle {bundle_dir.name} targets {target} (aarch64) but the device's "
                          f"ABI is {device_abi}")
    if prefer == "python":
        raise DeviceError(f"{facts.serial}: the Python runner cannot run a {target} bundle; use --runner native")
    tar = bundle_dir / manifest.library
    link_dir = link_dir or bundle_dir.parent
    if target == "linux-aarch64":
        if not facts.props.get("ro.edgedeploy.virtual") and facts.android_release:
            raise DeviceError(f"{facts.serial}: linux-aarch64 bundles need a glibc aarch64 Linux; this is Android "
                              f"{facts.android_release}: build with --target android")
        from edgedeploy.runtime.native import link_aarch64_library

        spec = _native(cached_native_runner("aarch64"), device_abi, wrapper)
        so = link_aarch64_library(tar, link_dir / f".{bundle_dir.name}-model-aarch64.so")
    else:
        if facts.props.get("ro.edgedeploy.virtual"):
            raise DeviceError(f"{facts.serial}: a virtual phone runs glibc aarch64 code under qemu, not Android "
                              f"(bionic) binaries: build the bundle with --target linux-aarch64 to test it here")
        if runner_dir is None or ndk is None:
            raise DeviceError(f"{target} bundles run with the Android build of the native runner: build it with "
                              "`edgedeploy package --ndk NDK --tvm-source TVM_SRC --out DIR`, then pass "
                              "--runner-dir DIR --ndk NDK")
        from edgedeploy.runtime.native import RUNNER_NAME, link_android_library

        binary = Path(runner_dir) / RUNNER_NAME
        if not binary.is_file():
            raise DeviceError(f"{runner_dir}: no {RUNNER_NAME} (build it with `edgedeploy package`)")
        files = {p.name: p for p in Path(runner_dir).iterdir() if p.is_file()}
        spec = RunnerSpec("native", device_abi, ["{runner_dir}/" + RUNNER_NAME], files=files,
                          elf_machine=elf_machine(binary))
        so = link_android_library(tar, ndk, link_dir / f".{bundle_dir.name}-model-android.so")
    # The native runner loads model.so from beside the model.tar that the manifest names.
    spec.bundle_extra = {"model.so": so}
    return spec
