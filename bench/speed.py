"""CPU speed and memory of our build against PyTorch eager and llama.cpp, at real model sizes, from one run.

Usage::

    python bench/speed.py [--sizes 134m,1.1b,phi-2] [--prompts 512[,2000]] [--decode 16] [--threads 2]
                          [--reps 3] [--context 2048] [--chunk 512] [--work DIR] [--skip-llamacpp] [--json]

For each model (``bench/models.py``: the 134M Llama-style bench model, TinyLlama-1.1B's shape, Phi-2 from
its real config; random FP16 weights written straight to safetensors and cached in ``--work``):

* ours: a host bundle (:func:`edgedeploy.compile.build.build_bundle`, cached under a hash of the
  checkpoint, the build settings, edgedeploy's git HEAD and the compiler's sources, so a changed kernel
  rebuilds), run in a fresh runner process per repetition (:func:`edgedeploy.runtime.launch.run_local`);
* PyTorch eager: transformers in this process, ``dtype=float16``, ``torch.set_num_threads``, prefill with
  ``logits_to_keep=1`` and the KV cache, then greedy decode one token per step;
* llama.cpp: ``llama-bench`` (``bench/llamacpp.py``) on an F16 GGUF of the same checkpoint: prefill of the
  prompt from an empty context, decode at the prompt's depth (``-d``), flash attention off and on, the
  better of the two; the column is skipped with the reason when llama.cpp cannot be built or converted.

Same random prompt (fixed seed), same decode steps and threads on every side. Each side is warmed up
once, then ``--reps`` repetitions run interleaved (ours, eager, ours, eager, ...); llama-bench runs its
repetitions itself, after them. Figures are medians with min/max. Our warm-up run writes the whole KV
cache (``touch_kv``) and gives the peak RSS, compared with ``edgedeploy estimate --profile host`` for the
same context window and prefill chunk. A read-bandwidth probe over an array of at least 4x the L3 cache
(the fastest of a few numpy reductions, split over the threads) gives the DRAM roofline: decode tok/s <=
bandwidth / bytes one decode step reads (every weight except the embedding table, one embedding row,
and the KV cache up to the mean decode position). The CPU model, its vector ISA flags, the L3 size,
the load average and the share of the CPUs that other processes used are recorded with the figures.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import inspect
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import llamacpp  # noqa: E402  (bench/llamacpp.py)
import models  # noqa: E402  (bench/models.py)

MIB = 1 << 20
DTYPE_BYTES = {"float16": 2, "float32": 4}
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_fp16")


# -- the machine ----------------------------------------------------------------------------------


def cpu_info() -> dict[str, Any]:
    """CPU model name, the vector ISA flags that matter for FP16 GEMM/GEMV, and the L3 size in bytes."""
    model, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    from edgedeploy.compile.targets import host_mcpu

    # Cloud VMs often show only "AMD EPYC": LLVM's name for the core (znver4, znver5, sapphirerapids)
    # says which generation the figures belong to.
    return {"cpu_model": model, "llvm_mcpu": host_mcpu() or "unknown", "isa": {f: f in flags for f in ISA_FLAGS},
            "l3_bytes": l3_bytes(), "cpus": os.cpu_count()}


def parse_cache_size(text: str) -> int:
    """Bytes of a sysfs cache size such as ``32768K`` or ``32M``."""
    text = text.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * mult


def l3_bytes() -> int:
    """The L3 size that cpu0 sees (sysfs), or 32 MiB when the kernel does not say."""
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            if (index / "level").read_text().strip() == "3":
                return parse_cache_size((index / "size").read_text())
        except (OSError, ValueError):
            continue
    return 32 * MIB


def _split_times(work: Any, size: int, threads: int, repeat: int) -> list[float]:
    """Wall times of ``work(lo, hi)`` run on ``threads`` threads over equal slices of ``size`` items."""
    parts = np.array_split(np.arange(size), threads)
    bounds = [(int(p[0]), int(p[-1]) + 1) for p in parts]
    times = []
    for _ in range(repeat):
        workers = [threading.Thread(target=work, args=b) for b in bounds]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        times.append(time.perf_counter() - t0)
    return times


#: Read kernels of the bandwidth probe, by name: (dtype the bytes are viewed as, reduction). numpy releases the
#: GIL in each. A float32 sum is ALU-bound on a 2-core Zen 4 (~34 GB/s, like a fp16 torch sum), while the
#: SIMD integer max runs at ~53 GB/s, as fast as torch's bf16 sum: the probe takes the fastest kernel.
READ_KERNELS: dict[str, tuple[Any, Any]] = {
    "uint8 max": (np.uint8, np.max), "int16 max": (np.int16, np.max), "float32 sum": (np.float32, np.sum),
}


def measure_read_bandwidth(threads: int, nbytes: int, repeat: int = 7) -> dict[str, Any]:
    """DRAM read bandwidth: bytes per second of the fastest of :data:`READ_KERNELS` over ``nbytes``.

    A decode step only reads weights, so a streaming read is its roofline. The caller makes the array
    at least 4x the L3 cache so that the figure is DRAM's. Each kernel runs on ``threads`` threads over
    equal slices, ``repeat`` times after one pass that faults the pages in; the median of each kernel is
    kept, and the fastest kernel gives ``median``, ``min`` and ``max``.
    """
    raw = np.ones(nbytes, dtype=np.uint8)
    per_kernel: dict[str, dict[str, float]] = {}
    for name, (dtype, reduce) in READ_KERNELS.items():
        view = raw.view(dtype)

        def read(lo: int, hi: int, view: np.ndarray = view, reduce: Any = reduce) -> None:
            reduce(view[lo:hi])

        rates = [raw.nbytes / t for t in _split_times(read, view.size, threads, repeat + 1)[1:]]
        per_kernel[name] = {"median": statistics.median(rates), "min": min(rates), "max": max(rates)}
    best = max(per_kernel, key=lambda k: per_kernel[k]["median"])
    return {"bytes": raw.nbytes, "kernel": best, **per_kernel[best],
            "kernels": {k: round(v["median"] / 1e9, 1) for k, v in per_kernel.items()}}


class CpuShare:
    """How much of the machine other processes used between :meth:`start` and :meth:`stop`.

    Load average counts our own threads too (it sits near ``--threads`` while we run), so this reads
    the busy time of all CPUs from ``/proc/stat`` and subtracts the CPU time of this process and its
    reaped children (the runners, llama-bench). ``steal`` is time the hypervisor gave to other guests.
    """

    def __init__(self) -> None:
        self.ncpu = os.cpu_count() or 1
        self.tick = os.sysconf("SC_CLK_TCK")
        self.t0, self.busy0, self.steal0, self.own0 = self._now()

    def _now(self) -> tuple[float, float, float, float]:
        try:
            f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        except (OSError, ValueError, IndexError):
            f = [0] * 8
        f += [0] * (8 - len(f))
        busy = (f[0] + f[1] + f[2] + f[5] + f[6]) / self.tick  # user nice system irq softirq
        own = sum(getattr(resource.getrusage(who), k) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                  for k in ("ru_utime", "ru_stime"))
        return time.perf_counter(), busy, f[7] / self.tick, own

    def stop(self) -> dict[str, float]:
        t, busy, steal, own = self._now()
        cap = max((t - self.t0) * self.ncpu, 1e-9)
        return {"others_pct": round(100 * max(busy - self.busy0 - (own - self.own0), 0.0) / cap, 1),
                "steal_pct": round(100 * (steal - self.steal0) / cap, 1)}


def loadavg() -> float:
    return round(os.getloadavg()[0], 2)


# -- helpers --------------------------------------------------------------------------------------


def stats(samples: list[float]) -> dict[str, Any]:
    """Median, min and max of ``samples`` (kept too)."""
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples),
            "samples": [round(s, 3) for s in samples]}


def decode_bytes_per_token(hidden: int, vocab: int, kv_bytes_per_token_fp16: int, dtype: str, weights_bytes: int,
                           mean_pos: float) -> float:
    """Bytes one decode step reads: weights (one embedding row, not the table) plus the KV cache so far."""
    item = DTYPE_BYTES[dtype]
    embed = vocab * hidden * item
    kv = kv_bytes_per_token_fp16 * item / 2 * mean_pos
    return weights_bytes - embed + hidden * item + kv


def source_key() -> str:
    """edgedeploy's git HEAD plus a hash of the compiler's and model definitions' sources (uncommitted edits too).

    A bundle is rebuilt when any of them change, e.g. when ``edgedeploy/compile/schedules.py`` does.
    """
    try:
        head = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        head = "unknown"
    h = hashlib.sha256(head.encode())
    for path in sorted([*REPO_ROOT.glob("edgedeploy/compile/*.py"), *REPO_ROOT.glob("edgedeploy/models/*.py")]):
        h.update(path.relative_to(REPO_ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return f"{head[:10]}-{h.hexdigest()[:10]}"


def schedules_sha() -> str:
    return hashlib.sha256((REPO_ROOT / "edgedeploy/compile/schedules.py").read_bytes()).hexdigest()[:12]


def cached_bundle(ckpt: Path, work: Path, name: str, dtype: str, context: int, chunk: int) -> tuple[Path, float | None]:
    """A host bundle of ``ckpt``, built unless one with the same inputs exists; (folder, build seconds or None).

    Bundles of the same model with another key (older sources) are removed after a successful build.
    """
    import tvm

    from edgedeploy.bundle import MANIFEST
    from edgedeploy.compile.build import build_bundle

    blob = json.dumps([ckpt.name, dtype, context, chunk, "host", source_key(), tvm.__version__])
    bundle = work / f"bundle-{name}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"
    if (bundle / MANIFEST).is_file():
        return bundle, None
    t0 = time.perf_counter()
    build_bundle(ckpt, bundle, "host", dtype, context_window=context, prefill_chunk=chunk)
    build_s = time.perf_counter() - t0
    for old in work.glob(f"bundle-{name}-*"):
        if old != bundle and (old / MANIFEST).is_file():
            shutil.rmtree(old, ignore_errors=True)
    return bundle, build_s


# -- the three runners --------------------------------------------------------------------------------


def run_ours(bundle: Path, prompt: list[int], decode: int, threads: int, touch_kv: bool = False) -> dict[str, Any]:
    """One fresh runner process: prefill ``prompt``, then ``decode`` greedy steps (unless a stop token comes)."""
    from edgedeploy.runtime.launch import run_local

    res = run_local(bundle, prompt, decode + 1, threads=threads, touch_kv=touch_kv, verify=False, timeout=3600)
    if res.get("error"):
        raise RuntimeError(f"runner failed: {res['error']}")
    if res["threads"] != threads:
        raise RuntimeError(f"runner used {res['threads']} threads, not {threads}")
    return res


class Eager:
    """PyTorch eager (transformers) on the same checkpoint, loaded once per model in this process."""

    def __init__(self, ckpt: Path, dtype: str, threads: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        torch.set_num_threads(threads)
        self.torch = torch
        t0 = time.perf_counter()
        self.model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=getattr(torch, dtype)).eval()
        self.load_s = time.perf_counter() - t0
        # transformers 5.2x renamed past_key_values to cache (argument and output); older ones know only the former
        self.cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"

    def run(self, prompt: list[int], decode: int) -> dict[str, float]:
        """Prefill with the KV cache (logits of the last position only), then ``decode`` greedy steps."""
        torch, model = self.torch, self.model
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = model(torch.tensor([prompt]), use_cache=True, logits_to_keep=1)
            tok = int(out.logits[0, -1].argmax())
            t1 = time.perf_counter()
            past = getattr(out, self.cache_arg)
            for _ in range(decode):
                out = model(torch.tensor([[tok]]), **{self.cache_arg: past}, use_cache=True, logits_to_keep=1)
                past, tok = getattr(out, self.cache_arg), int(out.logits[0, -1].argmax())
            t2 = time.perf_counter()
        return {"prefill_tok_s": len(prompt) / (t1 - t0), "decode_tok_s": decode / (t2 - t1) if decode else 0.0}

    def close(self) -> None:
        del self.model
        gc.collect()


class LlamaCpp:
    """llama-bench, built once per run; ``reason`` says why not when it cannot be."""

    def __init__(self, work: Path, enabled: bool) -> None:
        self.binary: Path | None = None
        self.tree: Path | None = None
        self.reason = "skipped (--skip-llamacpp)" if not enabled else None
        self.log = work / "llamacpp.log"
        if enabled:
            try:
                self.tree = llamacpp.fetch_source()
                self.binary = llamacpp.build_llama_bench(self.tree)
            except Exception as e:  # the column is optional: any failure becomes its reason, never the bench's end
                self.reason = f"not built: {e if isinstance(e, llamacpp.Unavailable) else repr(e)}"

    def gguf(self, ckpt: Path, work: Path, dtype: str) -> Path:
        outtype = "f16" if dtype == "float16" else "f32"
        assert self.tree is not None
        return llamacpp.convert(self.tree, ckpt, work / "gguf" / f"{ckpt.name}-{outtype}.gguf", self.log, outtype)


# -- one model --------------------------------------------------------------------------------------


def estimate_peak(ckpt: Path, dtype: str, context: int, chunk: int) -> dict[str, Any]:
    """``edgedeploy estimate --profile host`` for the bundle's context window and prefill chunk."""
    from edgedeploy.checkpoint.intake import open_checkpoint
    from edgedeploy.devices.profiles import load_profile
    from edgedeploy.estimate import estimate

    ck = open_checkpoint(ckpt)
    est = estimate(ck.config, load_profile("host"), context_window=context, prefill_chunk=chunk, dtype=dtype,
                   parameters=ck.parameters)
    return est.to_dict()


def probe_bandwidth(args: argparse.Namespace, l3: int) -> float:
    """One DRAM read-bandwidth probe (bytes/s). On this VM it swings between ~35 and ~53 GB/s from minute to
    minute with nothing else running in the guest, so each model probes between its repetitions and its
    roofline takes the highest figure seen (the bound the memory system showed it can reach)."""
    return measure_read_bandwidth(args.threads, max(4 * l3, args.probe_mib * MIB), repeat=5)["median"]


def prepare_model(name: str, args: argparse.Namespace, work: Path, r: dict[str, Any]) -> tuple[Path, Path]:
    """The cached checkpoint and bundle of model ``name``; what was written or built goes into ``r``."""
    t0 = time.perf_counter()
    ckpt, written = models.cached_checkpoint(name, work)
    r["checkpoint"] = str(ckpt)
    r["checkpoint_write_s"] = round(time.perf_counter() - t0, 1) if written else None
    bundle, build_s = cached_bundle(ckpt, work, name, args.dtype, args.context, args.chunk)
    r.update(bundle=str(bundle), build_s=None if build_s is None else round(build_s, 1))
    print(f"[{name}] checkpoint {ckpt.name}{' (written)' if written else ''}, bundle {bundle.name}"
          f"{f' (built in {build_s:.0f} s)' if build_s else ' (cached)'}", file=sys.stderr, flush=True)
    return ckpt, bundle


def measure_memory(bundle: Path, ckpt: Path, warm_prompt: list[int], args: argparse.Namespace) -> dict[str, Any]:
    """Our warm-up run, which writes the whole KV cache: its peak RSS, and the estimate for the same bundle."""
    warm = run_ours(bundle, warm_prompt, 1, args.threads, touch_kv=not args.no_touch_kv)
    est = estimate_peak(ckpt, args.dtype, args.context, args.chunk)
    return {"peak_rss_bytes": int(warm["peak_rss_bytes"]), "estimate_peak_bytes": int(est["peak_bytes"]),
            "estimate": est, "kv_touched": not args.no_touch_kv}


def measure_interleaved(name: str, bundle: Path, ckpt: Path, prompts: dict[int, list[int]], args: argparse.Namespace,
                        probe: Any) -> tuple[dict[int, dict[str, Any]], float]:
    """Ours and eager, warmed up, then ``--reps`` times each in turn per prompt; (results per prompt, eager load s).

    ``probe()`` runs after every pair of runs (see :func:`probe_bandwidth`).
    """
    eager = Eager(ckpt, args.dtype, args.threads)
    out: dict[int, dict[str, Any]] = {}
    try:
        eager.run(prompts[args.prompts[0]][:16], 4)
        for p, ids in prompts.items():
            ours_runs, eager_runs = [], []
            for rep in range(args.reps):
                ours_runs.append(run_ours(bundle, ids, args.decode, args.threads))
                eager_runs.append(eager.run(ids, args.decode))
                probe()
                print(f"[{name}] prompt {p} rep {rep + 1}/{args.reps}: ours {ours_runs[-1]['prefill_tok_s']:.1f}/"
                      f"{ours_runs[-1]['decode_tok_s']:.2f}, eager {eager_runs[-1]['prefill_tok_s']:.1f}/"
                      f"{eager_runs[-1]['decode_tok_s']:.2f} tok/s (load {loadavg()})", file=sys.stderr, flush=True)
            out[p] = {
                "ours": {ph: stats([x[f"{ph}_tok_s"] for x in ours_runs]) for ph in ("prefill", "decode")},
                "eager": {ph: stats([x[f"{ph}_tok_s"] for x in eager_runs]) for ph in ("prefill", "decode")},
                "ours_decode_steps": sorted({x["decode_tokens"] for x in ours_runs}),
                "ours_peak_rss_bytes": max(x["peak_rss_bytes"] for x in ours_runs),
            }
    finally:
        eager.close()
    return out, eager.load_s


def bench_model(name: str, args: argparse.Namespace, work: Path, l3: int, lcpp: LlamaCpp) -> dict[str, Any]:
    """Everything for one model: memory, interleaved ours/eager runs, llama.cpp, rooflines and ratios."""
    from edgedeploy.checkpoint.config import load_config

    r: dict[str, Any] = {"model": name, "loadavg_before": loadavg()}
    t0, share = time.perf_counter(), CpuShare()
    ckpt, bundle = prepare_model(name, args, work, r)
    raw = json.loads((ckpt / "config.json").read_text())
    cfg, _ = load_config(ckpt)
    manifest = json.loads((bundle / "bundle.json").read_text())
    weights = int(manifest["weights_bytes"])
    r.update(params=int(manifest["parameters"]), weights_bytes=weights, context=args.context, prefill_chunk=args.chunk,
             cache_resident=weights < 4 * l3, decode_steps=args.decode, threads=args.threads)
    prompts = {p: models.prompt_ids(raw, p) for p in args.prompts}
    r.update(measure_memory(bundle, ckpt, prompts[args.prompts[0]][:16], args))
    bandwidths = [probe_bandwidth(args, l3)]
    r["prompts"], eager_load_s = measure_interleaved(name, bundle, ckpt, prompts, args,
                                                     lambda: bandwidths.append(probe_bandwidth(args, l3)))
    r["eager_load_s"] = round(eager_load_s, 1)
    for p, pr in r["prompts"].items():
        pr["llamacpp"] = bench_llamacpp(lcpp, ckpt, work, args, p, name)
    bandwidths.append(probe_bandwidth(args, l3))
    r["read_bandwidth"] = stats(bandwidths)
    for p, pr in r["prompts"].items():
        per_token = decode_bytes_per_token(cfg.hidden_size, cfg.vocab_size, cfg.kv_bytes_per_token, args.dtype,
                                           weights, p + args.decode / 2)
        pr.update(decode_bytes_per_token=per_token, roofline_decode_tok_s=max(bandwidths) / per_token)
        add_ratios(pr)
    r["peak_rss_bytes"] = max([r["peak_rss_bytes"]] + [pr["ours_peak_rss_bytes"] for pr in r["prompts"].values()])
    r["rss_vs_estimate"] = r["peak_rss_bytes"] / r["estimate_peak_bytes"]
    r.update(loadavg_after=loadavg(), cpu_share=share.stop(), total_s=round(time.perf_counter() - t0, 1))
    return r


def bench_llamacpp(lcpp: LlamaCpp, ckpt: Path, work: Path, args: argparse.Namespace, prompt: int,
                   name: str) -> dict[str, Any]:
    if lcpp.binary is None:
        return {"skipped": lcpp.reason}
    try:
        t0 = time.perf_counter()
        gguf = lcpp.gguf(ckpt, work, args.dtype)
        res = llamacpp.measure(lcpp.binary, gguf, args.threads, prompt, args.decode, args.reps, lcpp.log)
    except Exception as e:  # as in LlamaCpp: a reason for the report, never the end of the bench
        return {"skipped": str(e) if isinstance(e, llamacpp.Unavailable) else repr(e)}
    print(f"[{name}] prompt {prompt}: llama.cpp {res['prefill_tok_s']:.1f}/{res['decode_tok_s']:.2f} tok/s "
          f"({time.perf_counter() - t0:.0f} s, load {loadavg()})", file=sys.stderr, flush=True)
    return {"gguf": str(gguf), "prefill": stats(res["prefill_samples"]), "decode": stats(res["decode_samples"]),
            "prefill_flash_attn": res["prefill_flash_attn"], "decode_flash_attn": res["decode_flash_attn"],
            "build_commit": res["build_commit"], "tests": res["tests"]}


def add_ratios(pr: dict[str, Any]) -> None:
    """ours/eager and ours/llama.cpp per phase (medians), and each side's decode as a fraction of the roofline."""
    ours = pr["ours"]
    for other in ("eager", "llamacpp"):
        if "skipped" in pr[other]:
            continue
        for ph in ("prefill", "decode"):
            pr[f"{ph}_ours_over_{other}"] = ours[ph]["median"] / pr[other][ph]["median"]
    for side in ("ours", "eager", "llamacpp"):
        if "skipped" not in pr[side]:
            pr[f"{side}_decode_roofline_fraction"] = pr[side]["decode"]["median"] / pr["roofline_decode_tok_s"]


# -- the whole run ----------------------------------------------------------------------------------


def bench(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    info = cpu_info()
    out: dict[str, Any] = {
        "bench": "speed", "schema_version": 2, "dtype": args.dtype, "threads": args.threads, "reps": args.reps,
        "prompts": args.prompts, "decode_steps": args.decode, "context": args.context, "prefill_chunk": args.chunk,
        **info, "edgedeploy_source": source_key(), "schedules_sha256": schedules_sha(),
        "loadavg_before": loadavg(), "work": str(work),
    }
    share = CpuShare()
    out["read_bandwidth"] = measure_read_bandwidth(args.threads, max(4 * info["l3_bytes"], args.probe_mib * MIB))
    lcpp = LlamaCpp(work, not args.skip_llamacpp)
    out["llamacpp"] = {"binary": str(lcpp.binary) if lcpp.binary else None, "skipped": lcpp.reason,
                       "version": f"llama-cpp-python {llamacpp.VERSION} sdist (vendored llama.cpp)"}
    out["models"] = [bench_model(name, args, work, info["l3_bytes"], lcpp) for name in args.sizes]
    out["loadavg_after"] = loadavg()
    out["cpu_share"] = share.stop()
    out["total_s"] = round(time.perf_counter() - t0, 1)
    return out


# -- output -----------------------------------------------------------------------------------------


def _fmt(s: dict[str, Any] | None, digits: int = 1) -> str:
    if not s or "median" not in s:
        return "-"
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"


def _ratio(pr: dict[str, Any], key: str) -> str:
    return f"{pr[key]:.2f}" if key in pr else "-"


def _pct(pr: dict[str, Any], key: str) -> str:
    return f"{100 * pr[key]:.0f}%" if key in pr else "-"


def print_table(r: dict[str, Any]) -> None:
    isa = " ".join(f if on else f"no-{f}" for f, on in r["isa"].items())
    bw = r["read_bandwidth"]
    print(f"CPU: {r['cpu_model']} (LLVM mcpu {r.get('llvm_mcpu', 'unknown')}), {r['cpus']} CPUs, "
          f"L3 {r['l3_bytes'] / MIB:.0f} MiB; {isa}")
    print(f"{r['dtype']}, {r['threads']} threads, decode {r['decode_steps']} steps, context {r['context']}, "
          f"prefill chunk {r['prefill_chunk']}, {r['reps']} interleaved reps, medians [min-max]; "
          f"edgedeploy {r['edgedeploy_source']} (schedules.py {r['schedules_sha256']})")
    kernels = ", ".join(f"{k} {v}" for k, v in bw["kernels"].items())
    print(f"DRAM read bandwidth at the start ({bw['bytes'] / MIB:.0f} MiB array, {r['threads']} threads, "
          f"{bw['kernel']}): {bw['median'] / 1e9:.1f} GB/s [{bw['min'] / 1e9:.1f}-{bw['max'] / 1e9:.1f}] "
          f"(medians: {kernels} GB/s); each model's roofline uses the highest of its own probes")
    print(f"load average {r['loadavg_before']} -> {r['loadavg_after']}; other processes used "
          f"{r['cpu_share']['others_pct']}% of the CPUs (steal {r['cpu_share']['steal_pct']}%); "
          f"total {r['total_s'] / 60:.1f} min")
    if r["llamacpp"]["skipped"]:
        print(f"llama.cpp: {r['llamacpp']['skipped']}")
    print()
    print("| model | prompt | phase | ours | eager | llama.cpp | ours/eager | ours/llama.cpp | ÷ DRAM roofline "
          "(ours / eager / llama.cpp) |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---|")
    for m in r["models"]:
        label = f"{m['model']} ({m['params'] / 1e6:,.0f}M{', cache-resident' if m['cache_resident'] else ''})"
        for p, pr in m["prompts"].items():
            lc = pr["llamacpp"]
            for ph in ("prefill", "decode"):
                digits = 1 if ph == "prefill" else 2
                lc_cell = "skipped" if "skipped" in lc else f"{_fmt(lc[ph], digits)} fa {lc[f'{ph}_flash_attn']}"
                roof = "" if ph == "prefill" else (
                    f"{_pct(pr, 'ours_decode_roofline_fraction')} / {_pct(pr, 'eager_decode_roofline_fraction')} / "
                    f"{_pct(pr, 'llamacpp_decode_roofline_fraction')} of {pr['roofline_decode_tok_s']:.1f}")
                print(f"| {label} | {p} | {ph} tok/s | {_fmt(pr['ours'][ph], digits)} "
                      f"| {_fmt(pr['eager'][ph], digits)} | {lc_cell} | {_ratio(pr, f'{ph}_ours_over_eager')} "
                      f"| {_ratio(pr, f'{ph}_ours_over_llamacpp')} "
                      f"| {roof} |")
    print()
    print("| model | weights MiB | peak RSS MiB (all runs) | estimate MiB (host) | RSS ÷ estimate | KV touched | "
          "build s | load avg | others' CPU | DRAM GB/s (probes) | model s |")
    print("|---|---:|---:|---:|---:|---|---:|---|---:|---|---:|")
    for m in r["models"]:
        build = "cached" if m["build_s"] is None else f"{m['build_s']:.0f}"
        print(f"| {m['model']} | {m['weights_bytes'] / MIB:,.0f} | {m['peak_rss_bytes'] / MIB:,.0f} | "
              f"{m['estimate_peak_bytes'] / MIB:,.0f} | {m['rss_vs_estimate']:.3f} | "
              f"{'whole window' if m['kv_touched'] else 'prompt only'} | {build} | "
              f"{m['loadavg_before']} -> {m['loadavg_after']} | {m['cpu_share']['others_pct']}% | "
              f"{_fmt({k: v / 1e9 for k, v in m['read_bandwidth'].items() if k != 'samples'})} | {m['total_s']:.0f} |")
    notes = []
    for m in r["models"]:
        for p, pr in m["prompts"].items():
            if pr["ours_decode_steps"] != [r["decode_steps"]]:
                notes.append(f"{m['model']} prompt {p}: our runner stopped at a stop token after "
                             f"{pr['ours_decode_steps']} decode steps (rates are per step)")
            if "skipped" in pr["llamacpp"] and pr["llamacpp"]["skipped"] != r["llamacpp"]["skipped"]:
                notes.append(f"{m['model']} prompt {p}: llama.cpp {pr['llamacpp']['skipped']}")
    busy = [m["model"] for m in r["models"] if m["cpu_share"]["others_pct"] + m["cpu_share"]["steal_pct"] > 5]
    if busy:
        notes.append(f"other processes took over 5% of the CPUs during {', '.join(busy)}: "
                     "figures are lower than on a quiet machine; compare only within this run")
    for n in notes:
        print(f"note: {n}")


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    default_work = llamacpp.cache_root() / "bench"
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="134m,1.1b,phi-2", help=f"models, comma-separated: {', '.join(models.MODELS)}")
    p.add_argument("--prompts", type=_int_list, default=[512], help="prompt lengths in tokens, e.g. 512,2000")
    p.add_argument("--decode", type=int, default=16, help="decode steps after each prompt")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=3, help="measured repetitions per side (after one warm-up)")
    p.add_argument("--context", type=int, default=2048, help="context window of the bundles (and the estimate)")
    p.add_argument("--chunk", type=int, default=512, help="prefill chunk of the bundles")
    p.add_argument("--dtype", choices=tuple(DTYPE_BYTES), default="float16")
    p.add_argument("--work", default=str(default_work), help=f"checkpoints, bundles, GGUFs (default {default_work})")
    p.add_argument("--skip-llamacpp", action="store_true", help="leave out the llama.cpp column")
    p.add_argument("--no-touch-kv", action="store_true", help="our warm-up run does not write the whole KV cache "
                   "(saves a full-window prefill; the peak RSS then covers only the longest prompt's KV)")
    p.add_argument("--probe-mib", type=int, default=1024, help="size of the bandwidth probe's array (at least 4x L3)")
    p.add_argument("--json", action="store_true", help="also print one JSON line with every figure")
    args = p.parse_args(argv)
    args.sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in args.sizes if s not in models.MODELS]
    if unknown:
        p.error(f"unknown --sizes {', '.join(unknown)} (choose from {', '.join(models.MODELS)})")
    if not args.prompts or min(args.prompts) < 1 or args.reps < 1 or args.decode < 1 or args.threads < 1:
        p.error("--prompts, --reps, --decode and --threads must be positive")
    if max(args.prompts) + args.decode + 1 > args.context:
        p.error(f"--context {args.context} is shorter than the longest prompt + decode steps")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    r = bench(args)
    print_table(r)
    if args.json:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
