"""Runs through the harness app (``android_template/app``): the realistic memory limits of an app.

A binary started from ``adb shell`` gets a different OOM priority than an app and can survive where an
app is killed. The harness app runs the same runner code through JNI inside an app process: we push
the bundle into the app's external files folder, start ``RunnerActivity`` with ``am start`` and the
prompt as intent extras, wait for ``files/done``, and read ``files/results.jsonl`` back with ``run-as``.
"""

from __future__ import annotations

import json
import posixpath
import re
import time
from typing import Any

from edgedeploy.devices.base import Device, DeviceError

PACKAGE = "ai.edgedeploy.harness"
ACTIVITY = f"{PACKAGE}/.RunnerActivity"
#: Readable by the app, writable by adb (the app's private folder is not).
APP_FILES = f"/sdcard/Android/data/{PACKAGE}/files"
POLL_S = 0.25
START_GRACE_S = 2.0


def check_installed(device: Device) -> None:
    """DeviceError unless the harness app is installed."""
    r = device.run_args(["pm", "path", PACKAGE])
    if r.exit_code != 0 or "package:" not in r.stdout:
        raise DeviceError(f"{device.serial}: the harness app {PACKAGE} is not installed; build it from "
                          "android_template/app (see its README) and `adb install` it, or use --harness shell")


def _status(device: Device, pid: str) -> dict[str, int]:
    text = device.run_args(["run-as", PACKAGE, "cat", f"/proc/{pid}/status"]).stdout
    return {k: int(v) * 1024 for k, v in re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", text, re.M)}


def run_app(device: Device, remote_bundle: str, remote_prompt: str, max_new_tokens: int, runs: int,
            threads: int | None, touch_kv: bool, timeout: float) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Start the harness for ``runs`` runs of one prompt; return its result lines and what happened to the app.

    The second value has ``timeline`` (the app's memory, sampled while it ran), ``done`` (the app's
    status line, empty when it never finished) and ``pid``.
    """
    device.run_args(["run-as", PACKAGE, "rm", "-f", "files/done", "files/results.jsonl"])
    cmd = ["am", "start", "-W", "-n", ACTIVITY, "--es", "bundle", remote_bundle, "--es", "prompt_file", remote_prompt,
           "--ei", "runs", str(runs), "--ei", "max_new_tokens", str(max_new_tokens)]
    if threads:
        cmd += ["--ei", "threads", str(threads)]
    if touch_kv:
        cmd += ["--ez", "touch_kv", "true"]
    started = device.run_args(cmd, timeout=timeout)
    if started.exit_code != 0 or "Error" in started.stdout + started.stderr:
        raise DeviceError(f"{device.serial}: am start failed: {(started.stderr or started.stdout).strip()}")
    timeline: list[dict[str, float]] = []
    started_at = time.monotonic()
    deadline = started_at + timeout
    pid = done = ""
    while time.monotonic() < deadline:
        # Exit codes, not output: over adb-shell's v1 shell a "No such file" on stderr arrives as stdout.
        r = device.run_args(["run-as", PACKAGE, "cat", "files/done"])
        done = r.stdout.strip() if r.exit_code == 0 else ""
        if done:
            break
        r = device.run_args(["pidof", PACKAGE])
        now = r.stdout.strip().split() if r.exit_code == 0 else []
        if not now:
            # `am start -W` returns once the app is up, so no process (after a short grace for a slow
            # start) and no files/done means the app died: killed.
            if pid or time.monotonic() > started_at + START_GRACE_S:
                break
        else:
            pid = now[0]
            vm = _status(device, pid)
            if vm:
                timeline.append({"t_s": round(len(timeline) * POLL_S, 3), "rss_bytes": vm.get("VmRSS", 0),
                                 "hwm_bytes": vm.get("VmHWM", 0)})
        time.sleep(POLL_S)
    else:
        device.run_args(["am", "force-stop", PACKAGE])
    r = device.run_args(["run-as", PACKAGE, "cat", "files/results.jsonl"])
    lines = r.stdout.splitlines() if r.exit_code == 0 else []
    records = []
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        rec["exit_code"] = 0 if not rec.get("error") else 3
        records.append(rec)
    return records, {"timeline": timeline, "done": done, "pid": int(pid) if pid.isdigit() else None}


def remote_bundle_dir(name: str) -> str:
    return posixpath.join(APP_FILES, "bundles", name)
