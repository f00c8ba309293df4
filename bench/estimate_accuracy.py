"""Predicted against measured peak memory on this host, with the runtime base calibrated: tiny, 134M and 1.1B.

Usage: ``python bench/estimate_accuracy.py [--sizes tiny,134m,1.1b] [--context 2048] [--chunk 512] [--work DIR]``.

Calibration as ``edgedeploy calibrate`` does it for a phone's runtime base: our runner profiles a tiny
bundle on this host (:func:`edgedeploy.calibrate.measure_runtime_base`), and its peak less what the estimate
counts for that model's weights, KV cache and temporaries is the runtime base. Each model then runs once
with the whole KV cache written (``touch_kv``) and its peak RSS (the runner's own VmHWM) is compared with
``estimate`` on the host profile as shipped (a 90 MiB planning base) and as calibrated. Checkpoints and
bundles of 134m/1.1b are the speed bench's (``bench/models.py``), cached in ``--work``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import models  # noqa: E402
import speed  # noqa: E402

MIB = 2**20


def calibrated_host(work: Path) -> tuple[Any, dict[str, Any]]:
    """The host profile with the runtime base measured on a tiny bundle, and what was measured."""
    from edgedeploy.calibrate import measure_runtime_base
    from edgedeploy.compile.build import build_bundle
    from edgedeploy.devices.local import LocalDevice
    from edgedeploy.devices.profiles import load_profile
    from edgedeploy.tiny import make_tiny_checkpoint

    host = load_profile("host")
    bundle = work / "calibration-bundle"
    if not (bundle / "bundle.json").is_file():
        build_bundle(make_tiny_checkpoint(work / "calibration-ckpt", "llama"), bundle, context_window=128,
                     prefill_chunk=32)
    with LocalDevice() as dev:
        measured = measure_runtime_base(dev, bundle, host)
    calibration = {"date": "bench", "method": "bench/estimate_accuracy.py: runner on a tiny bundle",
                   "ceiling_mb": host.budget_mb, "ceiling_runs_mb": [host.budget_mb], **measured}
    return dataclasses.replace(host, calibration=calibration), measured


def model_bundle(name: str, args: argparse.Namespace, work: Path) -> tuple[Path, Path]:
    """(checkpoint, host bundle) of ``name``: the tiny Llama of the tests, or a speed-bench model."""
    if name == "tiny":
        from edgedeploy.compile.build import build_bundle
        from edgedeploy.tiny import make_tiny_checkpoint

        ckpt = make_tiny_checkpoint(work / "tiny-ckpt", "llama")
        bundle = work / "tiny-bundle"
        if not (bundle / "bundle.json").is_file():
            build_bundle(ckpt, bundle, context_window=min(args.context, 512), prefill_chunk=min(args.chunk, 512))
        return ckpt, bundle
    ckpt, _ = models.cached_checkpoint(name, work)
    bundle, _ = speed.cached_bundle(ckpt, work, name, "float16", args.context, args.chunk)
    return ckpt, bundle


def measure(name: str, profiles: dict[str, Any], args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from edgedeploy.bundle import read_manifest
    from edgedeploy.checkpoint.intake import open_checkpoint
    from edgedeploy.estimate import estimate

    ckpt, bundle = model_bundle(name, args, work)
    m = read_manifest(bundle)
    run = speed.run_ours(bundle, list(range(3, 3 + min(64, m.prefill_chunk))), 1, args.threads, touch_kv=True)
    ck = open_checkpoint(ckpt)
    out: dict[str, Any] = {"model": name, "parameters": ck.parameters, "peak_bytes": int(run["peak_rss_bytes"])}
    for label, profile in profiles.items():
        est = estimate(ck.config, profile, context_window=m.context_window, prefill_chunk=m.prefill_chunk,
                       dtype=m.dtype, parameters=ck.parameters)
        out[f"{label}_bytes"] = est.peak_bytes
        out[f"{label}_error_pct"] = 100.0 * (est.peak_bytes - out["peak_bytes"]) / out["peak_bytes"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="tiny,134m,1.1b", help="models: tiny and bench/models.py names")
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default=str(speed.llamacpp.cache_root() / "bench"))
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    from edgedeploy.devices.profiles import load_profile

    with tempfile.TemporaryDirectory(prefix="estimate_accuracy_") as tmp:
        calibrated, measured = calibrated_host(Path(tmp))
        profiles = {"planning": load_profile("host"), "calibrated": calibrated}
        rows = []
        for name in args.sizes.split(","):
            print(f"[{name}] ...", file=sys.stderr, flush=True)
            rows.append(measure(name, profiles, args, Path(tmp) if name == "tiny" else work))
    print(f"runtime base: planning {profiles['planning'].runtime_base_mb:.0f} MiB, calibrated "
          f"{measured['runtime_base_mb']:.1f} MiB (runner peak {measured['runtime_peak_mb']:.1f} MiB on a tiny bundle)")
    print("| model | parameters | measured peak MiB | estimate MiB (planning) | error "
          "| estimate MiB (calibrated) | error |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['parameters']:,} | {r['peak_bytes'] / MIB:,.1f} | "
              f"{r['planning_bytes'] / MIB:,.1f} | {r['planning_error_pct']:+.1f}% | "
              f"{r['calibrated_bytes'] / MIB:,.1f} | {r['calibrated_error_pct']:+.1f}% |")
    worst = max(abs(r["calibrated_error_pct"]) for r in rows)
    print(f"largest calibrated error: {worst:.1f}% (target: within 3%)")
    return 0 if worst <= 3.0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
