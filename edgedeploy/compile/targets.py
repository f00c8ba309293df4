"""Named compile targets. TVM 0.27 only accepts JSON-style target dicts, never ``"llvm -mtriple=..."``.

Phone targets (``android``, ``android-opencl``'s host side, ``linux-aarch64``) are compiled for a
:class:`CpuIsa`: the phone's CPU as LLVM names it (``mcpu``) and feature flags (``mattr``), taken from
the device profile (:func:`isa_from_profile`) or :data:`DEFAULT_ISA` when the profile names none.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from edgedeploy.errors import InputError

#: Letting LLVM reassociate float sums is what vectorises the matmul/GEMV reductions (measured here:
#: ~10x faster prefill and ~5x faster decode on a 160M model). No nnan/ninf: attention masks use -inf.
_FAST_MATH: dict[str, Any] = {"fast-math-reassoc": True, "fast-math-contract": True}

#: What a phone build assumes when its profile names no CPU: ARMv8.2-A with FP16 arithmetic
#: (FEAT_FP16: native half-precision scalar and vector ops, no soft-float conversions) and the dot
#: product. Every Android flagship since 2018 (Cortex-A75/A55 and later) has them. FP16 multiply-
#: accumulate-long (``+fp16fml``, FMLAL) is left out: Cortex-A55 little cores lack it, and a build
#: that used it would die with SIGILL the first time a thread lands on one.
DEFAULT_AARCH64_MATTR: tuple[str, ...] = ("+v8.2a", "+fullfp16", "+dotprod", "+neon")

#: LLVM features every phone build must end up with, whatever mcpu/mattr say.
REQUIRED_AARCH64_FEATURES: tuple[str, ...] = ("neon", "v8.2a", "fullfp16", "dotprod")

_CPU_NAME = re.compile(r"[a-z0-9][a-z0-9._+-]*")
_FEATURE = re.compile(r"[+-][a-z0-9][a-z0-9._-]*")


@dataclass(frozen=True)
class CpuIsa:
    """The CPU a phone build is compiled for, as LLVM takes it.

    ``mcpu`` is LLVM's CPU name (scheduling model and the features the core implies, e.g.
    ``cortex-a720``); ``mattr`` adds (``+x``) or removes (``-x``) features. SVE is switched off
    (``-sve``) unless ``mattr`` mentions it: v9 cores imply it, but Qualcomm's Snapdragon 8 Gen 2/3
    do not expose it to user space (no ``sve`` in /proc/cpuinfo) and a vectoriser that picks it
    crashes there with SIGILL; NEON has the same 128-bit width on every shipping phone core.
    ``source`` says where it came from (a profile's name or ``default``) for the bundle manifest.
    """

    mcpu: str | None = None
    mattr: tuple[str, ...] = DEFAULT_AARCH64_MATTR
    source: str = "default"

    def llvm_mattr(self) -> list[str]:
        """``mattr`` as passed to LLVM: SVE off unless asked for."""
        attrs = list(self.mattr)
        if not any(a[1:].startswith("sve") for a in attrs):
            attrs.append("-sve")
        return attrs

    def target_fields(self) -> dict[str, Any]:
        """The ``mcpu``/``mattr`` entries of a TVM llvm target dict."""
        out: dict[str, Any] = {"mcpu": self.mcpu} if self.mcpu else {}
        out["mattr"] = self.llvm_mattr()
        return out

    def to_dict(self) -> dict[str, Any]:
        """What a bundle records: the CPU name, the features given to LLVM, and where they came from."""
        return {"mcpu": self.mcpu or "generic", "mattr": self.llvm_mattr(), "source": self.source}


DEFAULT_ISA = CpuIsa()


def make_isa(mcpu: str | None = None, mattr: Sequence[str] | None = None, source: str = "default") -> CpuIsa:
    """A :class:`CpuIsa` from a profile's ``mcpu``/``mattr`` (either may be absent).

    Neither: :data:`DEFAULT_ISA`'s features. ``mcpu`` alone: the features that core implies.
    The names are checked here; whether LLVM knows them is checked by :func:`get_target`.
    """
    if mcpu is not None and (not isinstance(mcpu, str) or not _CPU_NAME.fullmatch(mcpu)):
        raise InputError(f"{source}: field 'mcpu' must be an LLVM CPU name like 'cortex-a720', got {mcpu!r}")
    if mattr is not None:
        if isinstance(mattr, str) or not all(isinstance(a, str) and _FEATURE.fullmatch(a) for a in mattr):
            raise InputError(f"{source}: field 'mattr' must be a list of LLVM features like \"+fullfp16\" or "
                             f"\"-sve\", got {mattr!r}")
        attrs = tuple(mattr)
    else:
        attrs = () if mcpu else DEFAULT_AARCH64_MATTR
    return CpuIsa(mcpu, attrs, source)


def isa_from_profile(profile: Any) -> CpuIsa:
    """The ISA of a :class:`~edgedeploy.devices.profiles.DeviceProfile` (or a profile name or .toml path)."""
    if isinstance(profile, str) or hasattr(profile, "__fspath__"):
        from edgedeploy.devices.profiles import load_profile

        profile = load_profile(profile)
    mcpu, mattr = getattr(profile, "mcpu", None), getattr(profile, "mattr", None)
    if mcpu is None and mattr is None:
        return CpuIsa(source=f"default (profile {profile.name} names no CPU)")
    return make_isa(mcpu, mattr, source=f"profile {profile.name}")


@lru_cache(maxsize=32)
def _check_isa(triple: str, mcpu: str | None, mattr: tuple[str, ...], source: str) -> None:
    """Refuse an ISA LLVM does not know or that lacks what the kernels assume (TVM itself only logs these)."""
    from tvm.target import Target, codegen

    if mcpu and not codegen.llvm_is_valid_cpu(mcpu, triple):
        raise InputError(f"{source}: LLVM {codegen.llvm_version_major()} does not know the CPU {mcpu!r} for "
                         f"{triple} (see tvm.target.codegen.llvm_get_cpu_archlist)")
    t: dict[str, Any] = {"kind": "llvm", "mtriple": triple, "mattr": list(mattr)}
    if mcpu:
        t["mcpu"] = mcpu
    have = {str(f) for f in codegen.llvm_get_cpu_features(Target(t))}
    unknown = [a for a in mattr if a.startswith("+") and a[1:] not in have]
    if unknown:
        raise InputError(f"{source}: LLVM does not know the feature {unknown[0]!r} for {triple} "
                         "(or another flag in mattr turns it off)")
    missing = [f for f in REQUIRED_AARCH64_FEATURES if f not in have]
    if missing:
        cpu = f"mcpu {mcpu!r}" if mcpu else "the target"
        raise InputError(f"{source}: {cpu} with mattr {list(mattr)} lacks {', '.join(missing)}; phone builds need "
                         "ARMv8.2-A or later with FP16 arithmetic and dot product (+v8.2a, +fullfp16, +dotprod)")
    if any(f.startswith("sve") for f in have) and not any(a[1:].startswith("sve") for a in mattr):
        raise InputError(f"{source}: SVE is enabled although mattr does not ask for it")


@dataclass(frozen=True)
class TargetSpec:
    """A target: TVM target dict, library file suffix, whether the host can load the result, and the CPU ISA."""

    name: str
    target: dict[str, Any]
    library_suffix: str
    runs_on_host: bool
    #: The phone CPU an aarch64 target is compiled for; None for the host (always this machine's CPU).
    isa: CpuIsa | None = None

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


def aarch64_target(triple: str, isa: CpuIsa = DEFAULT_ISA) -> dict[str, Any]:
    """The TVM llvm target dict for ``triple`` compiled for ``isa`` (checked against LLVM once per ISA)."""
    _check_isa(triple, isa.mcpu, tuple(isa.llvm_mattr()), isa.source)
    return {"kind": "llvm", "mtriple": triple, **isa.target_fields(), **_FAST_MATH}


TARGET_NAMES = ("host", "android", "android-opencl", "linux-aarch64")


def get_target(name: str, isa: CpuIsa | None = None) -> TargetSpec:
    """The :class:`TargetSpec` called ``name`` (one of :data:`TARGET_NAMES`).

    ``isa`` (usually :func:`isa_from_profile`) is the phone CPU of the aarch64 targets, :data:`DEFAULT_ISA`
    when None; the host target ignores it and always compiles for this machine.
    """
    isa = isa or DEFAULT_ISA
    if name == "host":
        return TargetSpec("host", _host_target(), ".so", True)
    if name == "android":
        return TargetSpec("android", aarch64_target("aarch64-linux-android", isa), ".tar", False, isa)
    if name == "android-opencl":
        return TargetSpec("android-opencl", {"kind": "opencl", "device": "adreno",
                                             "host": aarch64_target("aarch64-linux-android", isa)},
                          ".tar", False, isa)
    if name == "linux-aarch64":
        return TargetSpec("linux-aarch64", aarch64_target("aarch64-linux-gnu", isa), ".tar", False, isa)
    raise InputError(f"unknown target {name!r} (choose from {', '.join(TARGET_NAMES)})")
