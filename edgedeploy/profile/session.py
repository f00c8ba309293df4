"""Run scripted prompts on a device and collect measurements: the heart of ``edgedeploy profile``.

Each run is a fresh runner process started by one device shell command that also samples
``/proc/PID/status`` (VmRSS, VmHWM) while it runs, so we get a memory timeline without a second
connection. The runner's own JSON line (its VmHWM read just before exit) is the peak of record; the
timeline is what is left when the runner is killed for memory (exit 137) and cannot report.
"""

from __future__ import annotations

import hashlib
import json
import math
import posixpath
import re
import shlex
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgedeploy.bundle import MANIFEST, Manifest, read_manifest, sha256_file
from edgedeploy.devices.base import TIMEOUT_EXIT, Device
from edgedeploy.profile import app_harness, energy, memory, variance
from edgedeploy.profile.prompts import PromptSpec, TokenizedPrompt, tokenize_prompt
from edgedeploy.profile.push import PushProgress, local_files, push_bundle, push_files, remove_pushed
from edgedeploy.profile.runners import RunnerSpec, select_runner
from edgedeploy.results import ManifestInfo, ModelResult, PromptSet, PushInfo, Reference, Run, RunnerInfo, Summary
from edgedeploy.results.record import SchemaError
from edgedeploy.runtime.launch import RunFailed, parse_result, run_local, runner_args
from edgedeploy.runtime.tokenizer import open_tokenizer

KILLED = 137
#: How much longer than --timeout the transport waits for the shell before it gives up on it.
TRANSPORT_GRACE_S = 30.0
SAMPLE_S = 0.1
GPU_EVERY = 10
#: Thermal zones, CPU clocks and the fuel gauge are read every SENSOR_EVERY-th memory sample.
SENSOR_EVERY = 2
#: Events for the CLI's progress display: (what, detail).
Event = Callable[[str, str], None]


def _no_event(what: str, detail: str) -> None:
    pass


def _summary(values: list[float]) -> dict[str, float]:
    # median, stdev, min, max, n, plus mean, 95% t interval and CV (edgedeploy.profile.variance)
    return variance.describe(values)


_LMKD = re.compile(r"Kill '([^']*)' \((\d+)\).*?to free (\d+)kB")


def lmkd_kill(logcat: str, pid: int | None, since: str = "") -> dict[str, Any] | None:
    """The low-memory-killer line in ``logcat -d`` output: the one for ``pid``, else the last one.

    Only lines stamped at or after ``since`` (the device's ``date '+%m-%d %H:%M:%S'`` before the run;
    logcat's threadtime stamps sort the same way) count, so a kill from an earlier run is never blamed.
    """
    found = None
    for line in logcat.splitlines():
        m = _LMKD.search(line)
        if not m or line[:14] < since:
            continue
        kill = {"process": m.group(1), "pid": int(m.group(2)), "freed_bytes": int(m.group(3)) * 1024,
                "line": line.strip()}
        if found is None or found["pid"] != pid:
            found = kill
    return found


def device_clock(device: Device) -> str:
    """The device's time in logcat's stamp format (month-day hour:minute:second)."""
    r = device.run_args(["date", "+%m-%d %H:%M:%S"])
    return r.stdout.strip() if r.exit_code == 0 else ""


def _runner_script(runner: RunnerSpec, runner_dir: str, run_dir: str, bundle: str, prompt: str,
                   threads: int | None, touch_kv: bool, timeout: float, cpus: list[int] | None = None,
                   gauge: str | None = None, sensors: bool = True) -> str:
    # The push verified every file on the device against the manifest just before (and re-hashed any
    # that changed since it was recorded); the runner still checks names, sizes and the weights index.
    args = [*runner.command(runner_dir), *runner_args(bundle, prompt, None, threads, touch_kv, verify=False)]
    q = shlex.quote
    if cpus:
        # Pinned to the chosen CPUs (the big cores): a hex mask, as toybox's taskset takes no -c.
        args = ["taskset", variance.taskset_mask(cpus), *args]
    cmd = " ".join(q(a) for a in args)
    # Thermal zones, CPU clocks and the fuel gauge, stamped with /proc/uptime (edgedeploy.profile.variance).
    sens = (f"  [ $((n % {SENSOR_EVERY})) -eq 0 ] && {{ {variance.sensor_command(gauge)}; }}\n" if sensors else "")
    # A zombie keeps /proc/PID but loses its Vm* lines: that ends the sampling loop before `wait` reaps it.
    return (f"cd {q(run_dir)} || exit 97\n"
            f"{cmd} > result.json 2> stderr.txt &\n"
            "pid=$!\necho pid=$pid\n"
            "read up _ < /proc/uptime; echo launch=$up\n"
            # VmSwap: pages zram took out of RSS still belong to the run (edgedeploy.profile.memory).
            # GPU buffers (OpenCL on Adreno) are not in RSS: DMA-BUF fds (fdinfo) and mappings (maps),
            # and dumpsys meminfo's EGL/GL mtrack and Graphics rows count them; PSS from smaps_rollup.
            # These are slower to read, so they come every GPU_EVERY-th sample (dumpsys only where it exists).
            "gpu=$(command -v dumpsys >/dev/null 2>&1 && echo 1); n=0; to=; start=$(date +%s)\n"
            "while :; do\n"
            "  s=$(grep -E '^(VmRSS|VmHWM|VmSwap):' /proc/$pid/status 2>/dev/null | tr -s ' \\n' '  ')\n"
            "  [ -z \"$s\" ] && break\n"
            "  echo \"mem $s\"\n"
            f"{sens}"
            f"  if [ $((n % {GPU_EVERY})) -eq 0 ]; then\n"
            "    [ -n \"$gpu\" ] && dumpsys meminfo $pid 2>/dev/null | grep -E '^ *(EGL mtrack|GL mtrack|Graphics:) '"
            " | sed 's/^/gpu /'\n"
            "    grep -H -E '^(ino|size|exp_name):' /proc/$pid/fdinfo/* 2>/dev/null | sed 's/^/fdinfo /'\n"
            "    grep ' /dmabuf' /proc/$pid/maps 2>/dev/null | sed 's/^/maps /'\n"
            "    grep -E '^(Rss|Pss|Swap|SwapPss):' /proc/$pid/smaps_rollup 2>/dev/null | sed 's/^/rollup /'\n"
            "    echo extra-end\n"
            "  fi\n"
            "  n=$((n + 1))\n"
            # The timeout is kept on the device, so every backend ends a slow run alike and the samples
            # taken so far come back (a transport timeout would lose them).
            # n samples took at least n * SAMPLE_S seconds, so that bound never ends a run early.
            f"  if [ -z \"$to\" ] && {{ [ $n -ge {math.ceil(timeout / SAMPLE_S)} ] ||"
            f" [ $(($(date +%s) - start)) -gt {math.ceil(timeout)} ]; }}; then\n"
            "    kill -9 $pid; echo timeout=1; to=1\n"
            "  fi\n"
            f"  sleep {SAMPLE_S}\n"
            "done\n"
            "wait $pid\nrc=$?\nread up _ < /proc/uptime; echo end=$up\necho rc=$rc\n")


def gpu_kb(line: str) -> int:
    """GPU KB in dumpsys meminfo rows: max(EGL mtrack + GL mtrack, Graphics:) (see :mod:`.memory`)."""
    return memory.memtrack_bytes(line.replace("gpu ", "\n")) // 1024


def _parse_samples(stdout: str) -> tuple[int | None, list[dict[str, float]], int | None]:
    pid = rc = None
    timeline: list[dict[str, float]] = []
    extra: dict[str, list[str]] = {"gpu": [], "fdinfo": [], "maps": [], "rollup": []}
    for line in stdout.splitlines():
        kind, _, rest = line.partition(" ")
        if kind in extra:
            extra[kind].append(rest)
        elif line == "extra-end" and timeline:
            # The slower sources of one sample (every GPU_EVERY-th): GPU memory two ways, and PSS.
            fdinfos = memory.split_grep_h("\n".join(extra["fdinfo"]))
            sample = timeline[-1]
            sample["dmabuf_bytes"] = memory.dmabuf_bytes(fdinfos, "\n".join(extra["maps"]))
            sample["memtrack_bytes"] = memory.memtrack_bytes("\n".join(extra["gpu"]))
            sample["gpu_bytes"] = max(sample["dmabuf_bytes"], sample["memtrack_bytes"])
            pss = memory.parse_smaps_rollup("\n".join(extra["rollup"])).get("Pss")
            if pss is not None:
                sample["pss_bytes"] = pss
            extra = {k: [] for k in extra}
        elif line.startswith("pid="):
            pid = int(line[4:])
        elif line.startswith("rc="):
            rc = int(line[3:])
        elif line.startswith("mem "):
            nums = dict(re.findall(r"(VmRSS|VmHWM|VmSwap):\s*(\d+) kB", line))
            timeline.append({"t_s": round(len(timeline) * SAMPLE_S, 3),
                             "rss_bytes": int(nums.get("VmRSS", 0)) * 1024,
                             "hwm_bytes": int(nums.get("VmHWM", 0)) * 1024,
                             "swap_bytes": int(nums.get("VmSwap", 0)) * 1024})
    return pid, timeline, rc


def run_once(device: Device, runner: RunnerSpec, runner_dir: str, remote_bundle: str, run_dir: str,
             prompt: TokenizedPrompt, threads: int | None, touch_kv: bool, timeout: float,
             cpus: list[int] | None = None, gauge: str | None = None,
             idle: dict[str, Any] | None = None) -> dict[str, Any]:
    """One runner process on the device; returns its result line plus exit code, timeline and kill info.

    ``cpus`` pins the runner (taskset); ``gauge`` is the fuel gauge's folder, read with the thermal zones and
    clocks; ``idle`` is the sensor sample taken just before (its power is the run's idle baseline).
    """
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "prompt.json"
        local.write_text(json.dumps({"token_ids": prompt.token_ids, "max_new_tokens": prompt.max_new_tokens}))
        remote_prompt = posixpath.join(run_dir, "prompt.json")
        device.push(local, remote_prompt)
    device.run_args(["rm", "-f", posixpath.join(run_dir, "result.json"), posixpath.join(run_dir, "stderr.txt")])
    since = device_clock(device)
    t0 = time.perf_counter()
    # The transport's own timeout is only a backstop for a shell that stops answering.
    shell = device.shell(_runner_script(runner, runner_dir, run_dir, remote_bundle, remote_prompt, threads,
                                        touch_kv, timeout, cpus, gauge), timeout=timeout + TRANSPORT_GRACE_S)
    wall = time.perf_counter() - t0
    pid, timeline, rc = _parse_samples(shell.stdout)
    timed_out = "timeout=1" in shell.stdout.splitlines() or (rc is None and shell.exit_code == TIMEOUT_EXIT)
    if rc is None:
        # The shell itself died (killed with its child, or timed out): end whatever it left behind.
        if pid:
            device.run_args(["kill", "-9", str(pid)])
        rc = shell.exit_code if shell.exit_code else TIMEOUT_EXIT
    out = device.run_args(["cat", posixpath.join(run_dir, "result.json")]).stdout
    try:
        record = parse_result(out, rc)
    except Exception:  # noqa: BLE001 - no result line is the normal outcome of a kill
        err = device.run_args(["tail", "-n", "5", posixpath.join(run_dir, "stderr.txt")]).stdout.strip()
        record = {"exit_code": rc, "error": f"runner exited with code {rc} and no result"
                  + (f": {err.splitlines()[-1]}" if err else "")}
    sampled = max((t["hwm_bytes"] for t in timeline), default=0)
    if "peak_rss_bytes" in record and sampled > record["peak_rss_bytes"]:
        # The runner reads its VmHWM just before it prints; the interpreter's teardown can still grow
        # the process a little, and the samples of /proc/PID/status see that too.
        record["peak_rss_bytes"] = sampled
    # The peak that counts swap and GPU buffers, each part with its source (edgedeploy.profile.memory).
    acc = memory.account(timeline, int(record.get("peak_rss_bytes") or 0))
    record.update(wall_s=wall, timeline=timeline[:: max(1, len(timeline) // 200)], device_pid=pid,
                  gpu_peak_bytes=acc["gpu_bytes"], memory=acc)
    _add_sensors(record, shell.stdout, cpus, gauge, idle)
    if timed_out:
        last = max((s["rss_bytes"] for s in timeline), default=0)
        record.update(exit_code=TIMEOUT_EXIT, timed_out=True, last_rss_bytes=last,
                      error=f"timed out after {timeout:g} s (--timeout); last RSS {last / 2**20:,.0f} MiB, "
                            f"{len(timeline)} memory samples kept")
    elif rc == KILLED:
        kill = lmkd_kill(device.run_args(["logcat", "-d"]).stdout, pid, since)
        last = max((s["rss_bytes"] for s in timeline), default=0)
        record["killed"] = {"signal": "SIGKILL", "last_rss_bytes": last,
                            "killed_at_bytes": max(last, kill["freed_bytes"] if kill else 0), "lmkd": kill}
        record["error"] = f"killed at {record['killed']['killed_at_bytes'] / 2**20:,.0f} MiB (exit 137)"
    return record


def _stamp(stdout: str, key: str) -> float | None:
    line = next((ln for ln in stdout.splitlines() if ln.startswith(key + "=")), None)
    try:
        return float(line.split("=", 1)[1]) if line else None
    except ValueError:
        return None


def _add_sensors(record: dict[str, Any], stdout: str, cpus: list[int] | None, gauge: str | None,
                 idle: dict[str, Any] | None) -> None:
    """Temperatures, clocks and energy of one run (stored with the run; see variance and energy)."""
    samples = [s for s in map(variance.parse_sensor_line, stdout.splitlines()) if s]
    launch, end = _stamp(stdout, "launch"), _stamp(stdout, "end")
    record["pinned_cpus"] = cpus
    record["device_clock"] = {"launch": launch, "end": end}
    record["thermal"] = variance.summarise_sensors(samples)
    keep = samples[:: max(1, len(samples) // 200)]
    record["sensors"] = [{"t": s["t"], "temps_c": s["temps_c"], "freq_khz": s["freq_khz"],
                          **({"gauge": s["gauge"]} if s["gauge"] else {})} for s in keep]
    if gauge:
        record["energy"] = energy.run_energy(samples, record, idle, end)


def profile_bundle(device: Device, bundle_dir: Path, prompts: list[PromptSpec], runs: int = 3, warmup: int = 1,
                   cooldown_s: float = 0.0, threads: int | None = None, touch_kv: bool = True, keep: bool = False,
                   reference: Path | None = None, timeout: float = 900.0, push_progress: PushProgress | None = None,
                   event: Event = _no_event, runner: str = "auto", runner_dir: Path | None = None,
                   ndk: Path | None = None, harness: str = "shell", reverify: bool = False,
                   cooldown_temp: float = variance.DEFAULT_COOLDOWN_TEMP_C,
                   cooldown_max_s: float = variance.DEFAULT_COOLDOWN_MAX_S, cpus: str | None = None,
                   max_cv: float | None = None, energy_on: bool = True) -> ModelResult:
    """Push ``bundle_dir``, run every prompt ``warmup`` + ``runs`` times, return the measurements (not evaluated).

    ``reference`` is a host bundle of the same model whose tokens the device must reproduce (default:
    the bundle itself when it is a host build). Files and processes started on the device are removed
    at the end unless ``keep``. ``runner`` is ``auto``, ``python`` or ``native``; ``runner_dir`` and ``ndk``
    are for Android bundles (see :mod:`edgedeploy.profile.runners`). ``harness="app"`` runs through the
    harness app (:mod:`edgedeploy.profile.app_harness`) instead of a shell process. Files already on the
    device are re-hashed there when they changed since they were verified, or all of them with ``reverify``.

    Variance control (:mod:`.variance`): before each measured run the device cools to ``cooldown_temp`` (at
    most ``cooldown_max_s``); the runner is pinned per ``cpus`` (auto: the big cores); ``max_cv`` makes the
    report fail a prompt set whose decode tok/s CV exceeds it. With ``energy_on`` and a fuel gauge, the
    battery is set unplugged for the runs and always reset after (:mod:`.energy`).
    """
    manifest: Manifest = read_manifest(bundle_dir)
    # bundle.json lists the sha256 of every other file: its own hash names the build (in the history).
    bundle_sha256 = hashlib.sha256((bundle_dir / "bundle.json").read_bytes()).hexdigest()
    # The prompts are tokenized on this host, all of them before anything is pushed: a bundle without a
    # usable tokenizer fails here, not after minutes of pushing.
    tokenizer = open_tokenizer(bundle_dir, "to tokenize the scripted prompts")
    tokenized = [tokenize_prompt(spec, tokenizer, manifest.context_window, source=tokenizer.path) for spec in prompts]
    facts = device.facts()
    link_tmp = tempfile.TemporaryDirectory(prefix="edgedeploy-link-")
    app = harness == "app"
    if app:
        app_harness.check_installed(device)
    runner_spec = select_runner(facts, manifest, bundle_dir, runner, runner_dir, ndk, Path(link_tmp.name), harness)
    remote_bundle = (app_harness.remote_bundle_dir(bundle_dir.resolve().name) if app
                     else posixpath.join(device.work_dir, "bundles", bundle_dir.resolve().name))
    remote_runner = posixpath.join(device.work_dir, "runners", runner_spec.abi)
    run_dir = posixpath.join(device.work_dir, "runs", uuid.uuid4().hex[:12])
    event("push", f"{bundle_dir} -> {device.serial}:{remote_bundle}")
    power: dict[str, Any] = {}
    try:
        stats = push_bundle(device, bundle_dir, remote_bundle, progress=push_progress, extra=runner_spec.bundle_extra,
                            rehash=reverify)
        if stats.changed_on_device:
            event("push", f"changed on the device since they were verified, sent again: "
                          f"{', '.join(stats.changed_on_device)}")
        if runner_spec.files:
            event("push", f"{runner_spec.kind} runner ({runner_spec.elf_machine}) -> {device.serial}:{remote_runner}")
            push_files(device, local_files(runner_spec.files), remote_runner, rehash=reverify)
            device.run_args(["chmod", "755", *(posixpath.join(remote_runner, n) for n in runner_spec.files)])
        device.mkdir(run_dir)
        control = _variance_setup(device, app, cpus, cooldown_temp, cooldown_max_s, max_cv, event)
        pin = control["cpus"]["cpus"] if not app else None
        gauge, why = energy.find_gauge(device) if energy_on and not app else (None, "")
        power = {"available": False, "reason": ("--no-energy" if not energy_on else "not measured through the "
                                                "harness app") if not (energy_on and not app) else why,
                 "method": energy.METHOD, "limits": energy.LIMITS, "gauge": gauge}
        if gauge and energy.has_dumpsys(device):
            power["unplugged"] = unplugged = energy.battery_unplug(device)
            event("energy", f"fuel gauge {gauge}; dumpsys battery unplug {'done' if unplugged else 'failed'}")
        cool = variance.Cooldown(cooldown_temp, cooldown_max_s)
        ref_dir = reference or (bundle_dir if manifest.target == "host" else None)
        results = []
        # One run per model that writes the whole KV cache is enough for the peak (the report takes the
        # maximum over runs); doing it in every run would add a full-window prefill to each one.
        touch_pending = touch_kv
        for spec, prompt in zip(prompts, tokenized, strict=True):
            entry = PromptSet.from_dict({**prompt.to_dict(), "description": spec.description, "warmup": [],
                                         "runs": [], "summary": {}})
            where = f"{bundle_dir.name}: prompt {spec.name}"
            if app:
                if cooldown_max_s > 0:  # one app process runs them all: one cool-down before it starts
                    cool.wait(device)
                event("run", f"{spec.name} through the harness app ({warmup} warm-up + {runs} runs)")
                records = [_as_run(r, where) for r in _run_app(device, remote_bundle, prompt, warmup + runs, threads,
                                                               touch_pending, timeout)]
                touch_pending = False
                entry.warmup, entry.runs = records[:warmup], records[warmup:]
            for i in range(0 if app else warmup + runs):
                kind = "warmup" if i < warmup else "runs"
                event("run", f"{spec.name} {kind} {i + 1 - (warmup if kind == 'runs' else 0)}")
                waited = idle = None
                if kind == "runs" and cooldown_max_s > 0:
                    waited = cool.wait(device, gauge)
                    waited.pop("sample")
                    if waited["waited_s"] >= 1:
                        event("cool-down", f"{waited['waited_s']:.0f} s, {waited['start_c']:.1f} -> "
                                           f"{waited['end_c']:.1f} °C")
                if gauge:
                    idle = energy.idle_sample(device, gauge)
                raw = run_once(device, runner_spec, remote_runner, remote_bundle, run_dir, prompt, threads,
                               touch_pending, timeout, pin, gauge, idle)
                if waited is not None:
                    raw["cooldown"] = waited
                rec = _as_run(raw, where)
                touch_pending = False
                (entry.warmup if kind == "warmup" else entry.runs).append(rec)
                if rec.killed or rec.timed_out:
                    break  # the next run would end the same way; the report needs one
                if cooldown_s and i + 1 < warmup + runs:
                    time.sleep(cooldown_s)
            entry.summary = _run_summary(entry.runs or entry.warmup)
            if gauge:
                entry.extra["energy"] = energy.summarise([r.extra.get("energy") or {} for r in entry.runs])
            entry.reference = _reference(ref_dir, prompt, threads) if ref_dir else None
            results.append(entry)
            if any(r.killed for r in entry.all_runs()):
                break
    finally:
        if power.get("unplugged") is not None:
            # Always, whatever failed above: a phone left "unplugged" keeps reporting a frozen battery state.
            power["reset"] = energy.battery_reset(device)
            event("energy", f"dumpsys battery reset {'done' if power['reset'] else 'FAILED: run it by hand'}")
        link_tmp.cleanup()
        if not keep:
            device.remove(run_dir)
            remove_pushed(device, remote_bundle)
            if runner_spec.files:
                remove_pushed(device, remote_runner)
            if app:
                device.remove(posixpath.join(app_harness.APP_FILES, "prompt.json"))
    if gauge:
        power.update(available=any((p.extra.get("energy") or {}).get("available") for p in results), reason=(
            next(((p.extra.get("energy") or {}).get("reason") for p in results
                  if not (p.extra.get("energy") or {}).get("available")), None) or why))
    control["thermal_status_after"] = variance.thermal_status(device)
    result = ModelResult(bundle=str(bundle_dir), model=bundle_dir.resolve().name,
                       bundle_sha256=bundle_sha256,
                       manifest=ManifestInfo.from_dict(_manifest_fields(manifest), "manifest"),
                       runner=RunnerInfo.from_dict(runner_spec.to_dict(), "runner"),
                       push=PushInfo.from_dict(stats.to_dict(), "push"), prompts=results, threads=threads,
                       touch_kv=touch_kv, runs=runs, warmup=warmup, harness=harness)
    result.extra.update(variance=control, energy=power)
    return result


def _variance_setup(device: Device, app: bool, cpus: str | None, cooldown_temp: float, cooldown_max_s: float,
                    max_cv: float | None, event: Event) -> dict[str, Any]:
    """The CPUs to pin to, the zones' types and the thermal status before the runs, and the settings."""
    pin = ({"request": cpus or "auto", "cpus": None, "reason": "the harness app runs unpinned"} if app
           else variance.choose_cpus(device, cpus))
    if pin["cpus"]:
        event("pin", f"runner pinned to CPUs {','.join(map(str, pin['cpus']))} ({pin['reason']})")
    return {"cpus": pin, "zone_types": variance.zone_types(device), "cooldown_temp_c": cooldown_temp,
            "cooldown_max_s": cooldown_max_s, "max_cv_pct": max_cv, "flag_cv_pct": variance.DEFAULT_MAX_CV_PCT,
            "thermal_status_before": variance.thermal_status(device)}


def _as_run(record: dict[str, Any], where: str) -> Run:
    """A run's record (the runner's result line plus what the device saw) as a :class:`Run`."""
    try:
        return Run.from_dict(record)
    except SchemaError as e:
        raise RunFailed(f"{where}: the runner's result line is malformed: {e}") from None


def _run_app(device: Device, remote_bundle: str, prompt: TokenizedPrompt, count: int, threads: int | None,
             touch_kv: bool, timeout: float) -> list[dict[str, Any]]:
    """``count`` runs in one harness-app process; a missing ``done`` file means the app was killed."""
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "prompt.json"
        local.write_text(json.dumps({"token_ids": prompt.token_ids, "max_new_tokens": prompt.max_new_tokens}))
        remote_prompt = posixpath.join(app_harness.APP_FILES, "prompt.json")
        device.push(local, remote_prompt)
    since = device_clock(device)
    records, info = app_harness.run_app(device, remote_bundle, remote_prompt, prompt.max_new_tokens, count, threads,
                                        touch_kv, timeout)
    for rec in records:
        rec["timeline"] = info["timeline"]
    if not info["done"] or info["done"].startswith("error"):
        kill = lmkd_kill(device.run_args(["logcat", "-d"]).stdout, info["pid"], since)
        last = max((s["rss_bytes"] for s in info["timeline"]), default=0)
        at = max(last, kill["freed_bytes"] if kill else 0)
        if kill or not info["done"]:
            records.append({"exit_code": KILLED, "timeline": info["timeline"], "device_pid": info["pid"],
                            "error": f"app killed at {at / 2**20:,.0f} MiB (no files/done)",
                            "killed": {"signal": "SIGKILL", "last_rss_bytes": last, "killed_at_bytes": at,
                                       "lmkd": kill}})
        else:
            records.append({"exit_code": 3, "error": f"harness app: {info['done']}"})
    return records


def _run_summary(runs: list[Run]) -> Summary:
    ok = [r for r in runs if not r.error]
    keys = ("load_s", "ttft_s", "prefill_tok_s", "decode_tok_s", "peak_rss_bytes")
    return Summary.from_dict({k: _summary([float(v) for r in ok if (v := r.metric(k)) is not None]) for k in keys})


#: Host reference tokens by (bundle.json's sha256, prompt ids, max new tokens, threads), for this process:
#: a farm profiles one bundle on many phones at once, and greedy tokens of one bundle do not change.
_REFERENCES: dict[tuple[Any, ...], Reference] = {}
_REFERENCE_LOCKS: dict[tuple[Any, ...], threading.Lock] = {}
_REFERENCE_GUARD = threading.Lock()


def _reference(ref_dir: Path, prompt: TokenizedPrompt, threads: int | None) -> Reference:
    """The host runner's tokens for ``prompt``, run once per bundle and prompt (failures are not kept)."""
    key = (sha256_file(ref_dir / MANIFEST), tuple(prompt.token_ids), prompt.max_new_tokens, threads)
    with _REFERENCE_GUARD:
        lock = _REFERENCE_LOCKS.setdefault(key, threading.Lock())
    with lock:  # a second phone of the same bundle waits for the first one's reference instead of running it
        if key in _REFERENCES:
            return _REFERENCES[key]
        r = run_local(ref_dir, prompt.token_ids, prompt.max_new_tokens, threads=threads)
        ref = Reference(bundle=str(ref_dir), token_ids=r.get("token_ids"), error=r.get("error"))
        if ref.error is None:
            _REFERENCES[key] = ref
        return ref


def _manifest_fields(m: Manifest) -> dict[str, Any]:
    return {"architecture": m.architecture, "family": m.family, "parameters": m.parameters, "dtype": m.dtype,
            "target": m.target, "context_window": m.context_window, "prefill_chunk": m.prefill_chunk,
            "weights_bytes": m.weights_bytes, "config": m.config, "rules": m.rules}
