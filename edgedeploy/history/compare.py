"""Two runs of the history side by side, and the regression gate of ``edgedeploy check-regression``.

Gated metrics (a regression exits 1, naming the metric):

- decode tok/s of every prompt set both runs measured (the median over measured runs): a drop of more
  than ``decode_drop`` percent, or no measurement in the candidate where the baseline had one;
- the model's measured peak memory (VmHWM + GPU, the maximum over its runs): growth of more than
  ``memory_growth`` percent, or no peak in the candidate.

Prefill tok/s and TTFT are shown for information. Runs on different devices are never judged against
each other: speed and memory are properties of the device.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from edgedeploy.history.store import HistoryRun

DEFAULT_DECODE_DROP_PCT = 5.0
DEFAULT_MEMORY_GROWTH_PCT = 2.0
MB = 2**20


@dataclass
class Delta:
    """One metric of the baseline and the candidate."""

    metric: str  # decode_tok_s, prefill_tok_s, ttft_s, measured_peak_bytes
    prompt: str  # "" for model-level metrics
    baseline: float | None
    candidate: float | None
    #: Percent change in the bad direction's sign convention: positive is worse.
    worse_pct: float | None
    #: The gate's limit in percent; None for metrics shown for information only.
    limit_pct: float | None
    regressed: bool

    @property
    def label(self) -> str:
        name = {"decode_tok_s": "decode tok/s", "prefill_tok_s": "prefill tok/s", "ttft_s": "TTFT",
                "measured_peak_bytes": "peak memory"}[self.metric]
        return f"{name} on {self.prompt}" if self.prompt else name

    def value_text(self, value: float | None) -> str:
        if value is None:
            return "n/a"
        if self.metric == "measured_peak_bytes":
            return f"{value / MB:,.1f} MiB"
        if self.metric == "ttft_s":
            return f"{value:.4f} s"
        return f"{value:,.1f}"

    def describe(self) -> str:
        """One line for the user: what changed, by how much, against which limit."""
        b, c = self.value_text(self.baseline), self.value_text(self.candidate)
        if self.candidate is None:
            return f"{self.label}: no measurement in the candidate (baseline {b})"
        if self.worse_pct is None:
            return f"{self.label}: {b} -> {c}"
        verb = {"decode_tok_s": ("dropped", "rose"), "prefill_tok_s": ("dropped", "rose"),
                "ttft_s": ("grew", "fell"), "measured_peak_bytes": ("grew", "shrank")}[self.metric]
        word = verb[0] if self.worse_pct >= 0 else verb[1]
        limit = f" (limit {self.limit_pct:g}%)" if self.limit_pct is not None else ""
        return f"{self.label} {word} {abs(self.worse_pct):.1f}%: {b} -> {c}{limit}"

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "label": self.label}


def _worse_pct(baseline: float | None, candidate: float | None, higher_is_better: bool) -> float | None:
    if baseline is None or candidate is None or baseline == 0:
        return None
    change = 100.0 * (candidate - baseline) / baseline
    return -change if higher_is_better else change


def _delta(metric: str, prompt: str, base: HistoryRun, cand: HistoryRun, higher_is_better: bool,
           limit: float | None) -> Delta | None:
    key = f"{metric}.median" if prompt else metric
    b, c = base.metric(key, prompt), cand.metric(key, prompt)
    if b is None and c is None:
        return None
    worse = _worse_pct(b, c, higher_is_better)
    regressed = limit is not None and b is not None and (c is None or (worse is not None and worse > limit))
    return Delta(metric, prompt, b, c, worse, limit, regressed)


def compare(base: HistoryRun, cand: HistoryRun, decode_drop: float | None = DEFAULT_DECODE_DROP_PCT,
            memory_growth: float | None = DEFAULT_MEMORY_GROWTH_PCT) -> list[Delta]:
    """Every compared metric; ``regressed`` is set on the gated ones beyond their limit.

    A limit of None shows the metric without judging it (used for runs on different devices).
    """
    deltas = []
    common = [p for p in base.prompts() if p in cand.prompts()]
    for prompt in common:
        for metric, higher, limit in (("decode_tok_s", True, decode_drop), ("prefill_tok_s", True, None),
                                      ("ttft_s", False, None)):
            d = _delta(metric, prompt, base, cand, higher, limit)
            if d is not None:
                deltas.append(d)
    d = _delta("measured_peak_bytes", "", base, cand, False, memory_growth)
    if d is not None:
        deltas.append(d)
    return deltas


def run_line(run: HistoryRun) -> str:
    """Which run this is, in one line: id, model, device, bundle, threads, commit, when."""
    sha = (run.bundle_sha256 or "?")[:12]
    commit = (run.git_commit or "no git")[:12]
    threads = run.threads if run.threads is not None else "?"
    return (f"run {run.id}: {run.model} on {run.device_key} ({run.device_model or '?'}), bundle {sha}, "
            f"{threads} threads, {run.runner or '?'} runner, commit {commit}, {run.recorded}")
