"""Fit reports: measurements in, verdicts out, rendered as JSON, Markdown, JUnit XML and HTML.

The verdict is derived here from the measurements (never stored by the profiler), so re-rendering an
old results file with ``edgedeploy report`` applies the same rules.
"""

from __future__ import annotations

import html
import json
from typing import Any
from xml.etree import ElementTree as ET

from edgedeploy.checkpoint.config import ModelConfig
from edgedeploy.devices.profiles import DeviceProfile
from edgedeploy.estimate import MB, estimate

SCHEMA_VERSION = 1
PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"


def _mib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / MB:,.1f} MiB"


def _check(name: str, status: str, message: str) -> dict[str, str]:
    return {"name": name, "status": status, "message": message}


def _all_runs(model: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for p in model["prompts"] for r in p["warmup"] + p["runs"]]


def evaluate(model: dict[str, Any], profile: DeviceProfile) -> dict[str, Any]:
    """Add the estimate, the measured peak, the checks and the verdict with its reasons to one model's result."""
    m = model["manifest"]
    cfg = ModelConfig.from_dict(m["config"])
    est = estimate(cfg, profile, context_window=m["context_window"], prefill_chunk=m["prefill_chunk"],
                   dtype=m["dtype"], parameters=m["parameters"])
    runs = _all_runs(model)
    killed = next((r for r in runs if r.get("killed")), None)
    # A GPU backend's buffers live outside RSS (dumpsys meminfo's GL mtrack): the peak counts both.
    peaks = [r["peak_rss_bytes"] + r.get("gpu_peak_bytes", 0) for r in runs
             if r.get("peak_rss_bytes") and not r.get("error")]
    measured = max(peaks) if peaks else (killed["killed"]["killed_at_bytes"] if killed else None)
    checks = []

    rules = m.get("rules") or {}
    rstatus = rules.get("status", "PASS")
    checks.append(_check("rule-check", FAIL if rstatus == "FAIL" else PASS,
                         "; ".join(f["message"] for f in rules.get("findings", [])) or "checked at build"))

    errors = [r for r in runs if r.get("error") and not r.get("killed")]
    if killed:
        checks.append(_check("run", FAIL, f"runner {killed['error']}"
                             + (f"; lmkd: {killed['killed']['lmkd']['line']}" if killed["killed"].get("lmkd") else "")))
    elif errors:
        checks.append(_check("run", FAIL, f"runner error: {errors[0]['error']}"))
    elif not runs:
        checks.append(_check("run", FAIL, "no run was made"))
    else:
        checks.append(_check("run", PASS, f"{len(runs)} runs completed"))

    budget = est.budget_bytes
    if killed:
        below = (" — below the profile's budget: this device allows less than the profile says"
                 if measured is not None and measured < budget else "")
        checks.append(_check("memory-fit", FAIL, f"killed for memory at {_mib(measured)} "
                             f"(profile budget {_mib(budget)}){below}"))
    elif measured is None:
        checks.append(_check("memory-fit", FAIL, "no peak memory was measured"))
    elif measured > budget:
        checks.append(_check("memory-fit", FAIL, f"peak {_mib(measured)} is over the budget {_mib(budget)}"))
    else:
        checks.append(_check("memory-fit", PASS, f"peak {_mib(measured)} within budget {_mib(budget)} "
                             f"(headroom {_mib(budget - measured)})"))

    checks.append(_parity(model))
    failed = [c for c in checks if c["status"] == FAIL]
    model.update(
        estimate=est.to_dict(), measured_peak_bytes=measured,
        peak_error_pct=(100.0 * (est.peak_bytes - measured) / measured) if measured else None,
        budget_bytes=budget, headroom_bytes=(budget - measured) if measured is not None and not killed else None,
        checks=checks, verdict=FAIL if failed else PASS,
        reasons=[f"{c['name']}: {c['message']}" for c in failed] or ["all checks passed"],
    )
    return model


def _parity(model: dict[str, Any]) -> dict[str, str]:
    compared = mismatched = 0
    detail = ""
    for p in model["prompts"]:
        ref = p.get("reference")
        run = next((r for r in p["runs"] + p["warmup"] if not r.get("error")), None)
        if not ref or ref.get("error") or run is None:
            continue
        compared += 1
        a, b = run["token_ids"], ref["token_ids"]
        if a != b:
            mismatched += 1
            pos = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
            detail = detail or f"{p['name']}: first difference at generated token {pos}"
    if not compared:
        return _check("parity", SKIP, "no host reference run to compare with")
    if mismatched:
        return _check("parity", FAIL, f"{mismatched} of {compared} prompts differ from the host reference ({detail})")
    return _check("parity", PASS, f"device tokens equal host reference tokens on {compared} prompts")


def make_report(results: dict[str, Any], profile: DeviceProfile) -> dict[str, Any]:
    """Evaluate every model of a results dict in place and return it."""
    for model in results["models"]:
        if "prompts" in model:
            evaluate(model, profile)
    results["verdict"] = FAIL if any(m.get("verdict") != PASS for m in results["models"]) else PASS
    return results


# -- renderers ----------------------------------------------------------------------------------

def _stat(summary: dict[str, Any], key: str, fmt: str = "{:,.1f}") -> str:
    s = summary.get(key) or {}
    if not s:
        return "n/a"
    return f"{fmt.format(s['median'])} ± {fmt.format(s['stdev'])}"


def _model_rows(model: dict[str, Any]) -> list[tuple[str, str]]:
    m, est, dev = model["manifest"], model.get("estimate", {}), model.get("device", {})
    rows = [
        ("verdict", model.get("verdict", "?")),
        ("reasons", "; ".join(model.get("reasons", []))),
        ("architecture", f"{m['architecture']} ({m['dtype']}, target {m['target']})"),
        ("parameters", f"{m['parameters']:,}"),
        ("weights", _mib(m["weights_bytes"])),
        ("context / prefill chunk", f"{m['context_window']} / {m['prefill_chunk']}"),
        ("predicted peak", _mib(est.get("peak_bytes"))),
        ("measured peak (VmHWM + GPU)", _mib(model.get("measured_peak_bytes"))),
        ("GPU memory (GL mtrack)", _mib(max((r.get("gpu_peak_bytes", 0) for r in _all_runs(model)), default=0))),
        ("prediction error", "n/a" if model.get("peak_error_pct") is None else f"{model['peak_error_pct']:+.1f}%"),
        ("budget / headroom", f"{_mib(model.get('budget_bytes'))} / {_mib(model.get('headroom_bytes'))}"),
        ("device", f"{dev.get('manufacturer', '')} {dev.get('model', '')} ({dev.get('serial', '')}, "
                   f"{dev.get('abi', '')}, Android {dev.get('android_release') or 'n/a'})"),
        ("harness", model.get("harness", "shell")),
        ("runner", f"{model['runner']['kind']} (device ABI {dev.get('abi', '?')}"
                   + (f", ELF {model['runner']['elf_machine']})" if model["runner"].get("elf_machine") else ")")),
        ("threads", _threads(model)),
        ("push", f"{model['push']['files_sent']} files sent, {model['push']['files_skipped']} skipped, "
                 f"{model['push']['mb_per_s']} MB/s"),
    ]
    for p in model["prompts"]:
        s = p["summary"]
        clip = f", clipped from {p['clipped_from']}" if p.get("clipped_from") else ""
        rows.append((f"prompt {p['name']} ({p['prompt_tokens']} tokens{clip})",
                     f"TTFT {_stat(s, 'ttft_s', '{:.3f}')} s, prefill {_stat(s, 'prefill_tok_s')} tok/s, "
                     f"decode {_stat(s, 'decode_tok_s')} tok/s, load {_stat(s, 'load_s', '{:.3f}')} s"))
    return rows


def _threads(model: dict[str, Any]) -> str:
    """The thread count the runner reported (and whether it chose it), from the first run that says."""
    run = next((r for r in _all_runs(model) if isinstance(r.get("threads"), int)), None)
    if run is None:
        return "n/a"
    how = "default: one per CPU it may use" if run.get("threads_default") else "--threads"
    cpus = run.get("cpus")
    return f"{run['threads']} ({how}" + (f"; CPUs {','.join(map(str, cpus))})" if isinstance(cpus, list) else ")")


def to_json(results: dict[str, Any]) -> str:
    return json.dumps(results, indent=2)


def to_markdown(results: dict[str, Any]) -> str:
    lines = [f"# edgedeploy fit report: {results['verdict']}", "",
             f"Device profile `{results['profile']['name']}`, created {results.get('created', '')}.", ""]
    for model in results["models"]:
        lines += [f"## {model['model']}: {model.get('verdict', '?')}", "", "| item | value |", "|---|---|"]
        lines += [f"| {k} | {str(v).replace('|', '/')} |" for k, v in _model_rows(model)]
        lines += ["", "| check | status | detail |", "|---|---|---|"]
        lines += [f"| {c['name']} | {c['status']} | {c['message'].replace('|', '/')} |"
                  for c in model.get("checks", [])]
        lines.append("")
    return "\n".join(lines)


def to_junit(results: dict[str, Any]) -> str:
    """One test suite per model, one test case per check (SKIP becomes <skipped/>)."""
    suites = ET.Element("testsuites", name="edgedeploy profile")
    for model in results["models"]:
        checks = model.get("checks", [])
        suite = ET.SubElement(suites, "testsuite", name=model["model"], tests=str(len(checks)),
                              failures=str(sum(c["status"] == FAIL for c in checks)),
                              skipped=str(sum(c["status"] == SKIP for c in checks)))
        for c in checks:
            case = ET.SubElement(suite, "testcase", classname=f"edgedeploy.{model['model']}", name=c["name"])
            if c["status"] == FAIL:
                ET.SubElement(case, "failure", message=c["message"]).text = c["message"]
            elif c["status"] == SKIP:
                ET.SubElement(case, "skipped", message=c["message"])
            else:
                ET.SubElement(case, "system-out").text = c["message"]
    ET.indent(suites)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


def to_html(results: dict[str, Any]) -> str:
    esc = html.escape
    colour = {PASS: "#1a7f37", FAIL: "#cf222e", SKIP: "#9a6700"}
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>edgedeploy fit report</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}</style></head><body>",
             f"<h1>edgedeploy fit report: <span style='color:{colour.get(results['verdict'], '#000')}'>"
             f"{esc(results['verdict'])}</span></h1>",
             f"<p>Device profile <code>{esc(results['profile']['name'])}</code>, {esc(results.get('created', ''))}</p>"]
    for model in results["models"]:
        v = model.get("verdict", "?")
        parts.append(f"<h2>{esc(model['model'])}: <span style='color:{colour.get(v, '#000')}'>{esc(v)}</span></h2>")
        parts.append("<table>" + "".join(f"<tr><th>{esc(k)}</th><td>{esc(str(val))}</td></tr>"
                                         for k, val in _model_rows(model)) + "</table>")
        parts.append("<table><tr><th>check</th><th>status</th><th>detail</th></tr>" + "".join(
            f"<tr><td>{esc(c['name'])}</td><td style='color:{colour.get(c['status'], '#000')}'>{esc(c['status'])}</td>"
            f"<td>{esc(c['message'])}</td></tr>" for c in model.get("checks", [])) + "</table>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


RENDERERS = {"json": to_json, "md": to_markdown, "junit": to_junit, "html": to_html}
SUFFIXES = {"json": "results.json", "md": "report.md", "junit": "report.junit.xml", "html": "report.html"}
