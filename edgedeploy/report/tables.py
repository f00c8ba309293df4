"""Rich console tables for ``inspect``, ``estimate`` and ``profiles`` (the JSON forms carry the same data)."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgedeploy.checkpoint.intake import Checkpoint
from edgedeploy.devices.profiles import DeviceProfile
from edgedeploy.estimate import MB, Estimate
from edgedeploy.models import parameter_count
from edgedeploy.results import Results, Summary

_STYLE = {"PASS": "green", "WARN": "yellow", "FAIL": "bold red", "FITS": "green", "DOES NOT FIT": "bold red"}


def _mb(n: float) -> str:
    """Sizes in MiB; below 10 MiB in KiB, so tiny test models do not all read "0"."""
    return f"{n / MB:,.0f} MiB" if abs(n) >= 10 * MB else f"{n / 1024:,.1f} KiB"


def status_text(status: str) -> str:
    return f"[{_STYLE.get(status, 'white')}]{status}[/]"


def print_checkpoint(console: Console, ck: Checkpoint) -> None:
    cfg = ck.config
    t = Table(title=escape(str(ck.path)), show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    t.add_row("architecture", escape(f"{cfg.architecture} ({cfg.family})"))
    t.add_row("layers / hidden", f"{cfg.num_layers} / {cfg.hidden_size}")
    t.add_row("heads / kv heads / head dim", f"{cfg.num_heads} / {cfg.num_kv_heads} / {cfg.head_dim}"
              + (f" (rotary {cfg.rotary_dim})" if cfg.rotary_dim != cfg.head_dim else ""))
    t.add_row("intermediate", str(cfg.intermediate_size))
    if cfg.layers:
        per_layer = ", ".join(f"{x.num_heads}/{x.num_kv_heads}/{x.intermediate_size}" for x in cfg.layers[:8])
        more = f" ... ({len(cfg.layers)} layers)" if len(cfg.layers) > 8 else ""
        t.add_row("per layer (heads/kv/MLP)", per_layer + more + "; the sizes above are the largest")
    t.add_row("vocab", str(cfg.vocab_size))
    t.add_row("tied embeddings", "yes" if cfg.tie_word_embeddings else "no")
    t.add_row("context length", str(cfg.context_length))
    if cfg.sliding_window is not None:
        t.add_row("sliding window", f"{cfg.sliding_window} (caps the bundle's context)")
    implied = parameter_count(cfg)
    if ck.has_weights:
        note = "" if ck.parameters == implied else f"  [yellow](config implies {implied:,})[/]"
        t.add_row("parameters", f"{ck.parameters:,}{note}")
        t.add_row("weights", f"{_mb(ck.weight_bytes)} in {len({x.file for x in ck.tensors.values()})} file(s)")
        t.add_row("dtypes", ", ".join(f"{k}: {v['tensors']} tensors, {v['parameters']:,} params"
                                      for k, v in ck.dtype_histogram().items()))
    else:
        t.add_row("parameters", f"{implied:,} (from config.json; no weights)")
    t.add_row("KV cache per token (FP16)", f"{cfg.kv_bytes_per_token:,} bytes")
    console.print(t)
    rules = Table(title=f"rule check: {status_text(ck.rules.status)}", title_justify="left")
    rules.add_column("status")
    rules.add_column("finding")
    for f in ck.rules.findings:
        rules.add_row(status_text(f.status), escape(f.message))
    console.print(rules)


def print_estimate(console: Console, est: Estimate, profile: DeviceProfile, title: str) -> None:
    verdict = "FITS" if est.fits else "DOES NOT FIT"
    t = Table(title=escape(f"{title} on {profile.name} ({est.dtype}, context {est.context_window}, "
                           f"prefill chunk {est.prefill_chunk})"), title_justify="left")
    t.add_column("item")
    t.add_column("memory", justify="right")
    t.add_row("weights", _mb(est.weights_bytes))
    t.add_row(f"KV cache ({est.context_window} tokens)", _mb(est.kv_cache_bytes))
    if est.kv_padding_bytes:
        t.add_row("  of which padding of pruned layers", _mb(est.kv_padding_bytes))
    t.add_row(f"largest temporary ({est.temp_largest})", _mb(est.temp_bytes))
    t.add_row("runtime base", _mb(est.runtime_base_bytes) + f" ({escape(est.base_source)})")
    t.add_row("[bold]predicted peak[/]", f"[bold]{_mb(est.peak_bytes)}[/]")
    t.add_row("usable budget", _mb(est.budget_bytes) + f" (hard limit {_mb(est.hard_limit_bytes)}; "
              f"{escape(est.budget_source)})")
    t.add_row("verdict", f"{status_text(verdict)}  headroom {_mb(est.headroom_bytes)} ({est.headroom_pct:+.1f}%)")
    t.add_row("decode (roofline)", f"{est.decode_tok_s:,.1f} tok/s")
    t.add_row("prefill (compute)", f"{est.prefill_tok_s:,.1f} tok/s")
    console.print(t)


def print_profiles(console: Console, profiles: list[DeviceProfile]) -> None:
    t = Table(title="device profiles", title_justify="left")
    for col in ("name", "description", "RAM", "budget", "bandwidth", "target", "calibrated"):
        t.add_column(col)
    for p in profiles:
        t.add_row(escape(p.name), escape(p.description), f"{p.ram_mb:,.0f} MiB", f"{p.budget_mb:,.0f} MiB",
                  f"{p.memory_bandwidth_gbps:.1f} GB/s", p.target, "yes" if p.calibrated else "no")
    console.print(t)


def print_run(console: Console, text: str | None, result: dict) -> None:
    """Generated text and the runner's metrics."""
    if text is not None:
        console.print(f"[bold]output:[/] {escape(text)}")
    console.print(f"[bold]token ids:[/] {' '.join(str(t) for t in result['token_ids'])}", soft_wrap=True)
    t = Table(title="run", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column(justify="right")
    t.add_row("prompt / generated tokens", f"{result['prompt_tokens']} / {len(result['token_ids'])}")
    t.add_row("finished by", str(result.get("finish_reason") or "?"))
    t.add_row("load", f"{result['load_s']:.3f} s")
    t.add_row("time to first token", f"{result['ttft_s'] * 1000:.1f} ms")
    t.add_row("prefill", f"{result['prefill_tok_s']:,.1f} tok/s")
    t.add_row("decode", f"{result['decode_tok_s']:,.1f} tok/s")
    t.add_row("peak RSS (VmHWM)", _mb(result["peak_rss_bytes"]))
    t.add_row("threads", str(result.get("threads") or "all"))
    console.print(t)


def _med(summary: Summary, key: str, fmt: str = "{:,.1f}") -> str:
    v = summary.stats().get(key)
    return f"{fmt.format(v.median)} ± {fmt.format(v.stdev)}" if v else "n/a"


def print_fit(console: Console, results: Results) -> None:
    """A memory table (one row per model), then each model's reasons and per-prompt speed."""
    where = escape(f"{results.profile.name} ({results.device.serial if results.device else ''})")
    t = Table(title=f"fit report on {where}: {status_text(results.verdict)}", title_justify="left")
    for col in ("model", "verdict", "predicted", "measured peak", "budget", "headroom"):
        t.add_column(col, justify="left" if col in ("model", "verdict") else "right")
    for m in results.models:
        predicted = m.estimate.peak_bytes if m.estimate else None
        t.add_row(escape(m.model), status_text(m.verdict or "?"), _mb(predicted) if predicted is not None else "n/a",
                  _mb(m.measured_peak_bytes) if m.measured_peak_bytes else "n/a",
                  _mb(m.budget_bytes) if m.budget_bytes is not None else "n/a",
                  _mb(m.headroom_bytes) if m.headroom_bytes is not None else "n/a")
    console.print(t)
    for m in results.models:
        console.print(f"[bold]{escape(m.model)}[/]: " + escape("; ".join(m.reasons)), highlight=False)
        p = Table(show_header=True, box=None, padding=(0, 2))
        for col in ("prompt", "tokens", "TTFT s", "prefill tok/s", "decode tok/s"):
            p.add_column(col, justify="left" if col == "prompt" else "right")
        for prompt in m.prompts:
            s = prompt.summary
            p.add_row(escape(prompt.name), str(prompt.prompt_tokens), _med(s, "ttft_s", "{:.3f}"),
                      _med(s, "prefill_tok_s"), _med(s, "decode_tok_s"))
        console.print(p)
