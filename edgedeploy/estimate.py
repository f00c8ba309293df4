"""Predict peak memory and speed of a model on a device profile, before anything is built.

Peak = weights + KV cache for the whole context window (allocated up front by our runtime) + the
largest temporary buffer of one prefill chunk + the runtime's own base. Speed is a roofline:
decode streams every weight once per token, so it is bandwidth bound; prefill is compute bound.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from edgedeploy.checkpoint.config import SIZE_LIMITS, ModelConfig
from edgedeploy.devices.profiles import DeviceProfile
from edgedeploy.errors import InputError
from edgedeploy.models import parameter_count

MB = 2**20
DTYPE_BYTES = {"float16": 2, "float32": 4}
#: Default context window when none is asked for: long enough for the challenge's long-context tasks,
#: short enough that a 128k-context config does not turn every estimate into a KV-cache estimate.
DEFAULT_CONTEXT = 4096


@dataclass(frozen=True)
class Estimate:
    """Predicted memory (bytes) and speed of one model on one profile."""

    profile: str
    dtype: str
    context_window: int
    prefill_chunk: int
    parameters: int
    weights_bytes: int
    kv_cache_bytes: int
    temp_bytes: int
    temp_largest: str
    runtime_base_bytes: int
    peak_bytes: int
    budget_bytes: int
    hard_limit_bytes: int
    decode_tok_s: float
    prefill_tok_s: float
    #: Where the runtime base and the budget come from: a calibration (``edgedeploy calibrate``) or the
    #: profile's planning figures.
    base_source: str = "profile"
    budget_source: str = "profile"
    #: Part of ``kv_cache_bytes`` that pads pruned layers to the most KV heads any layer has (0 when uniform).
    kv_padding_bytes: int = 0

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.budget_bytes

    @property
    def headroom_bytes(self) -> int:
        return self.budget_bytes - self.peak_bytes

    @property
    def headroom_pct(self) -> float:
        return 100.0 * self.headroom_bytes / self.budget_bytes

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(fits=self.fits, verdict="FITS" if self.fits else "DOES NOT FIT",
                 headroom_bytes=self.headroom_bytes, headroom_pct=round(self.headroom_pct, 2))
        return d


def temporary_buffers(cfg: ModelConfig, dtype: str, chunk: int, context: int) -> dict[str, int]:
    """Bytes of the large per-chunk intermediates a prefill step holds at once, as our runtime lays them out.

    The GEMMs read FP32 activations (the norm and the SiLU write them) and copy them once, padded to the
    register tile; attention keeps only per-task scratch (:mod:`edgedeploy.compile.attention` never
    materialises scores); logits are float32 for the last token only. ``context`` no longer matters:
    it is kept for callers that size other things by it.
    """
    b = DTYPE_BYTES[dtype]
    f32 = 4
    # Residual stream (model dtype) and its normed FP32 copy stay live across a layer.
    residual = chunk * cfg.hidden_size * (b + f32)
    qkv = chunk * (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim * b
    attn_out = chunk * cfg.num_heads * cfg.head_dim * (b + f32)  # output, then its FP32 copy for o_proj
    return {
        "attention": qkv + attn_out + residual,
        # gate/up output, SiLU x up in FP32, and the down projection's padded copy of it.
        "mlp activations": chunk * cfg.intermediate_size * (2 * b + 2 * f32) + residual,
        "logits": cfg.vocab_size * f32 + residual,
    }


def _tokens(what: str, n: object) -> int:
    """``n`` if it is a token count up to the largest context config.json may declare; InputError otherwise.

    The bound keeps the arithmetic in range: a KV cache for 10**300 tokens overflows the float roofline.
    """
    limit = SIZE_LIMITS["context_length"]
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= limit:
        raise InputError(f"{what} must be a whole number of tokens in 1..{limit:,}, got {n!r:.40}")
    return n


def estimate(cfg: ModelConfig, profile: DeviceProfile, context_window: int | None = None,
             prefill_chunk: int = 512, dtype: str = "float16", parameters: int | None = None) -> Estimate:
    """Estimate peak memory and roofline speed of ``cfg`` on ``profile``.

    ``parameters`` defaults to the count config.json implies; pass the checkpoint's own count when
    weights are present. ``context_window`` defaults to the model's context length, capped at
    :data:`DEFAULT_CONTEXT`.
    """
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_BYTES)}")
    params = parameters if parameters is not None else parameter_count(cfg)
    if params <= 0:
        raise InputError("the model has no parameters (every tensor is empty); there is nothing to estimate")
    context = _tokens("context window", context_window or min(cfg.usable_context, DEFAULT_CONTEXT))
    chunk = min(_tokens("prefill chunk", prefill_chunk), context)
    weights = params * DTYPE_BYTES[dtype]
    kv = cfg.kv_bytes_per_token * context * DTYPE_BYTES[dtype] // 2
    temps = temporary_buffers(cfg, dtype, chunk, context)
    largest = max(temps, key=lambda k: temps[k])
    base_source, budget_source = _sources(profile)
    base = int((profile.calibration or {}).get("runtime_base_mb", profile.runtime_base_mb) * MB)
    peak = weights + kv + temps[largest] + base
    # A decode step reads every weight plus, on average over a full window, half the KV cache.
    bytes_per_token = weights + kv / 2
    decode = profile.bandwidth_efficiency * profile.memory_bandwidth_gbps * 1e9 / bytes_per_token
    prefill = profile.compute_gflops * 1e9 / (2 * params)
    return Estimate(
        profile=profile.name, dtype=dtype, context_window=context, prefill_chunk=chunk, parameters=params,
        weights_bytes=weights, kv_cache_bytes=kv, temp_bytes=temps[largest], temp_largest=largest,
        runtime_base_bytes=base, peak_bytes=peak, budget_bytes=int(profile.budget_mb * MB),
        hard_limit_bytes=int(profile.hard_limit_mb * MB), decode_tok_s=decode, prefill_tok_s=prefill,
        base_source=base_source, budget_source=budget_source,
        kv_padding_bytes=cfg.kv_padding_bytes_per_token * context * DTYPE_BYTES[dtype] // 2,
    )


def _sources(profile: DeviceProfile) -> tuple[str, str]:
    """Where ``profile``'s runtime base and budget come from, in words."""
    cal = profile.calibration
    if cal is None:
        what = "measured on this host" if profile.kind == "host" else "planning figure, not calibrated"
        return f"profile {profile.name} ({what})", f"profile {profile.name} ({what})"
    when = f"calibrated {str(cal['date'])[:10]}"
    base = (f"{when}: our runner's RSS on a tiny bundle" if "runtime_base_mb" in cal
            else f"profile {profile.name} (runtime base not calibrated)")
    return base, f"{when}: low-memory-killer ceiling {cal['ceiling_mb']:,.0f} MiB"
