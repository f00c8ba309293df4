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
    from edgedeploy.runtime.launch import detokenize, fit_prompt, raise_for_error, run_local, tokenize
    from edgedeploy.runtime.runner import read_prompt_file

    bundle = Path(args.bundle)
    manifest = read_manifest(bundle)
    if manifest.target != "host":
        raise EdgeDeployError(f"{bundle}: built for target {manifest.target!r}, which cannot run on this host; "
                              "run it on a device with `edgedeploy profile`, or rebuild with --target host")
    if (args.prompt is None) == (args.prompt_file is None):
        raise EdgeDeployError("give exactly one of --prompt TEXT or --prompt-file IDS.json")
    if args.prompt is not None:
        ids = tokenize(bundle, args.prompt)
    else:
        ids = read_prompt_file(Path(args.prompt_file))["token_ids"]
    ids = fit_prompt(ids, manifest, args.max_new_tokens, args.truncate)
    result = raise_for_error(run_local(bundle, ids, args.max_new_tokens, threads=args.threads,
                                       touch_kv=args.touch_kv, verify=not args.no_verify))
    text = detokenize(bundle, result["token_ids"]) if (bundle / "tokenizer.json").is_file() else None
    if args.json:
        _emit_json("run", {"bundle": str(bundle), "text": text, "result": result})
        return EXIT_OK
    from edgedeploy.report.tables import print_run

    print_run(console, text, result)
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
                                 ndk=Path(args.ndk) if args.ndk else None, harness=args.harness)
    out = Path(args.out) if args.out else Path("reports") / time.strftime("%Y%m%d-%H%M%S")
    paths = write_reports(results, out)
    if args.json:
        print(paths["json"].read_text())
    else:
        print_fit(console, results)
        console.print("reports: " + escape(", ".join(str(p) for p in paths.values())))
    return EXIT_OK if results["verdict"] == "PASS" else EXIT_FAIL


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
    return EXIT_OK if results["verdict"] == "PASS" else EXIT_FAIL


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
          app_runner_dir=args.app_harness)
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


def _add_window_options(s: argparse.ArgumentParser) -> None:
    """--context and --prefill-chunk, which estimate and build take alike."""
    s.add_argument("--context", type=POSITIVE_INT, help="context window in tokens (default: model's, at most 4096)")
    s.add_argument("--prefill-chunk", type=POSITIVE_INT, help="prefill chunk in tokens (default 512)")


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

    s = sub.add_parser("run", help="run a host bundle on a prompt and print text and metrics")
    s.add_argument("bundle")
    s.add_argument("--prompt", help="prompt text (tokenized with the bundle's tokenizer)")
    s.add_argument("--prompt-file", help="pre-tokenized prompt: JSON {\"token_ids\": [...]} or a list")
    s.add_argument("--max-new-tokens", type=NON_NEGATIVE_INT, default=32, help="tokens to generate (0: prefill only)")
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
    s.set_defaults(func=cmd_profile)

    s = sub.add_parser("report", help="re-render a results.json")
    s.add_argument("results")
    s.add_argument("--format", choices=("md", "junit", "json", "html"), default="md")
    s.add_argument("--out", help="write to this file instead of stdout")
    s.set_defaults(func=cmd_report)

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
