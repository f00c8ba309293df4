"""Named compile targets. TVM 0.27 only accepts JSON-style target dicts, never ``"llvm -mtriple=..."``."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from edgedeploy.errors import InputError

#: Letting LLVM reassociate float sums is what vectorises the matmul/GEMV reductions (measured here:
#: ~10x faster prefill and ~5x faster decode on a 160M model). No nnan/ninf: attention masks use -inf.
_FAST_MATH: dict[str, Any] = {"fast-math-reassoc": True, "fast-math-contract": True}

_AARCH64_ANDROID: dict[str, Any] = {"kind": "llvm", "mtriple": "aarch64-linux-android", "mattr": ["+neon"],
                                    **_FAST_MATH}


@dataclass(frozen=True)
class TargetSpec:
    """A target: TVM target dict, library file suffix, and whether the host can load the result."""

    name: str
    target: dict[str, Any]
    library_suffix: str
    runs_on_host: bool

    def tvm_target(self) -> Any:
        """The ``tvm.target.Target`` (imports the compiler)."""
        from tvm.target import Target

        return Target(self.target)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@lru_cache(maxsize=1)
def host_mcpu() -> str | None:
    """LLVM's name for this CPU; without one, FP16 code falls back to slow soft-float conversions."""
    try:
        import tvm

        name = tvm.get_global_func("tvm.codegen.llvm.GetHostCPUName")()
        if name and name != "generic":
            return str(name)
    except Exception:  # noqa: BLE001 - any failure means "detect some other way"
        pass
    flags = _cpu_flags()
    if {"avx2", "f16c", "fma"} <= flags:
        return "haswell"
    return None


def _host_target() -> dict[str, Any]:
    import platform

    t: dict[str, Any] = {"kind": "llvm", **_FAST_MATH}
    mcpu = host_mcpu()
    if mcpu:
        t["mcpu"] = mcpu
    if platform.machine() in ("aarch64", "arm64"):
        t["mattr"] = ["+neon"]
    return t


TARGET_NAMES = ("host", "android", "android-opencl", "linux-aarch64")


def get_target(name: str) -> TargetSpec:
    """The :class:`TargetSpec` called ``name`` (one of :data:`TARGET_NAMES`)."""
    if name == "host":
        return TargetSpec("host", _host_target(), ".so", True)
    if name == "android":
        return TargetSpec("android", dict(_AARCH64_ANDROID), ".tar", False)
    if name == "android-opencl":
        return TargetSpec("android-opencl", {"kind": "opencl", "device": "adreno", "host": dict(_AARCH64_ANDROID)},
                          ".tar", False)
    if name == "linux-aarch64":
        return TargetSpec("linux-aarch64", {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"],
                                            **_FAST_MATH}, ".tar", False)
    raise InputError(f"unknown target {name!r} (choose from {', '.join(TARGET_NAMES)})")
