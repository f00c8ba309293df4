"""Fit reports: measurements in, verdicts out, rendered as JSON, Markdown, JUnit XML and HTML.

The verdict is derived here from the measurements (never stored by the profiler), so re-rendering an
old results file with ``edgedeploy report`` applies the same rules.
"""

from __future__ import annotations

import html
import json
from xml.etree import ElementTree as ET

from edgedeploy.checkpoint.config import ModelConfig
from edgedeploy.devices.profiles import DeviceProfile
from edgedeploy.estimate import MB, estimate
from edgedeploy.profile.memory import describe as describe_memory
from edgedeploy.report import stability
from edgedeploy.report.challenge import to_challenge_csv
from edgedeploy.results import (
    FAIL,
    PASS,
    SCHEMA_VERSION,
    SKIP,
    Check,
    DeviceInfo,
    EstimateInfo,
    ModelResult,
    Results,
    Summary,
)

__all__ = ["FAIL", "PASS", "RENDERERS", "SCHEMA_VERSION", "SKIP", "SUFFIXES", "evaluate", "make_report"]


def _mib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / MB:,.1f} MiB"


def _check(name: str, status: str, message: str) -> Check:
    return Check(name=name, status=status, message=message)


def evaluate(model: ModelResult, profile: DeviceProfile) -> ModelResult:
    """Add the estimate, the measured peak, the checks and the verdict with its reasons to one model's result."""
    m = model.manifest
    cfg = ModelConfig.from_dict(m.config or {})
    est = estimate(cfg, profile, context_window=m.context_window, prefill_chunk=m.prefill_chunk,
                   dtype=m.dtype, parameters=int(m.parameters))
    runs = model.all_runs()
    killed = next((r for r in runs if r.killed), None)
    # The peak counts swapped-out pages and GPU buffers (edgedeploy.profile.memory); results from before
    # that was measured have VmHWM + GPU only.
    peaks = [r.memory.peak_bytes if r.memory else r.peak_rss_bytes + (r.gpu_peak_bytes or 0)
             for r in runs if r.peak_rss_bytes and not r.error]
    measured = max(peaks) if peaks else (killed.killed.killed_at_bytes if killed and killed.killed else None)
    checks = []

    rules = m.rules or {}
    rstatus = rules.get("status", "PASS")
    checks.append(_check("rule-check", FAIL if rstatus == "FAIL" else PASS,
                         "; ".join(f["message"] for f in rules.get("findings", [])) or "checked at build"))

    errors = [r for r in runs if r.error and not r.killed]
    if killed and killed.killed:
        lmkd = killed.killed.lmkd
        checks.append(_check("run", FAIL, f"runner {killed.error}" + (f"; lmkd: {lmkd.line}" if lmkd else "")))
    elif errors:
        checks.append(_check("run", FAIL, f"runner error: {errors[0].error}"))
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

    # The prediction and its error belong to every report, the JUnit one included: on the memory check.
    error_pct = (100.0 * (est.peak_bytes - measured) / measured) if measured else None
    mem_check = checks[-1]
    mem_check.message += (f"; predicted {_mib(est.peak_bytes)}"
                          + (f", error {error_pct:+.1f}%" if error_pct is not None and not killed else "")
                          + f" (runtime base: {est.base_source}; budget: {est.budget_source})")

    checks.append(_parity(model))
    variance = stability.variance_check(model)  # only with --max-cv; otherwise sets over 5% are flagged in rows
    if variance is not None:
        checks.append(variance)
    failed = [c for c in checks if c.status == FAIL]
    model.estimate = EstimateInfo.from_dict(est.to_dict(), "estimate")
    model.measured_peak_bytes = measured
    model.peak_error_pct = error_pct
    model.budget_bytes = budget
    model.headroom_bytes = (budget - measured) if measured is not None and not killed else None
    model.checks = checks
    model.verdict = FAIL if failed else PASS
    model.reasons = [f"{c.name}: {c.message}" for c in failed] or ["all checks passed"]
    return model


def _parity(model: ModelResult) -> Check:
    compared = mismatched = 0
    detail = ""
    for p in model.prompts:
        ref = p.reference
        run = next((r for r in p.runs + p.warmup if not r.error), None)
        if not ref or ref.error or run is None:
            continue
        compared += 1
        a, b = run.token_ids or [], ref.token_ids or []
        if a != b:
            mismatched += 1
            pos = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
            detail = detail or f"{p.name}: first difference at generated token {pos}"
    if not compared:
        return _check("parity", SKIP, "no host reference run to compare with")
    if mismatched:
        return _check("parity", FAIL, f"{mismatched} of {compared} prompts differ from the host reference ({detail})")
    return _check("parity", PASS, f"device tokens equal host reference tokens on {compared} prompts")


def make_report(results: Results, profile: DeviceProfile) -> Results:
    """Evaluate every model of ``results`` in place and return it."""
    for model in results.models:
        evaluate(model, profile)
    results.verdict = FAIL if any(m.verdict != PASS for m in results.models) else PASS
    return results


# -- renderers ----------------------------------------------------------------------------------

def _stat(summary: Summary, key: str, fmt: str = "{:,.1f}") -> str:
    s = summary.stats().get(key)
    if s is None:
        return "n/a"
    return f"{fmt.format(s.median)} ± {fmt.format(s.stdev)}"


def _accounting(model: ModelResult) -> str:
    """How the largest measured peak is made up, each part with its source (or n/a for old results)."""
    runs = [r for r in model.all_runs() if r.memory and not r.error]
    if not runs:
        return "n/a"
    top = max(runs, key=lambda r: r.memory.peak_bytes if r.memory else 0)
    assert top.memory is not None
    return describe_memory(top.memory.to_dict())


def _model_rows(model: ModelResult) -> list[tuple[str, str]]:
    m, est, dev = model.manifest, model.estimate, model.device or DeviceInfo()
    est_extra = est.extra if est is not None else {}
    runner = model.runner
    rows = [
        ("verdict", model.verdict or "?"),
        ("reasons", "; ".join(model.reasons)),
        ("architecture", f"{m.architecture} ({m.dtype}, target {m.target})"),
        ("parameters", f"{m.parameters:,}"),
        ("weights", _mib(m.weights_bytes)),
        ("context / prefill chunk", f"{m.context_window} / {m.prefill_chunk}"),
        ("predicted peak", _mib(est.peak_bytes if est else None)),
        ("measured peak (VmHWM + GPU)", _mib(model.measured_peak_bytes)),
        ("GPU memory (GL mtrack)", _mib(max((r.gpu_peak_bytes or 0 for r in model.all_runs()), default=0))),
        ("prediction error", "n/a" if model.peak_error_pct is None else f"{model.peak_error_pct:+.1f}%"
         + (f" (runtime base: {est_extra['base_source']}; budget: {est_extra['budget_source']})"
            if "base_source" in est_extra else "")),
        ("peak accounting", _accounting(model)),
        ("budget / headroom", f"{_mib(model.budget_bytes)} / {_mib(model.headroom_bytes)}"),
        ("device", f"{dev.manufacturer or ''} {dev.model or ''} ({dev.serial or ''}, "
                   f"{dev.abi or ''}, Android {dev.android_release or 'n/a'})"),
        ("harness", model.harness),
        ("runner", f"{runner.kind} (device ABI {dev.abi or '?'}"
                   + (f", ELF {runner.elf_machine})" if runner.elf_machine else ")")),
        ("threads", _threads(model)),
        ("push", f"{model.push.files_sent} files sent, {model.push.files_skipped} skipped, "
                 f"{model.push.mb_per_s} MB/s"),
    ]
    for p in model.prompts:
        s = p.summary
        clip = f", clipped from {p.clipped_from}" if p.clipped_from else ""
        rows.append((f"prompt {p.name} ({p.prompt_tokens} tokens{clip})",
                     f"TTFT {_stat(s, 'ttft_s', '{:.3f}')} s, prefill {_stat(s, 'prefill_tok_s')} tok/s, "
                     f"decode {_stat(s, 'decode_tok_s')} tok/s, load {_stat(s, 'load_s', '{:.3f}')} s"))
    rows += stability.rows(model)
    return rows


def _threads(model: ModelResult) -> str:
    """The thread count the runner reported (and whether it chose it), from the first run that says."""
    run = next((r for r in model.all_runs() if r.threads is not None), None)
    if run is None:
        return "n/a"
    how = "default: one per CPU it may use" if run.threads_default else "--threads"
    return f"{run.threads} ({how}" + (f"; CPUs {','.join(map(str, run.cpus))})" if run.cpus is not None else ")")


def to_json(results: Results) -> str:
    return json.dumps(results.to_dict(), indent=2)


def to_markdown(results: Results) -> str:
    lines = [f"# edgedeploy fit report: {results.verdict}", "",
             f"Device profile `{results.profile.name}`, created {results.created or ''}.", ""]
    for model in results.models:
        lines += [f"## {model.model}: {model.verdict or '?'}", "", "| item | value |", "|---|---|"]
        lines += [f"| {k} | {str(v).replace('|', '/')} |" for k, v in _model_rows(model)]
        lines += ["", "| check | status | detail |", "|---|---|---|"]
        lines += [f"| {c.name} | {c.status} | {c.message.replace('|', '/')} |" for c in model.checks]
        lines.append("")
    return "\n".join(lines)


def to_junit(results: Results) -> str:
    """One test suite per model, one test case per check (SKIP becomes <skipped/>)."""
    suites = ET.Element("testsuites", name="edgedeploy profile")
    for model in results.models:
        checks = model.checks
        suite = ET.SubElement(suites, "testsuite", name=model.model, tests=str(len(checks)),
                              failures=str(sum(c.status == FAIL for c in checks)),
                              skipped=str(sum(c.status == SKIP for c in checks)))
        for c in checks:
            case = ET.SubElement(suite, "testcase", classname=f"edgedeploy.{model.model}", name=c.name)
            if c.status == FAIL:
                ET.SubElement(case, "failure", message=c.message).text = c.message
            elif c.status == SKIP:
                ET.SubElement(case, "skipped", message=c.message)
            else:
                ET.SubElement(case, "system-out").text = c.message
    ET.indent(suites)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


def to_html(results: Results) -> str:
    from edgedeploy.report import plots  # matplotlib: loaded only when an HTML report is rendered

    esc = html.escape
    colour = {PASS: "#1a7f37", FAIL: "#cf222e", SKIP: "#9a6700"}
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>edgedeploy fit report</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}</style></head><body>",
             f"<h1>edgedeploy fit report: <span style='color:{colour.get(results.verdict, '#000')}'>"
             f"{esc(results.verdict)}</span></h1>",
             f"<p>Device profile <code>{esc(results.profile.name)}</code>, {esc(results.created or '')}</p>"]
    for model in results.models:
        v = model.verdict or "?"
        parts.append(f"<h2>{esc(model.model)}: <span style='color:{colour.get(v, '#000')}'>{esc(v)}</span></h2>")
        parts.append("<table>" + "".join(f"<tr><th>{esc(k)}</th><td>{esc(str(val))}</td></tr>"
                                         for k, val in _model_rows(model)) + "</table>")
        parts.append("<table><tr><th>check</th><th>status</th><th>detail</th></tr>" + "".join(
            f"<tr><td>{esc(c.name)}</td><td style='color:{colour.get(c.status, '#000')}'>{esc(c.status)}</td>"
            f"<td>{esc(c.message)}</td></tr>" for c in model.checks) + "</table>")
        parts.append(plots.model_figures_html(model))
    parts.append(plots.IMAGE_CHECK_SCRIPT)
    parts.append("</body></html>\n")
    return "\n".join(parts)


RENDERERS = {"json": to_json, "md": to_markdown, "junit": to_junit, "html": to_html,
             "challenge-csv": to_challenge_csv}
SUFFIXES = {"json": "results.json", "md": "report.md", "junit": "report.junit.xml", "html": "report.html",
            "challenge-csv": "challenge.csv"}
