"""Device profiles (``profiles/*.toml``): what a phone offers (RAM, usable budget, bandwidth, target).

Profiles are validated on load so a typo in a hand-edited file is reported with the file, the field
and what was expected, instead of surfacing later as a wrong verdict.
"""

from __future__ import annotations

import os
import platform
import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgedeploy.errors import InputError


def user_config_dir() -> Path:
    """edgedeploy's user configuration folder: ``$EDGEDEPLOY_CONFIG``, else ``$XDG_CONFIG_HOME/edgedeploy``,
    else ``~/.config/edgedeploy``."""
    env = os.environ.get("EDGEDEPLOY_CONFIG")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CONFIG_HOME")
    return (Path(xdg) if xdg else Path.home() / ".config") / "edgedeploy"


def user_profiles_dir() -> Path:
    """Where ``edgedeploy calibrate`` writes per-device profiles (``<config>/profiles``)."""
    return user_config_dir() / "profiles"


#: Searched in order: ``EDGEDEPLOY_PROFILES`` (a device farm keeps its calibrated profiles elsewhere), the
#: user's calibrated profiles (:func:`user_profiles_dir`), then the shipped ``profiles/``.
def profile_dirs() -> list[Path]:
    dirs = [Path(p) for p in os.environ.get("EDGEDEPLOY_PROFILES", "").split(os.pathsep) if p]
    return [*dirs, user_profiles_dir(), Path(__file__).resolve().parents[2] / "profiles"]


@dataclass(frozen=True)
class DeviceProfile:
    """A device's memory, speed and build target; ``auto`` fields of the host profile are measured."""

    name: str
    description: str
    kind: str
    soc: str
    abi: str
    target: str
    target_triple: str
    gpu_backend: str
    ram_mb: float
    hard_limit_mb: float
    usable_budget_mb: float
    runtime_base_mb: float
    memory_bandwidth_gbps: float
    bandwidth_efficiency: float
    compute_gflops: float
    calibrated: bool
    source: str = ""
    props: dict[str, str] = field(default_factory=dict)
    #: The phone's CPU for aarch64 builds, as LLVM names it (``cortex-a720``); None: not named.
    mcpu: str | None = None
    #: LLVM feature flags for aarch64 builds (``["+fullfp16", "-sve"]``); None: those ``mcpu`` implies, or
    #: the default ISA (:data:`edgedeploy.compile.targets.DEFAULT_AARCH64_MATTR`) when ``mcpu`` is None too.
    mattr: tuple[str, ...] | None = None
    #: What ``edgedeploy calibrate`` measured (the ``[calibration]`` table): date, method, raw figures.
    calibration: dict[str, Any] | None = None
    #: CPUs ``edgedeploy profile`` pins the runner to (``auto``, ``all`` or a list like ``4-7``); None: auto.
    pin_cpus: str | None = None

    @property
    def budget_mb(self) -> float:
        """What a model may use: the usable budget, never more than the challenge's hard limit."""
        return min(self.usable_budget_mb, self.hard_limit_mb)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_STR, _NUM, _BOOL = "a string", "a positive number", "true or false"
_FIELDS: dict[str, str] = {
    "name": _STR, "description": _STR, "kind": _STR, "soc": _STR, "abi": _STR, "target": _STR,
    "target_triple": _STR, "gpu_backend": _STR, "ram_mb": _NUM, "hard_limit_mb": _NUM,
    "usable_budget_mb": _NUM, "runtime_base_mb": _NUM, "memory_bandwidth_gbps": _NUM,
    "bandwidth_efficiency": _NUM, "compute_gflops": _NUM, "calibrated": _BOOL,
}
_CHOICES = {"kind": ("android", "host", "linux"), "gpu_backend": ("opencl", "none"),
            "target": ("host", "android", "android-opencl", "linux-aarch64")}
#: Optional fields: the CPU that phone builds (android, linux-aarch64) compile for.
_OPTIONAL = ("mcpu", "mattr", "pin_cpus")
_MB0 = "a number >= 0"
#: The ``[calibration]`` table ``edgedeploy calibrate`` writes: field -> what it must be. The first four are
#: required; every figure is in MiB (bandwidth in GB/s).
CALIBRATION_FIELDS: dict[str, str] = {
    "date": _STR, "method": _STR, "ceiling_mb": _NUM, "ceiling_runs_mb": "a list of positive numbers",
    "tool": _STR, "device": _STR, "device_model": _STR, "harness": _STR, "ceiling_step_mb": _NUM,
    "hold_ms": _NUM, "mem_total_mb": _MB0, "mem_available_before_mb": _MB0, "mem_available_after_mb": _MB0,
    "swap_total_mb": _MB0, "swap_free_before_mb": _MB0, "swap_free_after_mb": _MB0, "lmkd": _STR,
    "runtime_base_mb": _NUM, "runtime_rss_before_weights_mb": _NUM, "runtime_peak_mb": _NUM,
    "runtime_bundle": _STR, "runtime_runner": _STR, "bandwidth_gbps": _NUM, "bandwidth_buffer_mb": _NUM,
    "measured": "a list of strings",
}
_CALIBRATION_REQUIRED = ("date", "method", "ceiling_mb", "ceiling_runs_mb")


def _measure_host() -> dict[str, Any]:
    """Fill the host profile's ``auto`` fields from this machine (takes well under a second)."""
    import numpy as np
    import psutil

    vm = psutil.virtual_memory()
    src = np.ones(64 * 2**20 // 8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    a = np.ones((512, 512), dtype=np.float32)
    t = time.perf_counter()
    for _ in range(4):
        a @ a
    gflops = 4 * 2 * 512**3 / (time.perf_counter() - t) / 1e9
    machine = platform.machine()
    return {
        "ram_mb": vm.total / 2**20, "usable_budget_mb": 0.9 * vm.available / 2**20,
        # A copy reads and writes every byte.
        "memory_bandwidth_gbps": 2 * src.nbytes / best / 1e9, "compute_gflops": gflops,
        "soc": platform.processor() or machine, "abi": machine,
        "target_triple": f"{machine}-linux-gnu",
    }


def _is_num(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value  # not NaN


def _validate_calibration(table: object, source: str) -> dict[str, Any]:
    """The ``[calibration]`` table, checked field by field; InputError naming the field otherwise."""
    if not isinstance(table, dict):
        raise InputError(f"{source}: [calibration] must be a table")
    for name in _CALIBRATION_REQUIRED:
        if name not in table:
            raise InputError(f"{source}: [calibration] lacks {name!r} ({CALIBRATION_FIELDS[name]})")
    for name, value in table.items():
        expected = CALIBRATION_FIELDS.get(name)
        if expected is None:
            raise InputError(f"{source}: [calibration] has unknown field {name!r} "
                             f"(known: {', '.join(CALIBRATION_FIELDS)})")
        ok = {
            _STR: isinstance(value, str) and bool(value),
            _NUM: _is_num(value) and value > 0 and value != float("inf"),
            _MB0: _is_num(value) and 0 <= value < float("inf"),
            "a list of positive numbers": isinstance(value, list) and bool(value)
            and all(_is_num(v) and 0 < v < float("inf") for v in value),
            "a list of strings": isinstance(value, list) and all(isinstance(v, str) and v for v in value),
        }[expected]
        if not ok:
            raise InputError(f"{source}: [calibration] field {name!r} must be {expected}, got {value!r:.60}")
    if table.get("harness", "shell") not in ("shell", "app"):
        raise InputError(f"{source}: [calibration] field 'harness' must be shell or app, got {table['harness']!r}")
    return dict(table)


def _validate(data: dict[str, Any], source: str) -> dict[str, Any]:
    measured: dict[str, Any] | None = None
    out: dict[str, Any] = {}
    for name, expected in _FIELDS.items():
        if name not in data:
            raise InputError(f"{source}: missing field {name!r} ({expected})")
        value = data[name]
        if value == "auto" and name not in ("name", "description", "kind", "target", "gpu_backend"):
            measured = measured or _measure_host()
            if name not in measured:
                raise InputError(f"{source}: field {name!r} cannot be 'auto'")
            value = measured[name]
        ok = {
            _STR: isinstance(value, str) and bool(value),
            _NUM: isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0,
            _BOOL: isinstance(value, bool),
        }[expected]
        if not ok:
            raise InputError(f"{source}: field {name!r} must be {expected}, got {value!r}")
        if name in _CHOICES and value not in _CHOICES[name]:
            raise InputError(f"{source}: field {name!r} must be one of {', '.join(_CHOICES[name])}, got {value!r}")
        out[name] = value
    if out["bandwidth_efficiency"] > 1:
        raise InputError(f"{source}: field 'bandwidth_efficiency' must be at most 1, got {out['bandwidth_efficiency']}")
    unknown = sorted(set(data) - set(_FIELDS) - set(_OPTIONAL) - {"props", "calibration"})
    if unknown:
        raise InputError(f"{source}: unknown field {unknown[0]!r} (known: {', '.join(_FIELDS)}, "
                         f"{', '.join(_OPTIONAL)}, props, calibration)")
    if "calibration" in data:
        cal = _validate_calibration(data["calibration"], source)
        if out["calibrated"] is not True:
            raise InputError(f"{source}: a [calibration] table needs calibrated = true")
        if out["usable_budget_mb"] > cal["ceiling_mb"]:
            raise InputError(f"{source}: usable_budget_mb ({out['usable_budget_mb']}) is above the calibrated "
                             f"ceiling ({cal['ceiling_mb']}); a budget may only be lower than what was measured")
        out["calibration"] = cal
    if "mcpu" in data or "mattr" in data:
        from edgedeploy.compile.targets import make_isa

        # The names' shape is checked here; whether LLVM knows them, when a build uses them.
        isa = make_isa(data.get("mcpu"), data.get("mattr"), source=source)
        out["mcpu"] = isa.mcpu
        out["mattr"] = tuple(data["mattr"]) if "mattr" in data else None
    if "pin_cpus" in data:
        from edgedeploy.profile.variance import parse_cpu_list

        pin = data["pin_cpus"]
        try:
            if not isinstance(pin, str):
                raise ValueError(f"got {pin!r}")
            if pin not in ("auto", "all"):
                parse_cpu_list(pin)
        except ValueError as e:
            raise InputError(f"{source}: field 'pin_cpus' must be auto, all or a CPU list like \"4-7\" ({e})") from None
        out["pin_cpus"] = pin
    props = data.get("props", {})
    if not isinstance(props, dict) or not all(isinstance(v, str) for v in props.values()):
        raise InputError(f"{source}: [props] must map property names to strings")
    out["props"] = dict(props)
    return out


def load_profile(name_or_path: str | Path) -> DeviceProfile:
    """Load a profile by name (``reference-12gb``) or by path to a ``.toml`` file."""
    path = Path(name_or_path)
    if not path.suffix == ".toml" or not path.is_file():
        candidates = [d / f"{name_or_path}.toml" for d in profile_dirs()]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            known = ", ".join(p.name for p in list_profiles()) or "none"
            raise InputError(f"unknown device profile {str(name_or_path)!r} (known: {known})")
        path = found
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid TOML ({e})") from None
    return DeviceProfile(**_validate(data, str(path)), source=str(path))


def list_profiles() -> list[DeviceProfile]:
    """Every profile in the search path, first one of each name wins; invalid files raise."""
    seen: dict[str, DeviceProfile] = {}
    for d in profile_dirs():
        for path in sorted(d.glob("*.toml")):
            if path.stem not in seen:
                seen[path.stem] = load_profile(path)
    return list(seen.values())
