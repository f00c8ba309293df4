"""CPU speed of our build against PyTorch eager on the same ~150M random-weight Llama, from one run.

Usage::

    python bench/speed.py [--dtype float16|float32] [--threads 2] [--json] [--work DIR]

Builds (or reuses, under ``--work``) a Llama-style checkpoint with random weights, compiles a host
bundle with :func:`edgedeploy.compile.build.build_bundle`, then measures, all with the same thread
count:

* ours: prefill and decode tok/s in a fresh runner process (:func:`edgedeploy.runtime.launch.run_local`,
  ``--touch-kv`` so its peak RSS includes the whole KV cache), plus the same runner on a tiny model
  for the runtime's base RSS;
* PyTorch eager (transformers, default SDPA attention, ``torch.set_num_threads``): prefill of the same
  prompt with a KV cache, then greedy decode one token per step;
* host memory bandwidth: a numpy copy split over the threads, bytes read + written per second;
* decode roofline: bandwidth / bytes a decode step must read (every weight except the embedding
  table, of which one row is read, plus the KV cache up to the mean decode position);
* the same with a read-only bandwidth (numpy sum split over the threads): a decode step only reads,
  and a copy's destination costs extra write-allocate traffic, so this roofline is the tighter one.

Prints a table and, with ``--json``, one JSON line with every figure.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

#: The bench model: Llama-style MHA, ~134M parameters (~110M of them read per decode step).
MODEL_SIZES: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_key_value_heads": 12,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
}


def _fastest_split(work: Any, size: int, threads: int, repeat: int) -> float:
    """Shortest wall time of ``work(lo, hi)`` run on ``threads`` threads over equal slices of ``size`` items."""
    parts = np.array_split(np.arange(size), threads)
    bounds = [(int(p[0]), int(p[-1]) + 1) for p in parts]
    best = float("inf")
    for _ in range(repeat):
        workers = [threading.Thread(target=work, args=b) for b in bounds]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_bandwidth(threads: int, mib: int = 256, repeat: int = 5) -> float:
    """Best bytes read + written per second of a numpy copy of ``mib`` MiB split over ``threads`` threads."""
    src = np.ones(mib << 18, dtype=np.float32)
    dst = np.empty_like(src)

    def copy(lo: int, hi: int) -> None:
        np.copyto(dst[lo:hi], src[lo:hi])  # releases the GIL for the bulk copy

    return 2 * src.nbytes / _fastest_split(copy, src.size, threads, repeat)


def measure_read_bandwidth(threads: int, mib: int = 256, repeat: int = 5) -> float:
    """Best bytes read per second of a numpy sum of ``mib`` MiB split over ``threads`` threads.

    A decode step only reads weights; a copy also pays the write-allocate traffic of its destination,
    so a streaming read runs faster than the copy figure and the copy-based roofline is conservative.
    """
    src = np.ones(mib << 18, dtype=np.float32)

    def read(lo: int, hi: int) -> None:
        src[lo:hi].sum()  # releases the GIL for the bulk reduction

    return src.nbytes / _fastest_split(read, src.size, threads, repeat)


def make_checkpoint(work: Path, dtype: str, sizes: dict[str, Any]) -> Path:
    """The bench checkpoint, reused when one with the same sizes and dtype is already in ``work``."""
    from edgedeploy.tiny import make_tiny_checkpoint

    key = hashlib.sha256(json.dumps([dtype, sizes], sort_keys=True).encode()).hexdigest()[:12]
    ckpt = work / f"ckpt-{dtype}-{key}"
    if not (ckpt / "config.json").is_file():
        tmp = work / f".ckpt-{key}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        make_tiny_checkpoint(tmp, "llama", dtype, seed=0, **sizes)
        tmp.rename(ckpt)
    return ckpt


def eager_speed(ckpt: Path, dtype: str, threads: int, prompt: list[int], decode_tokens: int) -> dict[str, float]:
    """PyTorch eager prefill/decode tok/s with transformers' KV cache (warm: one short run first)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=getattr(torch, dtype)).eval()

    def run(ids: list[int], steps: int) -> tuple[float, float]:
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = model(torch.tensor([ids]), use_cache=True)
            tok = int(out.logits[0, -1].argmax())
            t1 = time.perf_counter()
            past = out.past_key_values
            for _ in range(steps):
                out = model(torch.tensor([[tok]]), past_key_values=past, use_cache=True)
                past, tok = out.past_key_values, int(out.logits[0, -1].argmax())
            t2 = time.perf_counter()
        return t1 - t0, t2 - t1

    run(prompt[:16], 4)
    prefill_s, decode_s = run(prompt, decode_tokens)
    return {"prefill_tok_s": len(prompt) / prefill_s, "decode_tok_s": decode_tokens / decode_s}


def runner_base_rss(work: Path, threads: int) -> int:
    """Peak RSS of the runner on a tiny model: the runtime's own memory, weights and KV being negligible."""
    from edgedeploy.compile.build import build_bundle
    from edgedeploy.runtime.launch import run_local
    from edgedeploy.tiny import make_tiny_checkpoint

    ckpt = work / "ckpt-tiny"
    if not (ckpt / "config.json").is_file():
        make_tiny_checkpoint(ckpt, "llama", "float16", seed=0)
    bundle = work / "bundle-tiny"
    build_bundle(ckpt, bundle, "host", "float16", context_window=64, prefill_chunk=16)
    res = run_local(bundle, list(range(2, 18)), 4, threads=threads, touch_kv=True, verify=False)
    if res.get("error"):
        raise RuntimeError(f"tiny runner failed: {res['error']}")
    return int(res["peak_rss_bytes"])


def decode_bytes_per_token(cfg: Any, dtype: str, weights_bytes: int, mean_pos: float) -> float:
    """Bytes one decode step reads: weights (one embedding row, not the table) plus the KV cache so far."""
    item = 2 if dtype == "float16" else 4
    embed = cfg.vocab_size * cfg.hidden_size * item
    kv = cfg.kv_bytes_per_token * item / 2 * mean_pos
    return weights_bytes - embed + cfg.hidden_size * item + kv


def bench(args: argparse.Namespace) -> dict[str, Any]:
    from edgedeploy.bundle import MANIFEST
    from edgedeploy.checkpoint.config import load_config
    from edgedeploy.compile.build import build_bundle
    from edgedeploy.runtime.launch import run_local

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    load_before = os.getloadavg()[0]
    ckpt = make_checkpoint(work, args.dtype, MODEL_SIZES)
    cfg, _ = load_config(ckpt)
    bundle = work / f"bundle-{args.dtype}"
    t1 = time.perf_counter()
    if not (args.reuse_bundle and (bundle / MANIFEST).is_file()):
        build_bundle(ckpt, bundle, "host", args.dtype, context_window=args.context, prefill_chunk=args.chunk)
    build_s = time.perf_counter() - t1
    manifest = json.loads((bundle / MANIFEST).read_text())
    weights_bytes = int(manifest["weights_bytes"])

    prompt = [int(t) for t in np.random.RandomState(0).randint(2, cfg.vocab_size, args.prompt)]
    ours = run_local(bundle, prompt, args.decode + 1, threads=args.threads, touch_kv=True, verify=False)
    if ours.get("error"):
        raise RuntimeError(f"runner failed: {ours['error']}")
    base_rss = runner_base_rss(work, args.threads)
    eager = eager_speed(ckpt, args.dtype, args.threads, prompt, args.decode)
    bandwidth = measure_bandwidth(args.threads)
    read_bandwidth = measure_read_bandwidth(args.threads)

    item = 2 if args.dtype == "float16" else 4
    kv_bytes = cfg.kv_bytes_per_token * item // 2 * args.context
    per_token = decode_bytes_per_token(cfg, args.dtype, weights_bytes, args.prompt + args.decode / 2)
    roofline = bandwidth / per_token
    expected_rss = weights_bytes + kv_bytes + base_rss
    return {
        "bench": "speed", "dtype": args.dtype, "threads": args.threads, "params": manifest["parameters"],
        "weights_bytes": weights_bytes, "kv_cache_bytes": kv_bytes, "context": args.context,
        "prefill_chunk": args.chunk, "prompt_tokens": args.prompt, "decode_tokens": ours["decode_tokens"],
        "build_s": round(build_s, 1),
        "ours_prefill_tok_s": ours["prefill_tok_s"], "ours_decode_tok_s": ours["decode_tok_s"],
        "eager_prefill_tok_s": eager["prefill_tok_s"], "eager_decode_tok_s": eager["decode_tok_s"],
        "prefill_ratio": ours["prefill_tok_s"] / eager["prefill_tok_s"],
        "decode_ratio": ours["decode_tok_s"] / eager["decode_tok_s"],
        "bandwidth_bytes_s": bandwidth, "decode_bytes_per_token": per_token,
        "roofline_decode_tok_s": roofline, "roofline_fraction": ours["decode_tok_s"] / roofline,
        "read_bandwidth_bytes_s": read_bandwidth, "read_roofline_decode_tok_s": read_bandwidth / per_token,
        "read_roofline_fraction": ours["decode_tok_s"] * per_token / read_bandwidth,
        "peak_rss_bytes": ours["peak_rss_bytes"], "runtime_base_rss_bytes": base_rss,
        "rss_ratio": ours["peak_rss_bytes"] / expected_rss,
        "total_s": round(time.perf_counter() - t0, 1),
        # Other processes competing for the cores skew every figure, eager's OpenMP barriers most.
        "loadavg_before": round(load_before, 2), "loadavg_after": round(os.getloadavg()[0], 2),
    }


def print_table(r: dict[str, Any]) -> None:
    mib = 1 << 20
    print(f"model {r['params'] / 1e6:.0f}M params, {r['dtype']}, {r['threads']} threads, context {r['context']}, "
          f"prompt {r['prompt_tokens']}, decode {r['decode_tokens']} (build {r['build_s']} s)")
    print(f"{'':10}{'ours':>10}{'eager':>10}{'ours/eager':>12}")
    for phase in ("prefill", "decode"):
        print(f"{phase + ' tok/s':10}{r[f'ours_{phase}_tok_s']:>10.1f}{r[f'eager_{phase}_tok_s']:>10.1f}"
              f"{r[f'{phase}_ratio']:>12.2f}")
    print(f"bandwidth {r['bandwidth_bytes_s'] / 1e9:.1f} GB/s, {r['decode_bytes_per_token'] / 1e6:.0f} MB/token "
          f"-> roofline {r['roofline_decode_tok_s']:.1f} tok/s; ours = {100 * r['roofline_fraction']:.0f}% of it")
    print(f"read bandwidth {r['read_bandwidth_bytes_s'] / 1e9:.1f} GB/s -> read roofline "
          f"{r['read_roofline_decode_tok_s']:.1f} tok/s; ours = {100 * r['read_roofline_fraction']:.0f}% of it")
    print(f"peak RSS {r['peak_rss_bytes'] / mib:.0f} MiB / (weights {r['weights_bytes'] / mib:.0f} + KV "
          f"{r['kv_cache_bytes'] / mib:.0f} + base {r['runtime_base_rss_bytes'] / mib:.0f} MiB) = {r['rss_ratio']:.3f}")
    if max(r["loadavg_before"], r["loadavg_after"]) > 0.5:
        print(f"note: load average {r['loadavg_before']} -> {r['loadavg_after']}: other processes share the cores")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--chunk", type=int, default=256, help="prefill chunk of the build")
    p.add_argument("--prompt", type=int, default=256, help="prompt tokens (prefill)")
    p.add_argument("--decode", type=int, default=64, help="decode steps")
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "edgedeploy-bench"),
                   help="where the checkpoint (reused) and bundles go")
    p.add_argument("--reuse-bundle", action="store_true", help="skip the build when a bundle exists")
    p.add_argument("--json", action="store_true", help="also print one JSON line")
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    r = bench(args)
    print_table(r)
    if args.json:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
