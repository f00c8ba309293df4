"""The ``edgedeploy`` command line: a thin layer over the same functions the tests call.

Exit codes: 0 pass / fits, 1 rule failure / does not fit / profile FAIL, 2 bad input or tool error.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from rich.console import Console
from rich.markup import escape

from edgedeploy import __version__
from edgedeploy.errors import EdgeDeployError, UsageError

SCHEMA_VERSION = 1
EXIT_OK, EXIT_FAIL, EXIT_INPUT = 0, 1, 2

console = Console()
err_console = Console(stderr=True)


def _emit_json(kind: str, payload: dict[str, Any]) -> None:
    print(json.dumps({"schema_version": SCHEMA_VERSION, "kind": kind, **payload}, indent=2))


def cmd_inspect(args: argparse.Namespace) -> int:
    from edgedeploy.checkpoint.intake import open_checkpoint
    from edgedeploy.report.tables import print_checkpoint

    ck = open_checkpoint(args.model_dir)
    if args.json:
        _emit_json("inspect", ck.to_dict())
    else:
        print_checkpoint(console, ck)
    return EXIT_OK if ck.rules.passed else EXIT_FAIL


def cmd_estimate(args: argparse.Namespace) -> int:
    from edgedeploy.checkpoint.intake import open_checkpoint
    from edgedeploy.devices.profiles import load_profile
    from edgedeploy.estimate import estimate
    from edgedeploy.report.tables import print_estimate

    ck = open_checkpoint(args.model_dir)
    profile = load_profile(args.profile)
    # Weights at the deployed dtype: FP32 checkpoints are usually deployed as FP16.
    est = estimate(ck.config, profile, context_window=args.context, prefill_chunk=args.prefill_chunk or 512,
                   dtype=args.dtype, parameters=ck.parameters)
    if args.json:
        _emit_json("estimate", {"model": str(ck.path), "architecture": ck.config.architecture,
                                "rules": ck.rules.to_dict(), "estimate": est.to_dict(),
                                "device_profile": profile.to_dict()})
    else:
        print_estimate(console, est, profile, title=ck.path.name or str(ck.path))
        if not ck.rules.passed:
            err_console.print(f"[bold red]rule check FAILED[/]: {escape(ck.rules.findings[0].message)}")
    return EXIT_OK if est.fits and ck.rules.passed else EXIT_FAIL


def cmd_profiles(args: argparse.Namespace) -> int:
    from edgedeploy.devices.profiles import list_profiles
    from edgedeploy.report.tables import print_profiles

    profiles = list_profiles()
    if args.json:
        _emit_json("profiles", {"profiles": [p.to_dict() for p in profiles]})
    else:
        print_profiles(console, profiles)
    return EXIT_OK


def _progress_bars() -> tuple[Any, Any]:
    """A rich progress display and a ``progress(stage, done, total)`` callback that drives it."""
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    bars = Progress(TextColumn("{task.description:<10}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
                    console=err_console, transient=False)
    tasks: dict[str, Any] = {}

    def progress(stage: str, done: float, total: float) -> None:
        if stage not in tasks:
            tasks[stage] = bars.add_task(stage, total=total or 1)
        bars.update(tasks[stage], completed=done, total=total or 1)

    return bars, progress


def cmd_build(args: argparse.Namespace) -> int:
    from edgedeploy.compile.build import build_bundle, describe
    from edgedeploy.devices.profiles import load_profile

    model = Path(args.model_dir)
    profile = load_profile(args.profile) if args.profile else None
    target = args.target or (profile.target if profile else "host")
    out = Path(args.out) if args.out else Path("bundles") / f"{model.resolve().name}-{args.dtype}-{target}"
    bars, progress = _progress_bars()
    with bars:
        manifest = build_bundle(model, out, target=target, dtype=args.dtype, context_window=args.context,
                                prefill_chunk=args.prefill_chunk, progress=progress, profile=profile)
    if args.json:
        _emit_json("build", {"bundle": str(out), "manifest": describe(manifest)})
    else:
        total = sum(f["bytes"] for f in manifest.files.values())
        console.print("[green]built[/] " + escape(f"{out}  ({manifest.architecture}, {manifest.dtype}, target "
                                                  f"{manifest.target}, context {manifest.context_window}, prefill "
                                                  f"chunk {manifest.prefill_chunk}, {len(manifest.files)} files, "
                                                  f"{total / 2**20:,.1f} MiB)"))
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from edgedeploy.bundle import read_manifest
    from edgedeploy.runtime.launch import fit_prompt, raise_for_error, run_local
    from edgedeploy.runtime.runner import read_prompt_file
    from edgedeploy.runtime.tokenizer import open_tokenizer, tokenizer_of

    bundle = Path(args.bundle)
    manifest = read_manifest(bundle)
    if manifest.target != "host":
        raise EdgeDeployError(f"{bundle}: built for target {manifest.target!r}, which cannot run on this host; "
                              "run it on a device with `edgedeploy profile`, or rebuild with --target host")
    if (args.prompt is None) == (args.prompt_file is None):
        raise EdgeDeployError("give exactly one of --prompt TEXT or --prompt-file IDS.json")
    # A prompt file's max_new_tokens and stop_token_ids count (the runner honours them); the option wins.
    if args.prompt is not None:
        tokenizer = open_tokenizer(bundle, "to tokenize --prompt; pass token ids with --prompt-file")
        prompt = {"token_ids": tokenizer.encode(args.prompt)}
    else:
        prompt = read_prompt_file(Path(args.prompt_file))
    max_new = args.max_new_tokens if args.max_new_tokens is not None else int(prompt.get("max_new_tokens", 32))
    ids = fit_prompt(prompt["token_ids"], manifest, max_new, args.truncate)
    result = raise_for_error(run_local(bundle, ids, max_new, threads=args.threads, touch_kv=args.touch_kv,
                                       verify=not args.no_verify, stop_token_ids=prompt.get("stop_token_ids")))
    detok = tokenizer_of(bundle)
    text = detok.decode(result["token_ids"]) if detok else None
    if args.json:
        _emit_json("run", {"bundle": str(bundle), "text": text, "result": result})
        return EXIT_OK
    from edgedeploy.report.tables import print_run

    print_run(console, text, result)
    return EXIT_OK


def cmd_convert(args: argparse.Namespace) -> int:
    from edgedeploy.checkpoint.convert import PICKLE_WARNING, convert_pickled_model

    if args.trust_pickle:
        err_console.print(escape(f"warning: {PICKLE_WARNING}; loading {args.pickled}"), highlight=False,
                          soft_wrap=True)
    result = convert_pickled_model(args.pickled, args.out, tokenizer_from=args.tokenizer_from,
                                   trust_pickle=args.trust_pickle)
    if args.json:
        _emit_json("convert", result.to_dict())
    else:
        console.print("[green]converted[/] " + escape(
            f"{args.pickled} -> {result.out_dir} ({result.model_class}, {result.parameters:,} parameters in "
            f"{result.tensors} tensors, safetensors; tokenizer: {result.tokenizer_from or 'none'})"))
    return EXIT_OK


def cmd_profile(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from edgedeploy.devices.profiles import load_profile
    from edgedeploy.profile.profiler import default_profile, load_prompts, profile_models, write_reports
    from edgedeploy.report.tables import print_fit

    profile = load_profile(args.profile or default_profile(args.device))
    prompts = load_prompts(args.prompts)
    bars = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    console=err_console)
    task = None

    def push_progress(done: int, total: int) -> None:
        nonlocal task
        if task is None:
            task = bars.add_task("push", total=total)
        bars.update(task, completed=done, total=total)

    def event(what: str, detail: str) -> None:
        nonlocal task
        if what == "model":
            task = None
        bars.console.print(f"[dim]{what}[/] {escape(detail)}", highlight=False)

    with bars:
        results = profile_models([Path(b) for b in args.bundles], args.device, args.adb_server, profile, prompts,
                                 push_progress=push_progress, event=event, runs=args.runs, warmup=args.warmup,
                                 cooldown_s=args.cooldown, threads=args.threads, touch_kv=not args.no_touch_kv,
                                 keep=args.keep, reverify=args.reverify,
                                 reference=Path(args.reference) if args.reference else None,
                                 timeout=args.timeout, runner=args.runner,
                                 runner_dir=Path(args.runner_dir) if args.runner_dir else None,
                                 ndk=Path(args.ndk) if args.ndk else None, harness=args.harness,
                                 cooldown_temp=45.0 if args.cooldown_temp is None else args.cooldown_temp,
                                 # This host's zones idle warmer than a phone's: it waits only when asked to.
                                 cooldown_max_s=(0.0 if args.device in (None, "", "local") and
                                                 args.cooldown_temp is None else args.cooldown_max_s),
                                 cpus=args.cpus, max_cv=args.max_cv, energy_on=not args.no_energy)
    out = Path(args.out) if args.out else Path("reports") / time.strftime("%Y%m%d-%H%M%S")
    paths = write_reports(results, out)
    if args.json:
        print(paths["json"].read_text())
    else:
        print_fit(console, results)
        console.print("reports: " + escape(", ".join(str(p) for p in paths.values())))
    if not args.no_history:
        from edgedeploy.history import record

        where, ids = record(results, args.history)
        err_console.print(escape(f"history: run{'s' if len(ids) > 1 else ''} {', '.join(map(str, ids))} in {where}"),
                          highlight=False, soft_wrap=True)
    return EXIT_OK if results.verdict == "PASS" else EXIT_FAIL


def cmd_calibrate(args: argparse.Namespace) -> int:
    from edgedeploy.calibrate import calibrate, write_profile
    from edgedeploy.devices.adb import open_device
    from edgedeploy.devices.profiles import load_profile

    if args.device in ("", "local"):
        raise EdgeDeployError("calibrate measures a phone's low-memory killer: give --device (this host has the "
                              "'host' profile, measured when it is loaded)")
    base = load_profile(args.base)
    with open_device(args.device, args.adb_server) as device:
        done = calibrate(device, base, args.name,
                         harness=args.harness, hold_ms=args.hold_ms, repeats=args.repeats,
                         bundle=Path(args.bundle) if args.bundle else None, runner=args.runner,
                         runner_dir=Path(args.runner_dir) if args.runner_dir else None,
                         ndk=Path(args.ndk) if args.ndk else None, bandwidth=not args.no_bandwidth,
                         log=lambda line: err_console.print(escape(line), highlight=False))
    path = write_profile(done["profile"], Path(args.out) if args.out else None)
    cal = done["profile"]["calibration"]
    if args.json:
        _emit_json("calibrate", {"path": str(path), **done})
    else:
        console.print(escape(f"usable ceiling {cal['ceiling_mb']:,.1f} MiB (runs: "
                             f"{', '.join(f'{v:,.1f}' for v in cal['ceiling_runs_mb'])}), runtime base "
                             f"{cal.get('runtime_base_mb', 'n/a')} MiB, read bandwidth "
                             f"{cal.get('bandwidth_gbps', 'n/a')} GB/s"))
        console.print(escape(f"profile {done['profile']['name']!r} written to {path}"))
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from edgedeploy.report.fit import RENDERERS
    from edgedeploy.report.results import load_results

    # Checked once here, so the renderers can index the file without guarding every key.
    results = load_results(args.results)
    text = RENDERERS[args.format](results)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return EXIT_OK if results.verdict == "PASS" else EXIT_FAIL


def _run_id(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"a run id must be a number from `edgedeploy history`, got {text!r}") from None
    if value < 1:
        raise UsageError(f"a run id must be a number from `edgedeploy history`, got {text!r}")
    return value


def _print_deltas(deltas: list[Any]) -> None:
    for d in deltas:
        style = "bold red" if d.regressed else ("dim" if d.limit_pct is None else "green")
        console.print(f"[{style}]{'REGRESSION' if d.regressed else 'ok' if d.limit_pct is not None else 'info'}[/] "
                      + escape(d.describe()), highlight=False, soft_wrap=True)


def cmd_history(args: argparse.Namespace) -> int:
    from rich import box
    from rich.table import Table

    from edgedeploy.history import open_history

    if args.history_command == "compare":
        return _compare(args)
    with open_history(args.history) as h:
        runs = h.runs(model=args.model, device=args.device, limit=args.limit)
        where = h.path
    if args.json:
        _emit_json("history", {"history": str(where), "runs": [r.to_dict() for r in runs]})
        return EXIT_OK
    # Narrow enough for 80 columns; bundle sha256 and git commit are in --json and `history compare`.
    t = Table(title=escape(f"history {where}"), title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1),
              pad_edge=False, collapse_padding=True)
    for col in ("id", "recorded UTC", "model", "device", "verdict", "thr", "decode tok/s", "peak MiB"):
        t.add_column(col, justify="right" if col in ("id", "thr", "decode tok/s", "peak MiB") else "left",
                     no_wrap=col in ("recorded UTC", "decode tok/s", "peak MiB"))
    for r in runs:
        decode = [v for p in r.prompts() if (v := r.metric("decode_tok_s.median", p)) is not None]
        peak = r.metric("measured_peak_bytes")
        t.add_row(str(r.id), r.recorded.replace("T", " ")[5:16], escape(r.model), escape(r.device_key),
                  r.verdict or "?", str(r.threads if r.threads is not None else ""),
                  " / ".join(f"{v:,.1f}" for v in decode) or "n/a", f"{peak / 2**20:,.1f}" if peak else "n/a")
    console.print(t)
    if not runs:
        console.print("no runs match" if args.model or args.device else "no runs recorded yet")
    return EXIT_OK


def _compare(args: argparse.Namespace) -> int:
    from edgedeploy.history import compare, open_history, run_line

    with open_history(args.history) as h:
        base, cand = h.get(_run_id(args.baseline)), h.get(_run_id(args.candidate))
    same = base.device_key == cand.device_key
    deltas = compare(base, cand, args.decode_drop if same else None, args.memory_growth if same else None)
    regressed = [d for d in deltas if d.regressed]
    if args.json:
        _emit_json("history-compare", {"baseline": base.to_dict(), "candidate": cand.to_dict(), "same_device": same,
                                       "deltas": [d.to_dict() for d in deltas],
                                       "regressions": [d.describe() for d in regressed]})
    else:
        console.print(escape(f"baseline  {run_line(base)}"), highlight=False, soft_wrap=True)
        console.print(escape(f"candidate {run_line(cand)}"), highlight=False, soft_wrap=True)
        if not same:
            console.print("different devices: shown, not judged", highlight=False, soft_wrap=True)
        _print_deltas(deltas)
    return EXIT_FAIL if regressed else EXIT_OK


def cmd_check_regression(args: argparse.Namespace) -> int:
    """Compare the newest runs (or --candidate) with a baseline; exit 1 naming each metric that regressed."""
    from edgedeploy.history import compare, open_history, run_line

    checked: list[tuple[Any, Any, list[Any]]] = []
    with open_history(args.history) as h:
        if args.candidate:
            candidates = [h.get(_run_id(args.candidate))]
        else:
            candidates = h.newest_batch()
        candidates = [c for c in candidates if (not args.model or c.model == args.model)
                      and (not args.device or args.device in (c.device_serial, c.device_key, c.device_model))]
        base = None if args.baseline == "latest" else h.get(_run_id(args.baseline))
        if base is not None and not args.candidate and len(candidates) > 1:
            # Several models in the newest profile run: the baseline's own model is the one to check.
            candidates = [c for c in candidates if c.model == base.model]
        if not candidates:
            raise EdgeDeployError(f"{h.path}: no run to check in the newest profile run"
                                  + (f" of model {base.model!r}" if base else "")
                                  + (" matching --model/--device" if args.model or args.device else "")
                                  + " (give --candidate ID)")
        for cand in candidates:
            baseline = base or h.latest_before(cand)
            if baseline is None:
                raise EdgeDeployError(f"{h.path}: no earlier run of {cand.model} on {cand.device_key} to compare "
                                      f"run {cand.id} with (--baseline latest)")
            if baseline.id == cand.id:
                raise EdgeDeployError(f"run {cand.id} is both the baseline and the candidate")
            if baseline.device_key != cand.device_key:
                raise EdgeDeployError(f"baseline run {baseline.id} is on {baseline.device_key}, candidate run "
                                      f"{cand.id} on {cand.device_key}: regressions are judged on the same device")
            checked.append((baseline, cand, compare(baseline, cand, args.decode_drop, args.memory_growth)))
    regressed = [(b, c, d) for b, c, deltas in checked for d in deltas if d.regressed]
    if args.json:
        _emit_json("check-regression", {
            "decode_drop_pct": args.decode_drop, "memory_growth_pct": args.memory_growth,
            "pairs": [{"baseline": b.id, "candidate": c.id, "model": c.model, "device": c.device_key,
                       "deltas": [d.to_dict() for d in deltas]} for b, c, deltas in checked],
            "regressions": [f"{c.model} (run {c.id} vs {b.id}): {d.describe()}" for b, c, d in regressed]})
    else:
        for b, c, deltas in checked:
            console.print(escape(f"baseline  {run_line(b)}"), highlight=False, soft_wrap=True)
            console.print(escape(f"candidate {run_line(c)}"), highlight=False, soft_wrap=True)
            _print_deltas(deltas)
    for b, c, d in regressed:
        err_console.print(escape(f"regression: {c.model} (run {c.id} vs {b.id}): {d.describe()}"), highlight=False,
                          soft_wrap=True)
    return EXIT_FAIL if regressed else EXIT_OK


def cmd_farm(args: argparse.Namespace) -> int:
    from edgedeploy.farm import commands

    return {"run": commands.farm_run, "status": commands.farm_status,
            "clean": commands.farm_clean}[args.farm_command](args, console, err_console)


def cmd_virtual_phone(args: argparse.Namespace) -> int:
    from edgedeploy.devices.profiles import load_profile
    from edgedeploy.devices.virtual_phone import serve

    profile = load_profile(args.profile)
    sandbox = Path(args.sandbox) if args.sandbox else Path(tempfile.mkdtemp(prefix="edgedeploy-phone-"))
    # The phone's ABI is whatever this host runs (or --abi): a profile's arm64-v8a must not claim otherwise.
    props = {k: v for k, v in profile.props.items() if not k.startswith("ro.product.cpu.abi")}
    props.setdefault("ro.edgedeploy.memtotal_kb", str(int(profile.ram_mb * 1024)))
    props.setdefault("ro.edgedeploy.profile", profile.name)
    budget_mb = args.budget_mb or profile.usable_budget_mb
    err_console.print(escape(f"virtual phone '{profile.name}': sandbox {sandbox}, memory budget {budget_mb:,.0f} MiB"),
                      highlight=False)
    serve(sandbox, args.port, auth_keys_file=args.auth_keys, props=props, memory_budget_bytes=int(budget_mb * 2**20),
          disk_bytes=int(args.disk_mb * 2**20) if args.disk_mb else None, abi=args.abi,
          app_runner_dir=args.app_harness, sensors=args.sensors)
    return EXIT_OK


def cmd_package(args: argparse.Namespace) -> int:
    """Build the native runner for a device ABI and gather what must be pushed beside it into --out."""
    import shutil

    from edgedeploy.runtime import native

    out = Path(args.out)
    build_dir = out / "build"
    if args.abi == "android":
        if not args.ndk or not args.tvm_source:
            raise EdgeDeployError("--abi android needs --ndk NDK_DIR and --tvm-source TVM_SOURCE_DIR (a TVM source "
                                  f"tree of the installed version: the wheel does not ship the runtime's full sources"
                                  f"{' or the OpenCL runtime' if args.opencl else ''})")
        build = native.build_android_runner(args.ndk, args.tvm_source, build_dir, opencl=args.opencl, jni=args.jni)
    elif args.abi == "aarch64":
        build = native.build_aarch64_runner(build_dir, jni=args.jni)
    else:
        build = native.build_host_runner(build_dir, jni=args.jni)
    files = build.files_to_push() + ([build.jni] if build.jni else [])
    for f in files:
        shutil.copy2(f, out / f.name)
    console.print("[green]packaged[/] " + escape(f"{build.abi} runner in {out}: " + ", ".join(f.name for f in files)))
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    """Make a tiny model and run the whole flow on it, so a new user sees every step work."""
    from edgedeploy.tiny import make_tiny_checkpoint

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="edgedeploy-demo-"))
    model = out / "tiny-llama"
    console.rule("[bold]1. make a tiny Llama checkpoint (random weights)")
    make_tiny_checkpoint(model, "llama", dtype="float16")
    console.print(f"wrote {escape(str(model))}")
    console.rule("[bold]2. edgedeploy inspect")
    rc = main(["inspect", str(model)])
    console.rule("[bold]3. edgedeploy estimate --profile reference-12gb")
    rc = max(rc, main(["estimate", str(model), "--profile", "reference-12gb"]))
    bundle = out / "tiny-llama-bundle"
    console.rule("[bold]4. edgedeploy build (host)")
    rc = max(rc, main(["build", str(model), "--out", str(bundle), "--context", "256", "--prefill-chunk", "64"]))
    console.rule("[bold]5. edgedeploy run --prompt 'hello'")
    rc = max(rc, main(["run", str(bundle), "--prompt", "hello", "--max-new-tokens", "16"]))
    console.rule("[bold]6. edgedeploy profile --device tcp:127.0.0.1:PORT (virtual reference phone)")
    from edgedeploy.devices.virtual_phone_process import VirtualPhoneProcess

    with VirtualPhoneProcess(out / "phone", profile="reference-12gb") as phone:
        console.print(f"virtual phone listening on 127.0.0.1:{phone.port} (sandbox {escape(str(phone.sandbox))})")
        rc = max(rc, main(["profile", str(bundle), "--device", f"tcp:127.0.0.1:{phone.port}",
                           "--runs", "2", "--out", str(out / "report")]))
    return rc


class _Parser(argparse.ArgumentParser):
    """argparse that raises :class:`UsageError` where it would print its usage block and exit.

    The README promises one ``error:`` line and exit code 2 for bad input, argument mistakes included;
    raising (rather than ``sys.exit``) also lets in-process callers of :func:`main` get the code back.
    Sub-command parsers are made with the same class.
    """

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def number_arg(kind: type[int] | type[float], low: float, high: float | None = None,
               low_allowed: bool = True) -> Callable[[str], Any]:
    """An argparse ``type=`` that parses ``kind`` and refuses values outside ``low..high`` with one line.

    ``low_allowed=False`` makes ``low`` itself invalid (durations and sizes must be above 0). NaN and
    infinities are refused too: ``float()`` accepts "nan" and "inf", and neither is a usable duration
    or size.
    """
    noun = "an integer" if kind is int else "a number"
    if high is not None:
        rule = f"{noun} from {low:g} to {high:g}"
    else:
        rule = f"{noun} {'>=' if low_allowed else '>'} {low:g}"

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}") from None
        below = value < low or (value == low and not low_allowed)
        if not math.isfinite(value) or below or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}")
        return value

    return parse


#: Option value types, one validator per rule, shared by every command so the rules and messages agree.
#: --threads is positive because 0 used to slip through as "all cores" (the runner drops a falsy value);
#: leaving the option out is how to ask for all cores.
POSITIVE_INT = number_arg(int, 1)  # --context, --prefill-chunk (tokens), --threads, --runs
NON_NEGATIVE_INT = number_arg(int, 0)  # --max-new-tokens (0: prefill only, still measures TTFT), --warmup
NON_NEGATIVE_NUMBER = number_arg(float, 0)  # --cooldown (0: no pause)
POSITIVE_NUMBER = number_arg(float, 0, low_allowed=False)  # --timeout, --budget-mb, --disk-mb
PORT = number_arg(int, 0, 65535)  # 0 picks a free port


def _cpus_arg(text: str) -> str:
    """``--cpus``: auto, all, or a CPU list (checked against the device later)."""
    from edgedeploy.profile.variance import parse_cpu_list

    if text in ("auto", "all"):
        return text
    try:
        parse_cpu_list(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _add_window_options(s: argparse.ArgumentParser) -> None:
    """--context and --prefill-chunk, which estimate and build take alike."""
    s.add_argument("--context", type=POSITIVE_INT, help="context window in tokens (default: model's, at most 4096)")
    s.add_argument("--prefill-chunk", type=POSITIVE_INT, help="prefill chunk in tokens (default 512)")


def _add_history_option(s: argparse.ArgumentParser, **kw: Any) -> None:
    s.add_argument("--history", metavar="PATH", help="history database (default: $EDGEDEPLOY_HISTORY, else "
                   "~/.local/share/edgedeploy/history.sqlite)", **kw)


def _add_regression_options(s: argparse.ArgumentParser) -> None:
    s.add_argument("--decode-drop", type=NON_NEGATIVE_NUMBER, default=5.0, metavar="PCT",
                   help="largest allowed drop of decode tok/s, percent (default 5)")
    s.add_argument("--memory-growth", type=NON_NEGATIVE_NUMBER, default=2.0, metavar="PCT",
                   help="largest allowed growth of peak memory, percent (default 2)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="edgedeploy", description="Check, build and profile FP16/FP32 LLMs for 12 GB phones.")
    p.add_argument("--version", action="version", version=f"edgedeploy {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("inspect", help="read a checkpoint's config and headers, run the rule check")
    s.add_argument("model_dir")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("estimate", help="predict peak memory and speed on a device profile")
    s.add_argument("model_dir")
    s.add_argument("--profile", default="reference-12gb", help="profile name or .toml path")
    _add_window_options(s)
    s.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="deployed dtype")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_estimate)

    s = sub.add_parser("build", help="compile a checkpoint into a bundle (library, weights, tokenizer, manifest)")
    s.add_argument("model_dir")
    s.add_argument("--target", choices=("host", "android", "android-opencl", "linux-aarch64"),
                   help="default: the --profile's target, else host")
    s.add_argument("--profile", help="device profile (name or .toml) whose CPU (mcpu/mattr) phone targets compile for")
    s.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    _add_window_options(s)
    s.add_argument("--out", help="bundle folder (default: bundles/NAME-DTYPE-TARGET)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_build)

    s = sub.add_parser("convert", help="a pickled whole model (LLM-Pruner's torch.save) -> a Hugging Face folder "
                       "(runs the pickle's code: needs --trust-pickle)")
    s.add_argument("pickled", help="file saved with torch.save({'model': ..., 'tokenizer': ...}) or torch.save(model)")
    s.add_argument("--out", required=True, help="new (or empty) folder for config.json, safetensors and tokenizer")
    s.add_argument("--tokenizer-from", help="copy the tokenizer files from this folder (default: the pickle's)")
    s.add_argument("--trust-pickle", action="store_true",
                   help="load the file although unpickling runs code from it (required)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_convert)

    s = sub.add_parser("run", help="run a host bundle on a prompt and print text and metrics")
    s.add_argument("bundle")
    s.add_argument("--prompt", help="prompt text (tokenized with the bundle's tokenizer)")
    s.add_argument("--prompt-file", help="pre-tokenized prompt: JSON {\"token_ids\": [...]} or a list")
    s.add_argument("--max-new-tokens", type=NON_NEGATIVE_INT,
                   help="tokens to generate (0: prefill only; default: the prompt file's, else 32)")
    s.add_argument("--threads", type=POSITIVE_INT, help="CPU threads (default: all cores)")
    s.add_argument("--touch-kv", action="store_true", help="touch the whole KV cache so the peak includes it")
    s.add_argument("--truncate", action="store_true", help="keep the last tokens of a prompt that is too long")
    s.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the bundle")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("profile", help="push bundles to a device, run scripted prompts, write a fit report")
    s.add_argument("bundles", nargs="+", metavar="BUNDLE")
    s.add_argument("--device", help="adb serial, HOST:PORT (via the adb server) or tcp:HOST:PORT (direct); "
                   "default: this host")
    s.add_argument("--adb-server", help="HOST:PORT of a remote adb server (as adb -H/-P)")
    s.add_argument("--profile", help="device profile (default: host for this host, else reference-12gb)")
    s.add_argument("--prompts", nargs="+", help="prompt files or built-in names (default: chat-short doc-1k long-2k)")
    s.add_argument("--runs", type=POSITIVE_INT, default=3, help="measured runs per prompt (default 3)")
    s.add_argument("--warmup", type=NON_NEGATIVE_INT, default=1, help="warm-up runs per prompt (default 1)")
    s.add_argument("--cooldown", type=NON_NEGATIVE_NUMBER, default=0.0, help="seconds to wait between runs")
    s.add_argument("--cooldown-temp", type=number_arg(float, -40, 150), metavar="C",
                   help="before each measured run, wait until every thermal zone is at or under C °C (default 45 "
                        "on a device; this host waits only when it is given)")
    s.add_argument("--cooldown-max-s", type=NON_NEGATIVE_NUMBER, default=120.0, metavar="S",
                   help="wait at most S seconds for --cooldown-temp, then measure anyway (default 120; 0: no wait)")
    s.add_argument("--cpus", type=_cpus_arg, default=None, metavar="auto|all|LIST",
                   help="CPUs to pin the runner to with taskset: auto (default: the big cores when the chip has a "
                        "slower cluster, or the profile's pin_cpus), all (no pinning), or a list like 4-7")
    s.add_argument("--max-cv", type=number_arg(float, 0, low_allowed=False), metavar="PCT",
                   help="fail when a prompt set's decode tok/s coefficient of variation exceeds PCT percent "
                        "(without it, sets over 5%% are flagged in the report)")
    s.add_argument("--no-energy", action="store_true", help="do not read the fuel gauge or touch the battery "
                   "state (dumpsys battery unplug/reset)")
    s.add_argument("--threads", type=POSITIVE_INT, help="runner CPU threads")
    s.add_argument("--no-touch-kv", action="store_true", help="do not touch the whole KV cache at load "
                   "(the peak then only covers the prompts' tokens)")
    s.add_argument("--reference", help="host bundle whose tokens the device must reproduce "
                   "(default: the bundle itself when it is a host build)")
    s.add_argument("--timeout", type=POSITIVE_NUMBER, default=900.0, help="seconds allowed per run")
    s.add_argument("--runner", choices=("auto", "python", "native"), default="auto",
                   help="runner kind (auto: Python runner for host bundles, native runner for aarch64 ones)")
    s.add_argument("--runner-dir", help="prebuilt Android native runner (from `edgedeploy package`)")
    s.add_argument("--ndk", help="Android NDK, to link an Android bundle's model.tar for the phone")
    s.add_argument("--harness", choices=("shell", "app"), default="shell",
                   help="shell: the runner as an adb shell process; app: inside the harness app "
                        "(android_template/app), under an app's real memory limits")
    s.add_argument("--keep", action="store_true", help="leave the pushed files on the device")
    s.add_argument("--reverify", action="store_true",
                   help="re-hash every file already on the device (default: only those whose size or mtime changed)")
    s.add_argument("--out", help="report folder (default: reports/TIMESTAMP)")
    s.add_argument("--json", action="store_true", help="print results.json")
    _add_history_option(s)
    s.add_argument("--no-history", action="store_true", help="do not append the results to the history database")
    s.set_defaults(func=cmd_profile)

    s = sub.add_parser("calibrate", help="measure a device's usable memory, runtime base and bandwidth into a "
                       "device profile")
    s.add_argument("--device", required=True, help="adb serial, HOST:PORT or tcp:HOST:PORT")
    s.add_argument("--adb-server", help="HOST:PORT of a remote adb server (as adb -H/-P)")
    s.add_argument("--base", default="reference-12gb", help="profile whose other fields (SoC, target, "
                   "bandwidth) the calibrated one keeps (default reference-12gb)")
    s.add_argument("--name", help="name of the calibrated profile (default: the device model + '-calibrated'); "
                   "use it as --profile NAME")
    s.add_argument("--out", help="profile file to write (default: ~/.config/edgedeploy/profiles/NAME.toml, "
                   "or under $EDGEDEPLOY_CONFIG)")
    s.add_argument("--harness", choices=("shell", "app"), default="shell",
                   help="how the runtime base is measured: as an adb shell process or inside the harness app")
    s.add_argument("--hold-ms", type=number_arg(int, 10, 10000), default=100,
                   help="pause after each probe step, for the low-memory killer to act (default 100)")
    s.add_argument("--repeats", type=number_arg(int, 1, 10), default=3, help="final probe passes (default 3)")
    s.add_argument("--bundle", help="small bundle to measure the runtime base with (default: a tiny model)")
    s.add_argument("--runner", choices=("auto", "python", "native"), default="auto")
    s.add_argument("--runner-dir", help="prebuilt Android native runner (from `edgedeploy package`)")
    s.add_argument("--ndk", help="Android NDK: builds the native probe, links an Android bundle")
    s.add_argument("--no-bandwidth", action="store_true", help="skip the read-bandwidth probe")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_calibrate)

    s = sub.add_parser("report", help="re-render a results.json")
    s.add_argument("results")
    s.add_argument("--format", choices=("md", "junit", "json", "html", "challenge-csv"), default="md",
                   help="challenge-csv: model,Throughput,Memory-Usage rows for the challenge's result sheet")
    s.add_argument("--out", help="write to this file instead of stdout")
    s.set_defaults(func=cmd_report)

    s = sub.add_parser("history", help="list the profile runs in the history database; `history compare A B`")
    _add_history_option(s)
    s.add_argument("--model", help="only runs of this model (bundle folder name)")
    s.add_argument("--device", help="only runs on this device (serial, device key or device model)")
    s.add_argument("--limit", type=POSITIVE_INT, help="only the newest N runs")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_history, history_command=None)
    hs = s.add_subparsers(dest="history_command", parser_class=_Parser)
    c = hs.add_parser("compare", help="two runs side by side; exit 1 when the candidate regressed")
    c.add_argument("baseline", metavar="BASELINE_ID")
    c.add_argument("candidate", metavar="CANDIDATE_ID")
    _add_regression_options(c)
    # Also accepted after `compare`; SUPPRESS keeps the value given before it.
    _add_history_option(c, default=argparse.SUPPRESS)
    c.add_argument("--json", action="store_true", default=argparse.SUPPRESS)

    s = sub.add_parser("check-regression", help="exit 1 when decode tok/s dropped or peak memory grew against a "
                       "baseline run on the same device")
    s.add_argument("--baseline", required=True, metavar="ID|latest",
                   help="a run id, or latest: the newest earlier run of the same model on the same device")
    s.add_argument("--candidate", metavar="ID", help="the run to check (default: every model of the newest "
                   "profile run)")
    s.add_argument("--model", help="check only this model of the newest profile run")
    s.add_argument("--device", help="check only runs on this device")
    _add_regression_options(s)
    _add_history_option(s)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_check_regression)

    s = sub.add_parser("farm", help="profile many models on many phones in parallel (farm.toml), with leases and "
                       "retries; `farm status`, `farm clean`")
    fs = s.add_subparsers(dest="farm_command", required=True, parser_class=_Parser)
    f = fs.add_parser("run", help="profile every (model, device) pair; exit 0 all PASS, 1 any FAIL, 2 any not run")
    f.add_argument("models", nargs="+", metavar="BUNDLE_OR_MODEL_DIR")
    f.add_argument("--select", action="append", metavar="TAG=VALUE", help="only devices with this tag (repeatable; "
                   "profile=NAME and address=ADDR work too)")
    f.add_argument("--parallel", type=POSITIVE_INT, help="most jobs at once (default: one per device)")
    f.add_argument("--max-attempts", type=POSITIVE_INT, default=3,
                   help="tries per pair on devices of its profile when devices drop (default 3)")
    f.add_argument("--prompts", nargs="+", help="prompt files or built-in names (default: chat-short doc-1k long-2k)")
    f.add_argument("--runs", type=POSITIVE_INT, default=3, help="measured runs per prompt (default 3)")
    f.add_argument("--warmup", type=NON_NEGATIVE_INT, default=1, help="warm-up runs per prompt (default 1)")
    f.add_argument("--threads", type=POSITIVE_INT, help="runner CPU threads")
    f.add_argument("--timeout", type=POSITIVE_NUMBER, default=900.0, help="seconds allowed per run")
    f.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="for model folders built here")
    _add_window_options(f)
    f.add_argument("--keep", action="store_true", help="leave the pushed bundles on the devices")
    f.add_argument("--out", help="report folder (default: reports/farm-TIMESTAMP)")
    f.add_argument("--json", action="store_true", help="print farm.json")
    _add_history_option(f)
    f.add_argument("--no-history", action="store_true", help="do not append the pairs' results to the history")
    for name, text in (("status", "devices, reachability, leases and health"),
                       ("clean", "remove what jobs cut short (a device that dropped) left on the devices")):
        f = fs.add_parser(name, help=text)
        f.add_argument("--select", action="append", metavar="TAG=VALUE", help="only devices with this tag")
        f.add_argument("--json", action="store_true")
    for f in fs.choices.values():
        f.add_argument("--inventory", required=True, metavar="FILE", help="farm.toml")
    s.set_defaults(func=cmd_farm)

    s = sub.add_parser("virtual-phone", help="serve a virtual reference phone (device-side adbd) on 127.0.0.1")
    s.add_argument("--profile", default="reference-12gb")
    s.add_argument("--port", type=PORT, default=6520, help="TCP port on 127.0.0.1 (0 picks a free one)")
    s.add_argument("--sandbox", help="folder standing in for the phone's storage (default: a new temp folder)")
    s.add_argument("--budget-mb", type=POSITIVE_NUMBER, help="memory budget (default: the profile's usable budget)")
    s.add_argument("--disk-mb", type=POSITIVE_NUMBER, help="storage quota for pushes")
    s.add_argument("--abi", help="ro.product.cpu.abi (default: this host's)")
    s.add_argument("--auth-keys", type=Path, help="adb_keys file: require ADB auth with one of these keys")
    s.add_argument("--app-harness", type=Path, metavar="RUNNER_DIR",
                   help="emulate the installed harness app with a host native runner (edgedeploy package --abi host)")
    s.add_argument("--sensors", metavar="KEY=VALUE,...", help="thermal zones, CPU clocks and battery of the test "
                   "double: ambient, start, tau, per_cpu, throttle, big_cores, battery, charger, idle_ma, "
                   "per_cpu_ma, zones (see edgedeploy.devices.virtual_sensors)")
    s.set_defaults(func=cmd_virtual_phone)

    s = sub.add_parser("package", help="build the native runner for a device ABI (Android needs an NDK)")
    s.add_argument("--abi", choices=("android", "aarch64", "host"), default="android",
                   help="android: arm64-v8a with the NDK; aarch64: glibc Linux (cross g++); host: this machine")
    s.add_argument("--ndk", help="Android NDK folder (r25+)")
    s.add_argument("--tvm-source", help="TVM source tree of the installed version (Android runtime sources)")
    s.add_argument("--opencl", action="store_true", help="include the OpenCL runtime (Adreno GPU bundles)")
    s.add_argument("--jni", action="store_true", help="also build the JNI bridge for the app harness")
    s.add_argument("--out", required=True, help="folder for the runner and its libraries (give it as --runner-dir)")
    s.set_defaults(func=cmd_package)

    s = sub.add_parser("profiles", help="list device profiles")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_profiles)

    s = sub.add_parser("demo", help="make a tiny model and run the whole flow on it")
    s.add_argument("--out", help="folder for the demo's files (default: a new temporary folder)")
    s.set_defaults(func=cmd_demo)
    return p


def describe_os_error(e: OSError) -> str:
    """``PATH: No space left on device`` rather than ``[Errno 28] No space left on device: 'PATH'``."""
    if not e.strerror:
        return str(e)
    paths = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    return f"{paths}: {e.strerror}" if paths else e.strerror


def print_error(message: str) -> None:
    """Print ``error: MESSAGE`` as exactly one line on stderr.

    Line breaks inside the message are folded (the README promises one line, whoever raised it), and
    the text is escaped: a path or a tool's output with ``[...]`` in it would otherwise be read as rich
    markup, lose its brackets, or make rich raise while reporting the error.
    """
    text = " | ".join(line.strip() for line in message.splitlines() if line.strip()) or "(no message)"
    err_console.print(f"[bold red]error:[/] {escape(text)}", highlight=False, soft_wrap=True)


def main(argv: list[str] | None = None) -> int:
    """Run one command and return its exit code (README: 0 pass, 1 fail, 2 bad input or tool, 3 runner).

    Expected failures are caught here and printed as one line: :class:`EdgeDeployError` (raised where a
    file, a tool or a device failed, with a message naming it) and :class:`OSError` (disk full,
    permission denied: the user's environment). Nothing broader is caught on purpose: any other
    exception is a defect at the place that should have wrapped it, and its traceback is how it gets
    found and fixed.
    """
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except EdgeDeployError as e:
        print_error(str(e))
        return e.exit_code
    except OSError as e:
        print_error(describe_os_error(e))
        return EXIT_INPUT
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
