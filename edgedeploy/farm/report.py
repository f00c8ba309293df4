"""The farm's matrix report (models x devices: verdict, measured peak, decode and prefill tok/s) and its live table.

``farm.json`` is the whole run: every pair with its attempts (device, outcome, start and end times), the
device it finally ran on, its verdict or why it was not run; every device with its health and clean-up.
``farm.md``, ``farm.junit.xml`` and ``farm.html`` render it; each pair that ran also has the full profile
report of that run under ``pairs/MODEL@DEVICE/`` (``edgedeploy report`` re-renders it).
"""

from __future__ import annotations

import html
import json
import re
import time
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

import edgedeploy
from edgedeploy.farm.scheduler.run import FarmRun, Job
from edgedeploy.fileio import write_renderings

SCHEMA_VERSION = 1
NOT_RUN = "not run"
ERROR = "error"
MIB = 2**20


def _medians(model: dict[str, Any], key: str) -> dict[str, float]:
    out = {}
    for p in model.get("prompts") or []:
        stat = (p.get("summary") or {}).get(key) or {}
        if isinstance(stat.get("median"), int | float):
            out[p.get("name", "?")] = float(stat["median"])
    return out


def pair_dir(job: Job) -> str:
    return re.sub(r"[^A-Za-z0-9._@-]+", "_", f"{job.model.name}@{job.home.address}")


def _pair(job: Job, reports: dict[str, str]) -> dict[str, Any]:
    done = [a for a in job.attempts if a.outcome == "done"]
    out: dict[str, Any] = {
        "model": job.model.name, "device": job.home.address, "profile": job.home.profile.name,
        "status": job.state, "verdict": job.verdict or (ERROR if job.state == "error" else NOT_RUN),
        "reason": job.reason, "ran_on": done[-1].device if done else None,
        "attempts": [a.to_dict() for a in job.attempts], "devices_tried": job.tried,
    }
    if job.results is not None:
        model = job.results.to_dict()["models"][0]
        out.update(measured_peak_bytes=model.get("measured_peak_bytes"), budget_bytes=model.get("budget_bytes"),
                   decode_tok_s=_medians(model, "decode_tok_s"), prefill_tok_s=_medians(model, "prefill_tok_s"),
                   reasons=model.get("reasons", []), bundle_sha256=model.get("bundle_sha256"))
        if job.home.address in reports:
            out["report"] = reports[job.home.address]
    return out


def farm_result(run: FarmRun, inventory: Path, warnings: list[str], reports: dict[tuple[str, str], str],
                history: dict[tuple[str, str], int] | None = None) -> dict[str, Any]:
    """The run as one JSON-ready dict (``farm.json``)."""
    pairs = [_pair(j, {a: r for (m, a), r in reports.items() if m == j.model.name}) for j in run.jobs]
    for job, pair in zip(run.jobs, pairs, strict=True):
        if (job.model.name, job.home.address) in (history or {}):
            pair["history_id"] = (history or {})[(job.model.name, job.home.address)]
    models = list(dict.fromkeys(j.model.name for j in run.jobs))
    devices = list(run.devices)
    matrix = {m: {d: next(p["verdict"] for p in pairs if p["model"] == m and p["device"] == d) for d in devices}
              for m in models}
    verdicts = [p["verdict"] for p in pairs]
    if any(v in (NOT_RUN, ERROR) for v in verdicts):
        verdict, code = "INCOMPLETE", 2
    elif any(v == "FAIL" for v in verdicts):
        verdict, code = "FAIL", 1
    else:
        verdict, code = "PASS", 0
    return {
        "schema_version": SCHEMA_VERSION, "kind": "farm", "run_id": run.run_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(run.started)),
        "edgedeploy_version": edgedeploy.__version__, "inventory": str(inventory),
        "started": run.started, "ended": run.ended, "wall_s": round(run.ended - run.started, 3),
        "verdict": verdict, "exit_code": code, "warnings": warnings, "models": models,
        "devices": [{**s.device.to_dict(), "health": "unhealthy" if s.unhealthy else "ok", "failures": s.failures,
                     "faults": s.faults, "jobs_done": s.jobs_done, "cleanup": s.cleanup, "removed": s.removed,
                     "facts": {k: v for k, v in (s.facts or {}).items() if k != "props"}}
                    for s in run.devices.values()],
        "matrix": matrix, "pairs": pairs,
    }


def _mib(n: Any) -> str:
    return f"{n / MIB:,.1f}" if isinstance(n, int | float) else "n/a"


def _tok(values: dict[str, float] | None) -> str:
    return " / ".join(f"{v:,.1f}" for v in (values or {}).values()) or "n/a"


def _cell(p: dict[str, Any]) -> str:
    text = p["verdict"]
    if p.get("ran_on") and p["ran_on"] != p["device"]:
        text += f" (ran on {p['ran_on']})"
    return text


def to_markdown(result: dict[str, Any]) -> str:
    devices = [d["address"] for d in result["devices"]]
    lines = [f"# Farm run {result['run_id']}: {result['verdict']}", "",
             f"{len(result['models'])} models x {len(devices)} devices, {result['wall_s']:,.1f} s, "
             f"inventory `{result['inventory']}`, {result['created']}", "", "## Matrix", "",
             "| model | " + " | ".join(f"`{d}`" for d in devices) + " |", "|---|" + "---|" * len(devices)]
    for m in result["models"]:
        cells = [_cell(next(p for p in result["pairs"] if p["model"] == m and p["device"] == d)) for d in devices]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "## Pairs", "", "| model | device | ran on | verdict | measured peak MiB | decode tok/s | "
              "prefill tok/s | attempts | notes |", "|---|---|---|---|---:|---:|---:|---:|---|"]
    for p in result["pairs"]:
        notes = "; ".join(f"{a['device']}: {a['outcome']}" + (f" ({a['message']})" if a["outcome"] != "done" else "")
                          for a in p["attempts"] if a["outcome"] != "done")
        if p["status"] == "error":
            notes = p["reason"]  # the last attempt's message
        elif p["status"] != "done":
            notes = "; ".join(x for x in (p["reason"], notes) if x)
        elif p["verdict"] == "FAIL":
            notes = "; ".join([*p.get("reasons", []), notes] if notes else p.get("reasons", []))
        lines.append(f"| {p['model']} | `{p['device']}` | {('`' + p['ran_on'] + '`') if p['ran_on'] else '-'} | "
                     f"{p['verdict']} | {_mib(p.get('measured_peak_bytes'))} | {_tok(p.get('decode_tok_s'))} | "
                     f"{_tok(p.get('prefill_tok_s'))} | {len(p['attempts'])} | {notes.replace('|', '/')} |")
    lines += ["", "## Devices", "", "| device | profile | tags | health | jobs | faults | clean-up |",
              "|---|---|---|---|---:|---|---|"]
    for d in result["devices"]:
        tags = ", ".join(f"{k}={v}" for k, v in d["tags"].items())
        lines.append(f"| `{d['address']}` | {d['profile']} | {tags} | {d['health']} | {d['jobs_done']} | "
                     f"{'; '.join(d['faults']).replace('|', '/') or '-'} | {d['cleanup']} |")
    if result["warnings"]:
        lines += ["", "## Warnings", "", *[f"- {w}" for w in result["warnings"]]]
    return "\n".join(lines) + "\n"


def to_junit(result: dict[str, Any]) -> str:
    pairs = result["pairs"]
    suite = ET.Element("testsuite", name=f"edgedeploy-farm-{result['run_id']}", tests=str(len(pairs)),
                       failures=str(sum(p["verdict"] == "FAIL" for p in pairs)),
                       errors=str(sum(p["verdict"] in (ERROR, NOT_RUN) for p in pairs)),
                       time=f"{result['wall_s']:.3f}")
    for p in pairs:
        spent = sum((a["ended"] or 0) - (a["started"] or 0) for a in p["attempts"] if a["started"])
        case = ET.SubElement(suite, "testcase", classname=p["model"], name=p["device"], time=f"{spent:.3f}")
        if p["verdict"] == "FAIL":
            ET.SubElement(case, "failure", message="; ".join(p.get("reasons", []))[:500] or "FAIL")
        elif p["verdict"] in (ERROR, NOT_RUN):
            ET.SubElement(case, "error", message=f"{p['verdict']}: {p['reason']}"[:500])
        ET.SubElement(case, "system-out").text = json.dumps(p["attempts"])
    return ET.tostring(ET.ElementTree(suite).getroot(), encoding="unicode", xml_declaration=True) + "\n"


def to_html(result: dict[str, Any]) -> str:
    e = html.escape
    devices = [d["address"] for d in result["devices"]]
    color = {"PASS": "#2e7d32", "FAIL": "#c62828"}
    rows = []
    for m in result["models"]:
        cells = []
        for d in devices:
            p = next(p for p in result["pairs"] if p["model"] == m and p["device"] == d)
            cells.append(f"<td style='color:{color.get(p['verdict'], '#6d4c41')}'>{e(_cell(p))}<br><small>"
                         f"{e(_mib(p.get('measured_peak_bytes')))} MiB, decode {e(_tok(p.get('decode_tok_s')))}, "
                         f"prefill {e(_tok(p.get('prefill_tok_s')))} tok/s</small></td>")
        rows.append(f"<tr><th>{e(m)}</th>{''.join(cells)}</tr>")
    head = "".join(f"<th>{e(d)}</th>" for d in devices)
    return (f"<!doctype html>\n<html><head><meta charset='utf-8'><title>farm {e(result['run_id'])}</title></head>"
            f"<body><h1>Farm run {e(result['run_id'])}: {e(result['verdict'])}</h1>"
            f"<table border='1' cellpadding='4'><tr><th>model</th>{head}</tr>{''.join(rows)}</table>"
            f"<pre>{e(to_markdown(result))}</pre></body></html>\n")


RENDERERS = {"json": lambda r: json.dumps(r, indent=2) + "\n", "md": to_markdown, "junit": to_junit, "html": to_html}
SUFFIXES = {"json": "farm.json", "md": "farm.md", "junit": "farm.junit.xml", "html": "farm.html"}


def write_pair_reports(run: FarmRun, out_dir: Path) -> dict[tuple[str, str], str]:
    """The full profile report of every pair that ran, under ``pairs/``; (model, device) -> results.json path."""
    from edgedeploy.profile.profiler import write_reports

    paths = {}
    for job in run.jobs:
        if job.results is not None:
            written = write_reports(job.results, out_dir / "pairs" / pair_dir(job))
            paths[(job.model.name, job.home.address)] = str(written["json"])
    return paths


def write_farm_reports(result: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """The matrix in every format into ``out_dir``; return format -> path."""
    return write_renderings(result, out_dir, RENDERERS, SUFFIXES)


# -- console -------------------------------------------------------------------------------------------

_STYLE = {"PASS": "green", "FAIL": "red", "running": "cyan", "waiting": "yellow", "leasing": "yellow",
          "unhealthy": "bold red", "not-run": "red", "error": "red", "done": "dim"}


def live_view(run: FarmRun) -> Any:
    """Devices and jobs as rich tables, from :meth:`FarmRun.snapshot`."""
    from rich.console import Group
    from rich.markup import escape
    from rich.table import Table

    snap = run.snapshot()
    dt = Table(title="devices", title_justify="left", expand=False)
    for col in ("device", "profile", "state", "doing", "jobs", "faults"):
        dt.add_column(col, justify="right" if col in ("jobs", "faults") else "left", overflow="fold")
    for d in snap["devices"]:
        st = d["state"]
        dt.add_row(escape(d["address"]), escape(d["profile"]), f"[{_STYLE.get(st, 'white')}]{st}[/]",
                   escape(d["detail"][:70]), str(d["jobs_done"]), str(d["failures"]))
    jt = Table(title="jobs", title_justify="left", expand=False)
    for col in ("model", "device", "state", "on", "attempts", "verdict"):
        jt.add_column(col, justify="right" if col == "attempts" else "left")
    for j in snap["jobs"]:
        v = j["verdict"] or ""
        jt.add_row(escape(j["model"]), escape(j["device"]), f"[{_STYLE.get(j['state'], 'white')}]{j['state']}[/]",
                   escape(j["running_on"] or ""), str(j["attempts"]), f"[{_STYLE.get(v, 'white')}]{v}[/]")
    return Group(dt, jt)


def print_matrix(console: Any, result: dict[str, Any]) -> None:
    from rich.markup import escape
    from rich.table import Table

    devices = [d["address"] for d in result["devices"]]
    t = Table(title=f"farm {result['run_id']}: {result['verdict']}", title_justify="left")
    t.add_column("model")
    for d in devices:
        t.add_column(escape(d))
    for m in result["models"]:
        cells = []
        for d in devices:
            p = next(p for p in result["pairs"] if p["model"] == m and p["device"] == d)
            style = _STYLE.get(p["verdict"], "red")
            cells.append(f"[{style}]{escape(_cell(p))}[/]\n{_mib(p.get('measured_peak_bytes'))} MiB, "
                         f"{escape(_tok(p.get('decode_tok_s')))} / {escape(_tok(p.get('prefill_tok_s')))} tok/s")
        t.add_row(escape(m), *cells)
    console.print(t)
