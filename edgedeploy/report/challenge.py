"""``report --format challenge-csv``: one row per model with the columns of the challenge's result sheet.

The organisers' sheet has ``Throughput`` (forward passes per second with a ~2000-token input) and
``Memory-Usage`` (MB) beside the accuracy columns; we measure the two on the phone:

- ``Throughput`` = 1 / the median time to first token of the ``long-2k`` prompt set, i.e. full forward
  passes over its ~2,048-token prompt per second (our TTFT is that forward pass: every prefill chunk
  plus the last token's logits; equal to prefill tok/s ÷ prompt tokens). Empty when the results hold
  no ``long-2k`` measurement of at least :data:`MIN_TOKENS` tokens (a short context window clips it).
- ``Memory-Usage`` = the model's measured peak (VmHWM + GPU buffers, the maximum over all its runs) in
  MB of 2^20 bytes. Empty when a run was killed for memory (then there is no completed peak).
"""

from __future__ import annotations

import csv
import io

from edgedeploy.results import ModelResult, Results

THROUGHPUT_PROMPT = "long-2k"
#: A clipped long-2k still counts as "~2000 tokens" down to this many.
MIN_TOKENS = 1900
COLUMNS = ("model", "Throughput", "Memory-Usage")


def throughput(model: ModelResult) -> float | None:
    """Forward passes per second over the long-2k prompt (1 / median TTFT), or None."""
    p = next((p for p in model.prompts if p.name == THROUGHPUT_PROMPT and p.prompt_tokens >= MIN_TOKENS), None)
    ttft = p.summary.ttft_s if p else None
    return 1.0 / ttft.median if ttft and ttft.median > 0 else None


def memory_mb(model: ModelResult) -> float | None:
    if any(r.killed for r in model.all_runs()) or model.measured_peak_bytes is None:
        return None
    return model.measured_peak_bytes / 2**20


def _cell(text: str) -> str:
    """A model name a spreadsheet would read as a formula (``=``, ``+``, ``-``, ``@``) is quoted with ``'``."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def to_challenge_csv(results: Results) -> str:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(COLUMNS)
    for m in results.models:
        tp, mem = throughput(m), memory_mb(m)
        w.writerow([_cell(m.model), "" if tp is None else f"{tp:.4f}", "" if mem is None else f"{mem:.1f}"])
    return out.getvalue()
