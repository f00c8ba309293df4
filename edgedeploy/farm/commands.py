"""The ``edgedeploy farm`` subcommands: ``run``, ``status`` and ``clean`` (the CLI's thin layer calls these)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from edgedeploy.farm.inventory import expand, load_inventory, parse_selectors, select


def _devices(args: argparse.Namespace, err: Console) -> tuple[Any, list[Any], list[str]]:
    inventory = load_inventory(args.inventory)
    devices, warnings = expand(inventory)
    for w in warnings:
        err.print(escape(f"warning: {w}"), highlight=False)
    return inventory, select(devices, parse_selectors(getattr(args, "select", None)), str(args.inventory)), warnings


def farm_run(args: argparse.Namespace, console: Console, err: Console) -> int:
    from rich.live import Live

    from edgedeploy.farm.report import farm_result, live_view, print_matrix, write_farm_reports, write_pair_reports
    from edgedeploy.farm.scheduler import FarmRun, prepare_models
    from edgedeploy.farm.status import record_health
    from edgedeploy.profile.profiler import load_prompts

    inventory, devices, warnings = _devices(args, err)
    prompts = load_prompts(args.prompts)
    out = Path(args.out) if args.out else Path("reports") / f"farm-{time.strftime('%Y%m%d-%H%M%S')}"

    def log(kind: str, message: str) -> None:
        err.print(f"[dim]{kind}[/] {escape(message)}", highlight=False, soft_wrap=True)

    models = prepare_models([Path(p) for p in args.models], devices, out, dtype=args.dtype,
                            context_window=args.context, prefill_chunk=args.prefill_chunk, event=log)
    options: dict[str, Any] = {"prompts": prompts, "runs": args.runs, "warmup": args.warmup, "threads": args.threads,
                               "keep": args.keep, "timeout": args.timeout}
    run = FarmRun(devices, models, inventory.lock_dir, options, parallel=args.parallel,
                  max_attempts=args.max_attempts, event=log)
    log("farm", f"run {run.run_id}: {len(models)} models x {len(devices)} devices "
                f"({len(run.jobs)} pairs), lock folder {inventory.lock_dir}")
    with Live(get_renderable=lambda: live_view(run), console=err, refresh_per_second=4, transient=False):
        run.run()
    if not err.is_terminal:
        err.print()  # the final table of a log ends without a line break
    reports = write_pair_reports(run, out)
    history: dict[tuple[str, str], int] = {}
    if not args.no_history and any(j.results is not None for j in run.jobs):
        from edgedeploy.history import open_history

        # One batch per farm run: `check-regression --baseline latest` then checks every pair of it.
        with open_history(args.history, write=True) as h:
            for job in run.jobs:
                if job.results is not None:
                    history[(job.model.name, job.home.address)] = h.append(job.results, batch=f"farm-{run.run_id}")[0]
            where = h.path
        err.print(escape(f"history: {len(history)} runs in {where}"), highlight=False)
    result = farm_result(run, inventory.path, warnings, reports, history)
    paths = write_farm_reports(result, out)
    record_health(inventory.lock_dir, result)
    if args.json:
        print(paths["json"].read_text(), end="")
    else:
        print_matrix(console, result)
        console.print("reports: " + escape(", ".join(str(p) for p in paths.values())))
    return int(result["exit_code"])


def farm_status(args: argparse.Namespace, console: Console, err: Console) -> int:
    from rich.table import Table

    from edgedeploy.farm.status import farm_status as status_of

    inventory, devices, warnings = _devices(args, err)
    rows = status_of(inventory, devices)
    if args.json:
        print(json.dumps({"schema_version": 1, "kind": "farm-status", "inventory": str(inventory.path),
                          "warnings": warnings, "devices": rows}, indent=2))
        return 0
    t = Table(title=escape(f"farm {inventory.path}"), title_justify="left")
    for col in ("device", "profile", "reachable", "host lock", "device lease", "cut jobs", "last run"):
        t.add_column(col, overflow="fold")
    for r in rows:
        last = r["last_run"]
        health = f"{last['health']}, {last['failures']} faults" if last else "-"
        held = r["host_lock"]
        lock = "free" if held is None else f"pid {held.get('pid', '?')}"
        tags = ", ".join(f"{k}={v}" for k, v in r["tags"].items())
        t.add_row(escape(r["address"]) + (f"\n[dim]{escape(tags)}[/]" if tags else ""), escape(r["profile"]),
                  f"[green]yes[/] {escape(r['model'] or '')}" if r["reachable"] else "[red]no[/]", escape(lock),
                  escape(r["lease_state"]), "" if r["leftover_jobs"] is None else str(r["leftover_jobs"]),
                  escape(health))
    console.print(t)
    for r in rows:
        if r["error"]:
            console.print(escape(f"{r['address']}: {r['error']}"), highlight=False)
    return 0


def farm_clean(args: argparse.Namespace, console: Console, err: Console) -> int:
    from edgedeploy.farm.status import farm_clean as clean

    inventory, devices, _ = _devices(args, err)
    rows = clean(inventory, devices)
    if args.json:
        print(json.dumps({"schema_version": 1, "kind": "farm-clean", "devices": rows}, indent=2))
    else:
        for r in rows:
            what = f"removed {len(r['removed'])} leftovers" if r["removed"] else "nothing to remove"
            console.print(escape(f"{r['address']}: {r['state']}" + (f", {what}" if r["state"] == "clean" else "")
                                 + (f" ({r['detail']})" if r["detail"] else "")), highlight=False)
    return 0 if all(r["state"] == "clean" for r in rows) else 2
