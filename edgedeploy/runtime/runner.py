"""The runner process: load a bundle, run one pre-tokenized prompt, print one JSON result line.

    python -m edgedeploy.runtime.runner BUNDLE_DIR --prompt-file PROMPT.json [--max-new-tokens N]
                                        [--threads N] [--touch-kv] [--no-verify]

This is what a device executes (the native runner in ``android_template/`` prints the same line), so
it imports only the TVM runtime: no torch, no compiler, no tokenizer. Its memory is what a phone
would see, and it reports its own peak RSS just before it exits, because polling from outside
under-reads the peak and loses it when the process is reaped.

The prompt file is JSON: ``{"token_ids": [...], "max_new_tokens": N, "stop_token_ids": [...]}`` (only
``token_ids`` is required) or a bare list of ids.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

RESULT_SCHEMA = 1
EXIT_OK, EXIT_INPUT, EXIT_RUNTIME = 0, 2, 3


def read_proc_status(pid: int | str = "self") -> dict[str, int]:
    """``Vm*`` fields of ``/proc/PID/status`` in bytes (VmHWM = peak RSS, VmRSS = current)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key.startswith("Vm") and rest.strip().endswith("kB"):
                    out[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return out


def memory_fields() -> dict[str, int]:
    """The process's own peak and current RSS, read at the moment of the call."""
    status = read_proc_status()
    return {
        "peak_rss_bytes": status.get("VmHWM", 0),
        "rss_bytes": status.get("VmRSS", 0),
        # Linux reports ru_maxrss in KiB.
        "maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def read_prompt_file(path: Path) -> dict[str, Any]:
    """Parse a prompt file into ``{"token_ids": [...], ...}``; InputError with the reason."""
    from edgedeploy.bundle import is_int
    from edgedeploy.errors import InputError
    from edgedeploy.fileio import read_json

    def id_list(value: object) -> bool:
        return isinstance(value, list) and all(is_int(t) and 0 <= t < 2**31 for t in value)

    data = read_json(path, "prompt file")
    if isinstance(data, list):
        data = {"token_ids": data}
    if not isinstance(data, dict) or not data.get("token_ids") or not id_list(data["token_ids"]):
        raise InputError(f"{path}: 'token_ids' must be a non-empty list of non-negative integers")
    if "max_new_tokens" in data and not (is_int(data["max_new_tokens"]) and data["max_new_tokens"] >= 0):
        raise InputError(f"{path}: 'max_new_tokens' must be a non-negative integer")
    if "stop_token_ids" in data and not id_list(data["stop_token_ids"]):
        raise InputError(f"{path}: 'stop_token_ids' must be a list of non-negative integers")
    return data


def run(args: argparse.Namespace) -> tuple[int, dict[str, Any]]:
    """Do the work of one runner invocation; return (exit code, result fields)."""
    from edgedeploy.errors import InputError
    from edgedeploy.runtime.cpus import plan_threads

    if args.threads is not None and args.threads <= 0:
        return EXIT_INPUT, {"error": f"--threads must be a positive count, not {args.threads}", "error_kind": "input"}
    if args.max_new_tokens is not None and args.max_new_tokens < 0:
        return EXIT_INPUT, {"error": "--max-new-tokens must not be negative", "error_kind": "input"}
    cpu = plan_threads(args.threads)
    result: dict[str, Any] = {"threads": cpu.threads, "cpus": cpu.cpus, "threads_default": cpu.default}
    try:
        prompt = read_prompt_file(Path(args.prompt_file))
    except InputError as e:
        return EXIT_INPUT, {**result, "error": str(e), "error_kind": "input"}
    # The TVM thread pool reads this once, at its creation.
    os.environ["TVM_NUM_THREADS"] = str(cpu.threads)
    os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")
    from edgedeploy.bundle import read_manifest, verify_bundle
    from edgedeploy.checkpoint.config import ModelConfig
    from edgedeploy.errors import EdgeDeployError
    from edgedeploy.runtime.engine import Engine

    try:
        manifest = read_manifest(args.bundle)
        # Sizes, names and the weights index are always checked; --no-verify skips only the re-hash of a
        # device copy that the profiler checked against the manifest just before this run.
        verify_bundle(args.bundle, manifest, hashes=not args.no_verify, allowed=manifest.derived_files())
        # The manifest's config was validated when it was read; the FP16 figure doubles for FP32 bundles.
        cfg = ModelConfig.from_dict(manifest.config, f"{args.bundle}/bundle.json: config")
        kv_per_token = cfg.kv_bytes_per_token * (2 if manifest.dtype == "float32" else 1)
        result.update(target=manifest.target, dtype=manifest.dtype, context_window=manifest.context_window,
                      kv_bytes_per_token=kv_per_token)
        engine = Engine(args.bundle, manifest.library, threads=cpu.threads, manifest=manifest)
        # The runtime's own base: RSS with the TVM runtime imported, before the model library and weights
        # (what `edgedeploy calibrate` records as the runtime base before weights).
        result["base_rss_bytes"] = read_proc_status().get("VmRSS", 0)
        engine.load()
        if args.touch_kv:
            engine.touch_kv_cache()
        max_new = args.max_new_tokens if args.max_new_tokens is not None else int(prompt.get("max_new_tokens", 32))
        stops = prompt.get("stop_token_ids", manifest.stop_token_ids)
        # CLOCK_BOOTTIME (what /proc/uptime counts) around generation: the profiler lines the phases up with
        # the fuel-gauge samples it stamps with /proc/uptime (edgedeploy.profile.energy).
        boot = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)
        gen_start = time.clock_gettime(boot)
        gen = engine.generate(prompt["token_ids"], max_new, stops)
        result["phase_clock"] = {"clock": "boottime", "generate_start": gen_start,
                                 "generate_end": time.clock_gettime(boot)}
    except EdgeDeployError as e:
        kind = "input" if e.exit_code == EXIT_INPUT else "runtime"
        return e.exit_code, {**result, "error": str(e), "error_kind": kind}
    except Exception as e:  # noqa: BLE001 - a device run must end in a result line, never a bare traceback
        return EXIT_RUNTIME, {**result, "error": f"{type(e).__name__}: {e}", "error_kind": "runtime"}
    result.update(
        prompt_tokens=gen.prefill_tokens, token_ids=gen.token_ids, finish_reason=gen.finish_reason,
        load_s=gen.load_s, ttft_s=gen.ttft_s, prefill_tok_s=gen.prefill_tok_s, decode_tok_s=gen.decode_tok_s,
        prefill_tokens=gen.prefill_tokens, decode_tokens=gen.decode_tokens, kv_touched=bool(args.touch_kv),
        error=None,
    )
    return EXIT_OK, result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgedeploy-runner", description=__doc__.split("\n\n")[0])
    p.add_argument("bundle")
    p.add_argument("--prompt-file", required=True, help="JSON with token_ids (see module doc)")
    p.add_argument("--max-new-tokens", type=int, help="default: the prompt file's, else 32")
    p.add_argument("--threads", type=int, help="CPU threads for the TVM runtime (default: one per CPU this process may "
                   "use, little cores of a big.LITTLE chip left out; the result states the count)")
    p.add_argument("--touch-kv", action="store_true", help="write the whole KV cache once after loading, "
                   "so the peak includes the full context window")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 re-hash of the bundle's files "
                   "(names, sizes and the weights index are still checked)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code, result = run(args)
    line = {"schema_version": RESULT_SCHEMA, "runner": "python", "runner_abi": platform.machine(),
            "pid": os.getpid(), **result, **memory_fields()}
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
