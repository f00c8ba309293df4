"""Plots for the HTML fit report: PNG images (matplotlib, Agg) embedded as base64, so the file stands alone.

One model gets up to four figures:

* memory timeline: RSS of every run over time, each run's peak marked, the profile's budget as a line;
* temperature and CPU clock over the runs (device time), from the profiler's sensor samples;
* predicted vs measured peak: the estimate's parts (weights, KV cache, temporaries, runtime base, GPU)
  stacked beside the measured peak's parts (CPU resident memory and GPU buffers, as accounted);
* prefill and decode tok/s per prompt set: mean with its 95% confidence interval as error bars,
  sets whose decode CV is over the limit in red.

Figures whose data a results file lacks (older files, the harness app) are left out. Only
``matplotlib.figure.Figure`` with the Agg canvas is used, never pyplot: no global backend state.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from edgedeploy.report.stability import flagged, stat_fields
from edgedeploy.results import ModelResult

MIB = 2**20
DPI = 90
MAX_RUNS = 16
#: Set on <body> once the page has loaded: "data-images" = "loaded/total" images with a natural width.
IMAGE_CHECK_SCRIPT = (
    "<script>window.addEventListener('load',function(){var i=Array.prototype.slice.call(document.images);"
    "var ok=i.filter(function(x){return x.complete&&x.naturalWidth>0;}).length;"
    "document.body.setAttribute('data-images',ok+'/'+i.length);"
    "var p=document.createElement('p');p.id='image-check';p.textContent='images loaded: '+ok+'/'+i.length;"
    "document.body.appendChild(p);});</script>")


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _png(fig: Figure) -> str:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _labelled_runs(model: ModelResult) -> list[tuple[str, Any]]:
    out = []
    for p in model.prompts:
        for kind, runs in (("warm-up", p.warmup), ("run", p.runs)):
            for i, r in enumerate(runs, 1):
                out.append((f"{p.name} {kind} {i}", r))
    return out[:MAX_RUNS]


def memory_timeline(model: ModelResult) -> Figure | None:
    runs = [(label, r) for label, r in _labelled_runs(model) if r.timeline]
    if not runs:
        return None
    fig = Figure(figsize=(8, 3.6))
    ax = fig.add_subplot()
    top = 0.0
    for label, r in runs:
        t = [_num(s.t_s) if _num(s.t_s) is not None else i * 0.1 for i, s in enumerate(r.timeline)]
        rss = [(_num(s.rss_bytes) or 0) / MIB for s in r.timeline]
        line = ax.plot(t, rss, lw=1.2, label=label)[0]
        k = max(range(len(rss)), key=rss.__getitem__)
        peak = max(rss[k], (_num(r.peak_rss_bytes) or 0) / MIB)
        top = max(top, peak)
        ax.plot([t[k]], [peak], marker="v", color=line.get_color(), ms=8)
        ax.annotate(f"{peak:,.0f}", (t[k], peak), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
    budget = (_num(model.budget_bytes) or 0) / MIB
    if budget and budget <= 3 * top:
        ax.axhline(budget, color="#cf222e", ls="--", lw=1.5, label=f"budget {budget:,.0f} MiB")
        top = max(top, budget)
    elif budget:
        ax.text(0.99, 0.97, f"budget {budget:,.0f} MiB (above this scale)", transform=ax.transAxes, ha="right",
                va="top", color="#cf222e", fontsize=8)
    ax.set_ylim(0, top * 1.15 or 1)
    ax.set_xlabel("seconds since the runner started")
    ax.set_ylabel("RSS (MiB)")
    ax.set_title("Memory per run (▼ peak)")
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    ax.grid(alpha=0.3)
    return fig


def thermal(model: ModelResult) -> Figure | None:
    series = [(label, [s for s in r.extra.get("sensors") or [] if isinstance(s, dict) and _num(s.get("t")) is not None])
              for label, r in _labelled_runs(model)]
    series = [(label, s) for label, s in series if s]
    if not series:
        return None
    t0 = min(_num(s[0]["t"]) or 0 for _, s in series)
    var = model.extra.get("variance") if isinstance(model.extra.get("variance"), dict) else {}
    types = var.get("zone_types") if isinstance(var.get("zone_types"), dict) else {}
    temps: dict[str, tuple[list[float], list[float]]] = {}
    freqs: dict[str, tuple[list[float], list[float]]] = {}
    fig = Figure(figsize=(8, 4.6))
    ax_t, ax_f = fig.subplots(2, 1, sharex=True)
    for i, (_label, samples) in enumerate(series):
        xs = [(_num(s["t"]) or 0) - t0 for s in samples]
        ax_t.axvspan(xs[0], xs[-1], color="#888", alpha=0.08 if i % 2 else 0.16, lw=0)
        for s, x in zip(samples, xs, strict=True):
            for z, c in (s.get("temps_c") or {}).items():
                if _num(c) is not None and -40 <= c <= 150:
                    temps.setdefault(z, ([], []))[0].append(x)
                    temps[z][1].append(c)
            for cpu, f in (s.get("freq_khz") or {}).items():
                if _num(f) is not None:
                    freqs.setdefault(cpu, ([], []))[0].append(x)
                    freqs[cpu][1].append(f / 1e6)
    for z, (x, y) in sorted(temps.items()):
        ax_t.plot(x, y, ".-", ms=3, lw=1, label=str(types.get(z, f"zone {z}")))
    cool = var.get("cooldown_temp_c")
    if _num(cool) is not None:
        ax_t.axhline(cool, color="#0969da", ls=":", lw=1, label=f"cool-down {cool:g} °C")
    for cpu, (x, y) in sorted(freqs.items(), key=lambda kv: int(kv[0]) if str(kv[0]).isdigit() else 0):
        ax_f.plot(x, y, ".-", ms=3, lw=1, label=f"cpu{cpu}")
    ax_t.set_ylabel("°C")
    ax_t.set_title("Temperature and CPU clock during the runs (shaded: one run each)")
    ax_f.set_ylabel("GHz")
    ax_f.set_xlabel("device seconds since the first run")
    for ax in (ax_t, ax_f):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7, ncol=4, loc="upper right")
    return fig


def breakdown(model: ModelResult) -> Figure | None:
    est = model.estimate
    if est is None:
        return None
    e = {**est.extra, "peak_bytes": est.peak_bytes}
    parts = [("weights", "weights_bytes"), ("KV cache", "kv_cache_bytes"), ("temporaries", "temp_bytes"),
             ("runtime", "runtime_base_bytes"), ("GPU", "gpu_bytes")]
    predicted = [(name, (_num(e.get(key)) or 0) / MIB) for name, key in parts]
    if not any(v for _, v in predicted):
        return None
    runs = [r for r in model.all_runs() if r.memory and not r.error]
    if runs:
        top = max(runs, key=lambda r: r.memory.peak_bytes if r.memory else 0).memory
        assert top is not None
        measured = [(f"CPU resident ({top.cpu_source or 'VmHWM'})", top.cpu_bytes / MIB),
                    (f"GPU ({top.gpu_source or 'none'})", top.gpu_bytes / MIB)]
    else:
        measured = [("CPU resident (VmHWM)", (_num(model.measured_peak_bytes) or 0) / MIB), ("GPU", 0.0)]
    fig = Figure(figsize=(8, 3.4))
    ax = fig.add_subplot()
    colours = ["#4c72b0", "#dd8452", "#55a868", "#8172b3", "#c44e52"]
    left = 0.0
    for (name, v), c in zip(predicted, colours, strict=True):
        ax.barh(["predicted"], [v], left=left, color=c, label=name)
        if v > 0.04 * sum(x for _, x in predicted):
            ax.text(left + v / 2, 0, f"{v:,.0f}", ha="center", va="center", fontsize=7, color="white")
        left += v
    left = 0.0
    for (name, v), c in zip(measured, ["#2a4d69", "#c44e52"], strict=True):
        ax.barh(["measured"], [v], left=left, color=c, hatch="//", label=name)
        if v > 0:
            ax.text(left + v / 2, 1, f"{v:,.0f}", ha="center", va="center", fontsize=7, color="white")
        left += v
    budget = (_num(model.budget_bytes) or 0) / MIB
    span = max(sum(v for _, v in predicted), sum(v for _, v in measured))
    if budget and budget <= 3 * span:
        ax.axvline(budget, color="#cf222e", ls="--", label=f"budget {budget:,.0f} MiB")
    ax.set_xlabel("MiB")
    ax.set_title("Peak memory: predicted parts vs measured")
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.25))
    ax.grid(axis="x", alpha=0.3)
    return fig


def speed(model: ModelResult) -> Figure | None:
    rows = [(p.name, stat_fields(p, "prefill_tok_s"), stat_fields(p, "decode_tok_s")) for p in model.prompts]
    rows = [r for r in rows if r[1] or r[2]]
    if not rows:
        return None
    over = {name for name, _ in flagged(model)}
    fig = Figure(figsize=(8, 3.2))
    axes = fig.subplots(1, 2)
    for ax, idx, title in ((axes[0], 1, "prefill tok/s"), (axes[1], 2, "decode tok/s")):
        names, means, errs, colours = [], [], [], []
        for row in rows:
            f = row[idx]
            centre = f.get("mean") if f.get("mean") is not None else f.get("median")
            if centre is None:
                continue
            half = (f["ci95_high"] - centre) if f.get("ci95_high") is not None else 0.0
            names.append(row[0])
            means.append(centre)
            errs.append(max(0.0, half))
            colours.append("#cf222e" if idx == 2 and row[0] in over else "#4c72b0")
        ax.bar(names, means, yerr=errs, capsize=6, color=colours)
        for x, (m, row) in enumerate(zip(means, [r for r in rows if (r[idx].get("mean") or r[idx].get("median"))
                                                 is not None], strict=False)):
            cv = row[idx].get("cv_pct")
            ax.text(x, m / 2, f"CV {cv:.1f}%" if cv is not None else "1 run", ha="center", va="center", fontsize=8,
                    color="white", fontweight="bold")
        ax.set_title(f"{title} (mean, 95% CI)")
        ax.grid(axis="y", alpha=0.3)
        ax.tick_params(axis="x", labelsize=8)
    return fig


FIGURES = (("memory", memory_timeline), ("thermal", thermal), ("breakdown", breakdown), ("speed", speed))


def model_figures_html(model: ModelResult) -> str:
    """The model's figures as ``<figure>`` elements with embedded PNGs ("" when there is nothing to plot)."""
    parts = []
    for name, make in FIGURES:
        fig = make(model)
        if fig is None:
            continue
        title = fig.axes[0].get_title() if fig.axes else name
        parts.append(f"<figure class='plot' data-plot='{name}'><img alt='{html.escape(title)}' "
                     f"src='data:image/png;base64,{_png(fig)}'><figcaption>{html.escape(title)}</figcaption></figure>")
    return "<div class='plots'>" + "".join(parts) + "</div>" if parts else ""
