"""The report's view of variance control and energy (:mod:`edgedeploy.profile.variance`, ``.energy``).

Everything here reads values the profiler keeps in the records' ``extra`` (not typed fields), so each
value is type-checked where it is used: a results file edited by hand renders "n/a", never a traceback.
"""

from __future__ import annotations

from typing import Any

from edgedeploy.profile.variance import DEFAULT_MAX_CV_PCT
from edgedeploy.results import FAIL, PASS, Check, ModelResult, PromptSet


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _dict(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def stat_fields(p: PromptSet, key: str) -> dict[str, float | None]:
    """mean, median, stdev, ci95_low/high, cv_pct and n of one metric of a prompt set (None where absent)."""
    s = p.summary.stats().get(key)
    if s is None:
        return {}
    extra = s.extra
    return {"mean": _num(extra.get("mean")), "median": _num(s.median), "stdev": _num(s.stdev),
            "ci95_low": _num(extra.get("ci95_low")), "ci95_high": _num(extra.get("ci95_high")),
            "cv_pct": _num(extra.get("cv_pct")), "n": _num(s.n)}


def max_cv(model: ModelResult) -> float | None:
    """``--max-cv`` as the profile recorded it (None: flag only)."""
    return _num(_dict(model.extra.get("variance")).get("max_cv_pct"))


def flagged(model: ModelResult, limit: float | None = None) -> list[tuple[str, float]]:
    """(prompt set, decode CV %) of every set whose decode tok/s CV is over ``limit`` (default 5%)."""
    limit = limit if limit is not None else (max_cv(model) or DEFAULT_MAX_CV_PCT)
    out = []
    for p in model.prompts:
        cv = stat_fields(p, "decode_tok_s").get("cv_pct")
        if cv is not None and cv > limit:
            out.append((p.name, cv))
    return out


def variance_check(model: ModelResult) -> Check | None:
    """The ``variance`` check, only when ``--max-cv`` was given: FAIL names each set over it."""
    limit = max_cv(model)
    if limit is None:
        return None
    short = [p.name for p in model.prompts if (stat_fields(p, "decode_tok_s").get("n") or 0) < 2]
    over = flagged(model, limit)
    if over:
        what = ", ".join(f"{name} {cv:.1f}%" for name, cv in over)
        return Check(name="variance", status=FAIL, message=f"decode tok/s coefficient of variation over --max-cv "
                     f"{limit:g}%: {what} (let the device cool down longer, close other apps, pin CPUs, more --runs)")
    if short:
        return Check(name="variance", status=FAIL, message=f"fewer than 2 successful runs for {', '.join(short)}: "
                     f"no coefficient of variation to check against --max-cv {limit:g}%")
    return Check(name="variance", status=PASS, message=f"decode tok/s CV within {limit:g}% on every prompt set")


def _fmt_stat(f: dict[str, float | None], unit: str = "tok/s") -> str:
    if f.get("median") is None:
        return "n/a"
    mean = f.get("mean")
    parts = [f"mean {mean:,.2f}" if mean is not None else f"median {f['median']:,.2f}",
             f"median {f['median']:,.2f}" if mean is not None else "", f"stdev {f['stdev'] or 0:,.2f} {unit}"]
    if f.get("ci95_low") is not None and f.get("ci95_high") is not None:
        parts.append(f"95% CI [{f['ci95_low']:,.2f}, {f['ci95_high']:,.2f}]")
    parts.append(f"CV {f['cv_pct']:.1f}%" if f.get("cv_pct") is not None else "CV n/a (one run)")
    return ", ".join(x for x in parts if x)


def _energy_text(e: dict[str, Any]) -> str:
    if not e.get("available"):
        return f"not available: {e.get('reason') or 'no fuel gauge'}"
    out = []
    for phase in ("prefill", "decode"):
        j, net = _num(e.get(f"{phase}_j_per_token")), _num(e.get(f"{phase}_net_j_per_token"))
        if j is not None:
            out.append(f"{phase} {j:.4g} J/token" + (f" ({net:.4g} above idle)" if net is not None else "")
                       + (" [rough: short phase]" if e.get(f"{phase}_rough") else ""))
    return "; ".join(out) or "n/a"


def rows(model: ModelResult) -> list[tuple[str, str]]:
    """Report rows: spread per prompt set, pinning, cool-downs, temperatures and clocks, energy."""
    var = _dict(model.extra.get("variance"))
    out: list[tuple[str, str]] = []
    limit = max_cv(model)
    over = dict(flagged(model))
    for p in model.prompts:
        dec, pre = stat_fields(p, "decode_tok_s"), stat_fields(p, "prefill_tok_s")
        if not dec and not pre:
            continue
        flag = (f" — FLAGGED: decode CV over {limit or DEFAULT_MAX_CV_PCT:g}%" if p.name in over else "")
        out.append((f"spread {p.name} (over {int(dec.get('n') or pre.get('n') or 0)} runs)",
                    f"decode {_fmt_stat(dec)}; prefill {_fmt_stat(pre)}{flag}"))
    if not var:
        return out
    pin = _dict(var.get("cpus"))
    cpus = pin.get("cpus")
    out.append(("CPU pinning", (f"CPUs {','.join(map(str, cpus))} ({pin.get('reason', '')})"
                                if isinstance(cpus, list) and cpus else str(pin.get("reason") or "not pinned"))))
    waits = [_dict(r.extra.get("cooldown")) for r in model.all_runs() if r.extra.get("cooldown")]
    temp, max_s = _num(var.get("cooldown_temp_c")), _num(var.get("cooldown_max_s"))
    if waits:
        total = sum(_num(w.get("waited_s")) or 0 for w in waits)
        missed = sum(1 for w in waits if w.get("reached") is False)
        nozone = sum(1 for w in waits if w.get("reached") is None)
        text = (f"before each of {len(waits)} measured runs: to {temp:g} °C (at most {max_s:g} s); waited "
                f"{total:.0f} s in all" if temp is not None and max_s is not None else f"{len(waits)} waits")
        if missed:
            text += f"; {missed} runs started above it (--cooldown-max-s reached)"
        if nozone:
            text += "; no readable thermal zone, so no wait"
        out.append(("cool-down", text))
    temps: dict[str, float] = {}
    freqs: dict[str, list[int]] = {}
    for r in model.all_runs():
        th = _dict(r.extra.get("thermal"))
        for z, c in _dict(th.get("max_temp_c")).items():
            if _num(c) is not None:
                temps[z] = max(temps.get(z, -1e9), float(c))
        for cpu, rng in _dict(th.get("freq_khz_range")).items():
            if isinstance(rng, list) and len(rng) == 2 and all(_num(x) is not None for x in rng):
                lo, hi = freqs.get(cpu, [rng[0], rng[1]])
                freqs[cpu] = [min(lo, rng[0]), max(hi, rng[1])]
    types = _dict(var.get("zone_types"))
    if temps:
        out.append(("temperatures (max during runs)", ", ".join(f"{types.get(z, 'zone' + z)} {c:.1f} °C"
                                                               for z, c in sorted(temps.items()))))
    if freqs:
        out.append(("CPU clocks during runs", ", ".join(f"cpu{c} {lo / 1e6:.2f}-{hi / 1e6:.2f} GHz"
                                                       for c, (lo, hi) in sorted(freqs.items(), key=lambda x: int(x[0])
                                                                                 if x[0].isdigit() else 0))))
    status = [var.get("thermal_status_before"), var.get("thermal_status_after")]
    if any(isinstance(s, int) for s in status):
        out.append(("thermal status (dumpsys)", f"{status[0]} before, {status[1]} after (0 none .. 6 shutdown)"))
    power = _dict(model.extra.get("energy"))
    if power:
        per = [(p.name, _dict(p.extra.get("energy"))) for p in model.prompts if p.extra.get("energy")]
        if power.get("available") and per:
            out += [(f"energy {name}", _energy_text(e)) for name, e in per]
        else:
            out.append(("energy", f"not available: {power.get('reason') or 'no fuel gauge'}"))
        if power.get("gauge"):
            out.append(("energy method", f"{power.get('method', '')} (gauge {power['gauge']}; battery "
                                         f"unplug {'done' if power.get('unplugged') else 'not done'}, reset "
                                         f"{'done' if power.get('reset') else 'NOT done'})"))
            out.append(("energy limits", str(power.get("limits", ""))))
    return out
