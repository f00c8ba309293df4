"""``edgedeploy calibrate``: measure what a device really allows, and write it as a device profile.

Three figures, each measured on the device itself:

1. **The usable memory ceiling.** A small native probe (``android_template/memprobe/memprobe.c``, built
   for the device's ABI and pushed like the runner) reserves address space and fills it with
   incompressible data in steps, pausing after each step so the low-memory killer can act, and prints
   what it holds (VmRSS + VmSwap) after every step it survived, until it is killed (exit 137). The search
   bisects: a coarse pass, finer passes that start (at full speed) just below the last level that
   survived, then ``repeats`` passes at the finest step for stability. The ceiling is the smallest of
   the repeats; MemAvailable and swap are read from ``/proc/meminfo`` before and after.
2. **The runtime base.** Our runner on a tiny bundle (the Python runner on a host-ABI device, the native
   runner on a phone) through the normal profiling path: its RSS before the model library and weights
   load, and its peak minus what the estimate attributes to the tiny model (weights, KV cache,
   temporaries). The latter is the base the estimate uses.
3. **Read bandwidth** (one thread): the probe streams a buffer of 4x the last-level cache (at least
   64 MiB) and reports the fastest of three passes.

The profile written is the base profile with ``usable_budget_mb`` = the ceiling, ``runtime_base_mb`` =
the measured base, ``calibrated = true`` and a ``[calibration]`` table with the date, the method and the
raw figures (validated like every profile, :mod:`edgedeploy.devices.profiles`).
"""

from __future__ import annotations

import hashlib
import json
import math
import posixpath
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import edgedeploy
from edgedeploy.devices.base import Device, DeviceError, DeviceFacts, parse_meminfo
from edgedeploy.devices.profiles import DeviceProfile, _validate, user_profiles_dir
from edgedeploy.errors import EdgeDeployError, InputError

MIB = 2**20
PROBE_NAME = "edgedeploy-memprobe"
KILLED = 137
#: Default pause after each step: five polls of the virtual phone's 20 ms budget check, and lmkd's
#: default kill_timeout_ms (100). Raise it on a phone whose killer reacts slowly.
HOLD_MS = 100
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class CalibrationFailed(EdgeDeployError):
    """The device did not behave as a calibration needs (no kill, a probe that failed): exit code 2."""

    exit_code = 2


# -- the probe ------------------------------------------------------------------------------------

def probe_source() -> Path:
    return Path(__file__).resolve().parents[1] / "android_template" / "memprobe" / "memprobe.c"


def _probe_cache() -> Path:
    from edgedeploy.profile.runners import runner_cache_dir

    return runner_cache_dir().parent / "memprobe"


def build_probe(kind: str, ndk: Path | None = None) -> Path:
    """The probe for ``kind`` (``host``, ``aarch64`` glibc Linux, ``android``), built once per source version."""
    from edgedeploy.runtime.native import ToolMissing, ndk_clang

    src = probe_source()
    stamp = hashlib.sha256(src.read_bytes()).hexdigest()[:16]
    out = _probe_cache() / f"{kind}-{stamp}" / PROBE_NAME
    if out.is_file():
        return out
    if kind == "host":
        cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
        if not cc:
            raise ToolMissing("no C compiler (cc) to build the memory probe: install gcc")
        cmd = [cc, "-O2", "-std=c99"]
    elif kind == "aarch64":
        cc = shutil.which("aarch64-linux-gnu-gcc")
        if not cc:
            raise ToolMissing("aarch64-linux-gnu-gcc not found: install Debian's gcc-aarch64-linux-gnu")
        cmd = [cc, "-O2", "-std=c99", "-static"]
    else:
        if ndk is None:
            raise InputError("calibrating an Android phone needs --ndk NDK to build the native memory probe")
        clang = ndk_clang(ndk)
        cmd = [str(clang.with_name(clang.name.replace("clang++", "clang"))), "-O2", "-std=c99"]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    r = subprocess.run([*cmd, "-o", str(tmp), str(src)], capture_output=True, text=True)
    if r.returncode != 0:
        from edgedeploy.runtime.native import NativeBuildFailed, telling_line

        raise NativeBuildFailed(f"building the memory probe failed: {telling_line(r.stderr or r.stdout)}")
    tmp.replace(out)
    return out


def probe_kind(facts: DeviceFacts) -> tuple[str, list[str]]:
    """Which probe build the device runs, and the wrapper to start it with (qemu on an arm64 virtual phone)."""
    import platform

    from edgedeploy.profile.runners import HOST_ABIS

    host_abi = HOST_ABIS.get(platform.machine().lower(), platform.machine().lower())
    wrapper = shlex.split(facts.props.get("ro.edgedeploy.exec_wrapper", ""))
    virtual = bool(facts.props.get("ro.edgedeploy.virtual"))
    if facts.abi == host_abi and (virtual or not facts.android_release):
        return "host", wrapper
    if facts.abi == "arm64-v8a":
        return ("aarch64" if virtual or not facts.android_release else "android"), wrapper
    raise DeviceError(f"{facts.serial}: no memory probe for ABI {facts.abi or 'unknown'} (arm64-v8a phones, "
                      f"or a virtual phone of this host's ABI)")


# -- the ceiling ----------------------------------------------------------------------------------

@dataclass
class ProbePass:
    """One probe process: where it started, its step, the levels it survived, and how it ended."""

    start_mb: float
    step_mb: float
    levels: list[tuple[int, int]] = field(default_factory=list)  # (bytes touched, VmRSS + VmSwap bytes)
    exit_code: int = 0
    seconds: float = 0.0

    @property
    def killed(self) -> bool:
        return self.exit_code == KILLED

    @property
    def held_bytes(self) -> int:
        """The most this process held (RSS + swap) and survived a pause with."""
        return max((held for _, held in self.levels), default=0)

    @property
    def touched_mb(self) -> float:
        """Bytes the last surviving level had touched, in MiB."""
        return self.levels[-1][0] / MIB if self.levels else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"start_mb": round(self.start_mb, 1), "step_mb": round(self.step_mb, 2), "exit_code": self.exit_code,
                "held_mb": round(self.held_bytes / MIB, 1), "levels": len(self.levels),
                "seconds": round(self.seconds, 2)}


def run_probe_pass(device: Device, argv: list[str], start_mb: float, step_mb: float, hold_ms: int,
                   cap_mb: float) -> ProbePass:
    cmd = " ".join(shlex.quote(a) for a in [*argv, "ceiling", f"{start_mb:.2f}", f"{step_mb:.2f}",
                                            str(hold_ms), f"{cap_mb:.0f}"])
    steps = max(1.0, (cap_mb - start_mb) / max(step_mb, 0.01))
    timeout = 60 + steps * hold_ms / 1000 + cap_mb / 100  # the pauses, and ~100 MiB/s of filling at worst
    t0 = time.perf_counter()
    # Not `exec`: some transports append their exit-code marker to the command, which must survive the probe.
    r = device.shell(cmd, timeout=timeout)
    p = ProbePass(start_mb, step_mb, exit_code=r.exit_code, seconds=time.perf_counter() - t0)
    for line in r.stdout.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[0] == "ok" and all(x.lstrip("-").isdigit() for x in parts[1:]):
            p.levels.append((int(parts[1]), int(parts[2]) + max(0, int(parts[3]))))
    if r.exit_code not in (0, KILLED):
        raise CalibrationFailed(f"{device.serial}: the memory probe exited with code {r.exit_code}: "
                                f"{(r.stderr or r.stdout).strip()[-200:] or 'no output'}")
    if r.exit_code == 0:
        raise CalibrationFailed(f"{device.serial}: the memory probe held {cap_mb:,.0f} MiB (the device's RAM and "
                                "swap, plus a quarter) and was never killed: no low-memory killer acts on this "
                                "process, so there is no ceiling to measure")
    return p


def find_ceiling(device: Device, argv: list[str], cap_mb: float, hold_ms: int = HOLD_MS, repeats: int = 3,
                 log: Any = None) -> dict[str, Any]:
    """Bisect the level at which the low-memory killer ends the probe; see the module docstring."""
    passes: list[ProbePass] = []

    def go(start: float, step: float) -> ProbePass:
        p = run_probe_pass(device, argv, start, step, hold_ms, cap_mb)
        passes.append(p)
        if log:
            log(f"probe from {start:,.0f} MiB in steps of {step:,.1f}: held {p.held_bytes / MIB:,.1f} MiB "
                f"({len(p.levels)} steps, {p.seconds:.1f} s)")
        return p

    step = max(32.0, cap_mb / 32)
    p = go(0.0, step)
    if not p.levels:
        raise CalibrationFailed(f"{device.serial}: the memory probe was killed before it held anything")
    lo = p.touched_mb  # survived; lo + step did not
    fine = max(1.0, lo * 0.002)
    final: list[ProbePass] = []
    while len(final) < repeats:
        if step > 2 * fine:
            step = max(fine, step / 16)
        # Start (at full speed) a few steps below the last level that survived: the killer may act a
        # little earlier from one pass to the next.
        start = max(0.0, lo - (4 if step <= 2 * fine else 1) * step)
        p = go(start, step)
        if not p.levels:  # killed during the fast start: the device allows less now; back off
            lo = max(0.0, lo - 8 * step)
            if len(passes) > 12:
                raise CalibrationFailed(f"{device.serial}: the ceiling kept moving down; is memory being "
                                        "taken by other processes?")
            continue
        lo = p.touched_mb
        if step <= 2 * fine:
            final.append(p)
    held = [round(q.held_bytes / MIB, 1) for q in final]
    return {"ceiling_mb": min(held), "ceiling_runs_mb": held, "ceiling_step_mb": step,
            "passes": [q.to_dict() for q in passes]}


# -- the runtime base ------------------------------------------------------------------------------

def tiny_bundle(kind: str) -> Path:
    """A tiny Llama bundle for ``kind`` (``host`` or ``linux-aarch64``), built once into the cache."""
    from edgedeploy.compile.build import build_bundle
    from edgedeploy.tiny import make_tiny_checkpoint

    root = _probe_cache().parent / "calibrate" / f"tiny-{kind}-{edgedeploy.__version__}"
    bundle = root / "bundle"
    if (bundle / "bundle.json").is_file():
        return bundle
    ckpt = make_tiny_checkpoint(root / "checkpoint", "llama", dtype="float16")
    build_bundle(ckpt, bundle, target=kind, context_window=128, prefill_chunk=32)
    return bundle


def measure_runtime_base(device: Device, bundle: Path, profile: DeviceProfile, harness: str = "shell",
                         runner: str = "auto", runner_dir: Path | None = None,
                         ndk: Path | None = None) -> dict[str, Any]:
    """Run the runner on ``bundle`` once through the profiler; its base before weights and its peak."""
    from edgedeploy.bundle import read_manifest
    from edgedeploy.checkpoint.config import ModelConfig
    from edgedeploy.estimate import estimate
    from edgedeploy.profile.profiler import load_prompts
    from edgedeploy.profile.session import profile_bundle

    # One run for its memory, not its speed: no cool-down wait and no battery unplugged for an energy figure.
    result = profile_bundle(device, bundle, load_prompts(["chat-short"]), runs=1, warmup=0, harness=harness,
                            runner=runner, runner_dir=runner_dir, ndk=ndk, timeout=300, cooldown_max_s=0,
                            energy_on=False)
    runs = result.all_runs()
    run = next((r for r in runs if r.ok and r.peak_rss_bytes), None)
    if run is None:
        raise CalibrationFailed(f"{device.serial}: the runner failed on the tiny bundle: "
                                f"{runs[0].error if runs else 'no run'}")
    m = read_manifest(bundle)
    est = estimate(ModelConfig.from_dict(m.config), profile, context_window=m.context_window,
                   prefill_chunk=m.prefill_chunk, dtype=m.dtype, parameters=m.parameters)
    model_bytes = est.peak_bytes - est.runtime_base_bytes  # weights + KV cache + temporaries
    peak = int(run.memory.peak_bytes if run.memory else run.peak_rss_bytes or 0)
    out = {"runtime_peak_mb": peak / MIB, "runtime_base_mb": max(1.0, (peak - model_bytes) / MIB),
           "runtime_bundle": bundle.name, "runtime_runner": result.runner.kind}
    before = run.extra.get("base_rss_bytes")
    if isinstance(before, int) and before > 0:
        out["runtime_rss_before_weights_mb"] = before / MIB
    return out


# -- bandwidth ------------------------------------------------------------------------------------

def measure_bandwidth(device: Device, argv: list[str], available_mb: float) -> dict[str, Any] | None:
    """Single-thread streaming read over 4x the largest cache the device lists (at least 64 MiB)."""
    sizes = device.shell("cat /sys/devices/system/cpu/cpu*/cache/index*/size 2>/dev/null").stdout.split()
    units = {"K": 1 / 1024, "M": 1.0, "G": 1024.0}
    llc = max((int(s[:-1]) * units[s[-1]] for s in sizes if s[:-1].isdigit() and s[-1] in units), default=8.0)
    buf = max(64.0, 4 * llc)
    if available_mb and buf > available_mb / 4:
        return None
    cmd = " ".join(shlex.quote(a) for a in [*argv, "bandwidth", f"{buf:.0f}", "3"])
    r = device.shell(cmd, timeout=120)
    m = re.search(r"^bw (\d+) ", r.stdout, re.M)
    if r.exit_code != 0 or not m:
        return None
    return {"bandwidth_gbps": int(m.group(1)) / 1e9, "bandwidth_buffer_mb": buf}


# -- the whole calibration -----------------------------------------------------------------------

def _meminfo(device: Device) -> dict[str, float]:
    mem = parse_meminfo(device.run_args(["cat", "/proc/meminfo"]).stdout)
    return {k: mem.get(k, 0) / MIB for k in ("MemTotal", "MemAvailable", "SwapTotal", "SwapFree")}


def calibrate(device: Device, base: DeviceProfile, name: str | None = None, harness: str = "shell",
              hold_ms: int = HOLD_MS, repeats: int = 3, bundle: Path | None = None, runner: str = "auto",
              runner_dir: Path | None = None, ndk: Path | None = None, bandwidth: bool = True,
              runtime_base: bool = True, log: Any = None) -> dict[str, Any]:
    """Measure ``device`` and return the profile (as TOML-ready data) built from ``base``."""
    facts = device.facts()
    if name is None:
        name = (re.sub(r"[^a-z0-9._-]+", "-", (facts.model or facts.serial).lower()).strip("-.")[:50]
                or "device") + "-calibrated"
    if not NAME_RE.match(name):
        raise InputError(f"profile name {name!r} must be letters, digits, '.', '_' or '-' (at most 64)")
    kind, wrapper = probe_kind(facts)
    if facts.props.get("ro.edgedeploy.virtual") and not facts.props.get("ro.edgedeploy.budget_kb"):
        # A virtual phone without a memory budget runs commands on this host with nothing to stop the
        # probe but the host's own OOM killer.
        raise CalibrationFailed(f"{device.serial}: this virtual phone has no memory budget (start it with "
                                "--budget-mb): there is no low-memory killer to calibrate against")
    probe = build_probe(kind, ndk)
    remote_dir = posixpath.join(device.work_dir, "calibrate")
    remote = posixpath.join(remote_dir, PROBE_NAME)
    device.mkdir(remote_dir)
    measured = []
    try:
        device.push(probe, remote)
        device.run_args(["chmod", "755", remote])
        argv = [*wrapper, remote]
        cal: dict[str, Any] = {}
        if runtime_base:
            if bundle is None and kind == "android":
                if log:
                    log("runtime base: not measured (pass --bundle with a small android bundle, --runner-dir, --ndk)")
            else:
                tb = bundle or tiny_bundle("host" if kind == "host" else "linux-aarch64")
                cal.update(measure_runtime_base(device, tb, base, harness, runner, runner_dir, ndk))
                measured.append("runtime_base")
                if log:
                    log(f"runtime base {cal['runtime_base_mb']:,.1f} MiB (peak {cal['runtime_peak_mb']:,.1f} MiB "
                        f"on {tb.name})")
        before = _meminfo(device)
        cap_mb = 1.25 * (before["MemTotal"] + before["SwapTotal"]) + 64
        from edgedeploy.profile.session import device_clock, lmkd_kill

        since = device_clock(device)
        ceiling = find_ceiling(device, argv, cap_mb, hold_ms, repeats, log)
        measured.append("ceiling")
        kill = lmkd_kill(device.run_args(["logcat", "-d"]).stdout, None, since)
        after = _meminfo(device)
        if bandwidth:
            bw = measure_bandwidth(device, argv, after["MemAvailable"])
            if bw:
                cal.update(bw)
                measured.append("bandwidth")
    finally:
        device.remove(remote_dir)
    cal.update({k: ceiling[k] for k in ("ceiling_mb", "ceiling_runs_mb", "ceiling_step_mb")})
    cal.update(
        date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        method=(f"native probe ({kind} build) fills incompressible memory in steps with {hold_ms} ms pauses until "
                f"the low-memory killer ends it (exit 137), bisected, {repeats} final passes, ceiling = the least "
                "VmRSS+VmSwap held; runtime base = the runner's peak on a tiny bundle less the estimate of its "
                "weights, KV cache and temporaries; bandwidth = one-thread streaming read, best of 3"),
        tool=f"edgedeploy {edgedeploy.__version__}", device=facts.serial, device_model=facts.model or facts.serial,
        harness=harness, hold_ms=hold_ms, mem_total_mb=before["MemTotal"],
        mem_available_before_mb=before["MemAvailable"], mem_available_after_mb=after["MemAvailable"],
        swap_total_mb=before["SwapTotal"], swap_free_before_mb=before["SwapFree"], swap_free_after_mb=after["SwapFree"],
        measured=measured,
    )
    if kill:
        cal["lmkd"] = kill["line"]
    cal = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in cal.items()}
    data = {k: v for k, v in base.to_dict().items() if k not in ("source", "calibration", "props")}
    data.update(name=name, calibrated=True, usable_budget_mb=cal["ceiling_mb"],
                description=f"{base.description}; calibrated on {cal['device_model']} {cal['date'][:10]}")
    if "runtime_base_mb" in cal:
        data["runtime_base_mb"] = cal["runtime_base_mb"]
    for k in ("mcpu", "mattr"):
        if data.get(k) is None:
            data.pop(k, None)
        elif k == "mattr":
            data[k] = list(data[k])
    data["props"] = dict(base.props)
    data["calibration"] = cal
    return {"profile": data, "passes": ceiling["passes"]}


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"not a finite number: {v}")
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def to_toml(data: dict[str, Any]) -> str:
    """The profile as TOML: top-level fields, then the [props] and [calibration] tables.

    TOML has no null: an optional field that is unset (``pin_cpus``, ``mcpu``) is left out, as on load.
    """
    lines = ["# Written by `edgedeploy calibrate`: measured on the device (see [calibration]).", ""]
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    for k, v in data.items():
        if k not in tables and v is not None:
            lines.append(f"{k} = {_toml_value(v)}")
    for t, fields in tables.items():
        lines += ["", f"[{t}]"]
        lines += [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in fields.items() if v is not None]
    return "\n".join(lines) + "\n"


def write_profile(data: dict[str, Any], out: Path | None = None) -> Path:
    """Validate ``data`` as a profile and write it (default: the user's profiles folder, NAME.toml)."""
    import tomllib

    text = to_toml(data)
    path = Path(out) if out else user_profiles_dir() / f"{data['name']}.toml"
    if path.suffix != ".toml":
        raise InputError(f"--out {path}: a profile file must end in .toml")
    _validate(tomllib.loads(text), str(path))  # what load_profile will check, before anything is written
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path
