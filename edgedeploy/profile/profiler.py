"""``edgedeploy profile``: open the device, profile each bundle, evaluate, write the report files."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import edgedeploy
from edgedeploy.devices.adb import open_device
from edgedeploy.devices.profiles import DeviceProfile, load_profile
from edgedeploy.fileio import write_renderings
from edgedeploy.history.store import working_commit
from edgedeploy.profile.prompts import DEFAULT_SETS, PromptSpec, load_prompt_file
from edgedeploy.profile.push import PushProgress
from edgedeploy.profile.session import Event, _no_event, profile_bundle
from edgedeploy.report.fit import RENDERERS, SUFFIXES, make_report
from edgedeploy.results import FAIL, DeviceInfo, ProfileInfo, Results


def load_prompts(names: list[str] | None) -> list[PromptSpec]:
    """Prompt files by path or built-in name; the three built-in sets when none are given."""
    return [load_prompt_file(n) for n in (names or DEFAULT_SETS)]


def default_profile(device_spec: str | None) -> str:
    return "host" if device_spec in (None, "", "local") else "reference-12gb"


def profile_models(bundles: list[Path], device_spec: str | None = None, adb_server: str | None = None,
                   profile: DeviceProfile | None = None, prompts: list[PromptSpec] | None = None,
                   push_progress: PushProgress | None = None, event: Event = _no_event,
                   **options: Any) -> Results:
    """Profile every bundle on one device and return the evaluated results (the JSON report's content).

    ``options`` go to :func:`~edgedeploy.profile.session.profile_bundle` (runs, warmup, cooldown_s,
    threads, touch_kv, keep, reference, timeout).
    """
    profile = profile or load_profile(default_profile(device_spec))
    prompts = prompts or load_prompts(None)
    if options.get("cpus") is None and getattr(profile, "pin_cpus", None):
        options["cpus"] = profile.pin_cpus  # the profile's CPUs to pin to, unless --cpus says otherwise
    with open_device(device_spec, adb_server) as device:
        facts = device.facts()
        models = []
        for bundle in bundles:
            event("model", str(bundle))
            model = profile_bundle(device, Path(bundle), prompts, push_progress=push_progress, event=event, **options)
            model.device = DeviceInfo.from_dict(facts.to_dict(), "device")
            models.append(model)
    results = Results(created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), edgedeploy_version=edgedeploy.__version__,
                      git_commit=working_commit(), device=DeviceInfo.from_dict(facts.to_dict(), "device"),
                      profile=ProfileInfo.from_dict(profile.to_dict(), "profile"), models=models, verdict=FAIL)
    return make_report(results, profile)


def write_reports(results: Results, out_dir: Path) -> dict[str, Path]:
    """Write every format into ``out_dir``; return format -> path."""
    return write_renderings(results, out_dir, RENDERERS, SUFFIXES)
