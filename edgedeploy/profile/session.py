"""Run scripted prompts on a device and collect measurements: the heart of ``edgedeploy profile``.

Each run is a fresh runner process started by one device shell command that also samples
``/proc/PID/status`` (VmRSS, VmHWM) while it runs, so we get a memory timeline without a second
connection. The runner's own JSON line (its VmHWM read just before exit) is the peak of record; the
timeline is what is left when the runner is killed for memory (exit 137) and cannot report.
"""

from __future__ import annotations

import json
import math
import posixpath
import re
import shlex
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgedeploy.bundle import Manifest, read_manifest
from edgedeploy.devices.base import TIMEOUT_EXIT, Device, DeviceError
from edgedeploy.profile import app_harness
from edgedeploy.profile.prompts import PromptSpec, TokenizedPrompt, tokenize_prompt
from edgedeploy.profile.push import PushProgress, local_files, push_bundle, push_files, remove_pushed
from edgedeploy.profile.runners import RunnerSpec, select_runner
from edgedeploy.runtime.launch import load_tokenizer, parse_result, run_local, runner_args

KILLED = 137
#: How much longer than --timeout the transport waits for the shell before it gives up on it.
TRANSPORT_GRACE_S = 30.0
SAMPLE_S = 0.1
GPU_EVERY = 10
#: Events for the CLI's progress display: (what, detail).
Event = Callable[[str, str], None]


def _no_event(what: str, detail: str) -> None:
    pass


def _summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {"median": statistics.median(values), "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


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
                   threads: int | None, touch_kv: bool, timeout: float) -> str:
    # The push verified every file on the device against the manifest just before (and re-hashed any
    # that changed since it was recorded); the runner still checks names, sizes and the weights index.
    args = [*runner.command(runner_dir), *runner_args(bundle, prompt, None, threads, touch_kv, verify=False)]
    q = shlex.quote
    cmd = " ".join(q(a) for a in args)
    # A zombie keeps /proc/PID but loses its Vm* lines: that ends the sampling loop before `wait` reaps it.
    return (f"cd {q(run_dir)} || exit 97\n"
            f"{cmd} > result.json 2> stderr.txt &\n"
            "pid=$!\necho pid=$pid\n"
            # GPU buffers (OpenCL on Adreno) are not in RSS: dumpsys meminfo's GL mtrack / Graphics rows
            # count them. dumpsys is slow, so it runs every GPU_EVERY-th sample, and only where it exists.
            "gpu=$(command -v dumpsys >/dev/null 2>&1 && echo 1); n=0; to=; start=$(date +%s)\n"
            "while :; do\n"
            "  s=$(grep -E '^(VmRSS|VmHWM):' /proc/$pid/status 2>/dev/null | tr -s ' \\n' '  ')\n"
            "  [ -z \"$s\" ] && break\n"
            "  echo \"mem $s\"\n"
            f"  if [ -n \"$gpu\" ] && [ $((n % {GPU_EVERY})) -eq 0 ]; then\n"
            "    g=$(dumpsys meminfo $pid 2>/dev/null | grep -E '^ *(GL mtrack|Graphics):? ' | tr -s ' \\n' '  ')\n"
            "    [ -n \"$g\" ] && echo \"gpu $g\"\n"
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
            "wait $pid\necho rc=$?\n")


def gpu_kb(line: str) -> int:
    """The largest KB figure of dumpsys meminfo's ``GL mtrack`` / ``Graphics:`` rows in one sample line."""
    return max((int(v) for v in re.findall(r"(?:GL mtrack|Graphics:?)\s+(\d+)", line)), default=0)


def _parse_samples(stdout: str) -> tuple[int | None, list[dict[str, float]], int | None]:
    pid = rc = None
    timeline: list[dict[str, float]] = []
    for line in stdout.splitlines():
        if line.startswith("gpu ") and timeline:
            timeline[-1]["gpu_bytes"] = gpu_kb(line) * 1024
        elif line.startswith("pid="):
            pid = int(line[4:])
        elif line.startswith("rc="):
            rc = int(line[3:])
        elif line.startswith("mem "):
            nums = dict(re.findall(r"(VmRSS|VmHWM):\s*(\d+) kB", line))
            timeline.append({"t_s": round(len(timeline) * SAMPLE_S, 3),
                             "rss_bytes": int(nums.get("VmRSS", 0)) * 1024,
                             "hwm_bytes": int(nums.get("VmHWM", 0)) * 1024})
    return pid, timeline, rc


def run_once(device: Device, runner: RunnerSpec, runner_dir: str, remote_bundle: str, run_dir: str,
             prompt: TokenizedPrompt, threads: int | None, touch_kv: bool, timeout: float) -> dict[str, Any]:
    """One runner process on the device; returns its result line plus exit code, timeline and kill info."""
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
                                        touch_kv, timeout), timeout=timeout + TRANSPORT_GRACE_S)
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
    gpu = max((t.get("gpu_bytes", 0) for t in timeline), default=0)
    record.update(wall_s=wall, timeline=timeline[:: max(1, len(timeline) // 200)], device_pid=pid,
                  gpu_peak_bytes=gpu)
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


def profile_bundle(device: Device, bundle_dir: Path, prompts: list[PromptSpec], runs: int = 3, warmup: int = 1,
                   cooldown_s: float = 0.0, threads: int | None = None, touch_kv: bool = True, keep: bool = False,
                   reference: Path | None = None, timeout: float = 900.0, push_progress: PushProgress | None = None,
                   event: Event = _no_event, runner: str = "auto", runner_dir: Path | None = None,
                   ndk: Path | None = None, harness: str = "shell", reverify: bool = False) -> dict[str, Any]:
    """Push ``bundle_dir``, run every prompt ``warmup`` + ``runs`` times, return the raw measurements.

    ``reference`` is a host bundle of the same model whose tokens the device must reproduce (default:
    the bundle itself when it is a host build). Files and processes started on the device are removed
    at the end unless ``keep``. ``runner`` is ``auto``, ``python`` or ``native``; ``runner_dir`` and ``ndk``
    are for Android bundles (see :mod:`edgedeploy.profile.runners`). ``harness="app"`` runs through the
    harness app (:mod:`edgedeploy.profile.app_harness`) instead of a shell process. Files already on the
    device are re-hashed there when they changed since they were verified, or all of them with ``reverify``.
    """
    manifest: Manifest = read_manifest(bundle_dir)
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
        tok_path = bundle_dir / "tokenizer.json"
        if not tok_path.is_file():
            raise DeviceError(f"{bundle_dir}: the bundle has no tokenizer.json to tokenize the scripted prompts")
        tokenizer = load_tokenizer(tok_path)
        ref_dir = reference or (bundle_dir if manifest.target == "host" else None)
        results = []
        # One run per model that writes the whole KV cache is enough for the peak (the report takes the
        # maximum over runs); doing it in every run would add a full-window prefill to each one.
        touch_pending = touch_kv
        for spec in prompts:
            prompt = tokenize_prompt(spec, tokenizer, manifest.context_window, source=tok_path)
            entry: dict[str, Any] = {**prompt.to_dict(), "description": spec.description, "warmup": [], "runs": []}
            if app:
                event("run", f"{spec.name} through the harness app ({warmup} warm-up + {runs} runs)")
                records = _run_app(device, remote_bundle, prompt, warmup + runs, threads, touch_pending, timeout)
                touch_pending = False
                entry["warmup"], entry["runs"] = records[:warmup], records[warmup:]
            for i in range(0 if app else warmup + runs):
                kind = "warmup" if i < warmup else "runs"
                event("run", f"{spec.name} {kind} {i + 1 - (warmup if kind == 'runs' else 0)}")
                rec = run_once(device, runner_spec, remote_runner, remote_bundle, run_dir, prompt, threads,
                               touch_pending, timeout)
                touch_pending = False
                entry[kind].append(rec)
                if rec.get("killed") or rec.get("timed_out"):
                    break  # the next run would end the same way; the report needs one
                if cooldown_s and i + 1 < warmup + runs:
                    time.sleep(cooldown_s)
            entry["summary"] = _run_summary(entry["runs"] or entry["warmup"])
            entry["reference"] = _reference(ref_dir, prompt, threads) if ref_dir else None
            results.append(entry)
            if any(r.get("killed") for r in entry["warmup"] + entry["runs"]):
                break
    finally:
        link_tmp.cleanup()
        if not keep:
            device.remove(run_dir)
            remove_pushed(device, remote_bundle)
            if runner_spec.files:
                remove_pushed(device, remote_runner)
            if app:
                device.remove(posixpath.join(app_harness.APP_FILES, "prompt.json"))
    return {"bundle": str(bundle_dir), "model": bundle_dir.resolve().name, "manifest": _manifest_fields(manifest),
            "runner": runner_spec.to_dict(), "push": stats.to_dict(), "prompts": results, "threads": threads,
            "touch_kv": touch_kv, "runs": runs, "warmup": warmup, "harness": harness}


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


def _run_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if not r.get("error")]
    keys = ("load_s", "ttft_s", "prefill_tok_s", "decode_tok_s", "peak_rss_bytes")
    return {k: _summary([float(r[k]) for r in ok if k in r]) for k in keys}


def _reference(ref_dir: Path, prompt: TokenizedPrompt, threads: int | None) -> dict[str, Any]:
    r = run_local(ref_dir, prompt.token_ids, prompt.max_new_tokens, threads=threads)
    return {"bundle": str(ref_dir), "token_ids": r.get("token_ids"), "error": r.get("error")}


def _manifest_fields(m: Manifest) -> dict[str, Any]:
    return {"architecture": m.architecture, "family": m.family, "parameters": m.parameters, "dtype": m.dtype,
            "target": m.target, "context_window": m.context_window, "prefill_chunk": m.prefill_chunk,
            "weights_bytes": m.weights_bytes, "config": m.config, "rules": m.rules}
