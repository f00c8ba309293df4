"""Pieces every family shares: the paged KV cache, the export spec, last-token selection, weight maps.

The models are written in ``tvm.relax.frontend.nn`` and export the same four functions as MLC-LLM
(``embed``, ``prefill``, ``decode``, ``create_paged_kv_cache``) so the runtime drives every family
the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tvm import relax as rx
from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode, TIRPagedKVCache
from tvm.target import Target

from edgedeploy.checkpoint.config import ModelConfig
from edgedeploy.errors import InputError

#: One model parameter: the checkpoint tensors it is made of and how to combine them (None: the single one as is).
Combine = Callable[[Sequence[np.ndarray]], np.ndarray]


@dataclass(frozen=True)
class WeightSource:
    """Where a model parameter comes from in the checkpoint."""

    tensors: tuple[str, ...]
    combine: Combine | None = None

    def build(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        """Combine the checkpoint arrays (in ``tensors`` order) into the parameter's array."""
        if self.combine is None:
            if len(arrays) != 1:
                raise ValueError(f"{self.tensors}: expected one tensor, got {len(arrays)}")
            return arrays[0]
        return self.combine(arrays)


def concat_rows(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """Fuse projections that share an input (q|k|v, gate|up) along the output dimension."""
    return np.concatenate(list(arrays), axis=0)


def single(name: str) -> WeightSource:
    return WeightSource((name,))


def fused(*names: str) -> WeightSource:
    return WeightSource(tuple(names), concat_rows)


def rope_scaling_for_cache(cfg: ModelConfig) -> tuple[dict[str, Any], float]:
    """(rope_scaling dict for TVM's kernels, position scale) or InputError for a scaling TVM lacks."""
    scaling = dict(cfg.rope_scaling or {})
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return {}, 1.0
    if kind == "linear":
        # TVM multiplies positions by rope_scale; linear scaling divides them by the factor.
        return {}, 1.0 / float(scaling["factor"])
    if kind == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        return {"rope_type": "llama3", **{k: scaling[k] for k in keys}}, 1.0
    raise InputError(f"RoPE scaling {kind!r} is not supported (supported: default, linear, llama3)")


def create_tir_paged_kv_cache(cfg: ModelConfig, dtype: str, target: Target, max_batch_size: tirx.Var,
                              max_total_seq_len: tirx.Var, prefill_chunk_size: tirx.Var, page_size: tirx.Var,
                              support_sliding_window: tirx.Var) -> PagedKVCache:
    """A TIR paged KV cache that applies RoPE (rotate-half, first ``rotary_dim`` dims) to k on append."""
    scaling, scale = rope_scaling_for_cache(cfg)
    return TIRPagedKVCache(
        attn_kind="mha",
        max_batch_size=max_batch_size,
        max_total_seq_len=max_total_seq_len,
        prefill_chunk_size=prefill_chunk_size,
        page_size=page_size,
        support_sliding_window=support_sliding_window,
        layer_partition=rx.ShapeExpr([0, cfg.num_layers]),
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        qk_head_dim=cfg.head_dim,
        v_head_dim=cfg.head_dim,
        mla_original_qk_head_dim=0,
        mla_original_v_head_dim=0,
        rope_mode=RopeMode.NORMAL,
        rope_scale=scale,
        rope_theta=cfg.rope_theta,
        rope_scaling=scaling,
        rope_ext_factors=rx.prim_value(0),
        rotary_dim=cfg.rotary_dim,
        enable_disaggregation=False,
        dtype=dtype,
        target=target,
    )


class Linear(nn.Module):
    """``y = x W^T + b`` with FP32 accumulation whatever the weight dtype.

    ``nn.Linear`` in FP16 accumulates in FP16: on x86 that is a convert round trip per multiply-add
    (measured ~4x slower GEMV than FP32 accumulation) and loses precision over long reductions. The
    result is cast back to ``out_dtype`` (default: the weight dtype), a cast that fuses into the matmul.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: str, out_dtype: str | None = None):
        self.weight = nn.Parameter((out_features, in_features), dtype)
        self.bias = nn.Parameter((out_features,), dtype) if bias else None
        self.dtype, self.out_dtype = dtype, out_dtype or dtype

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        return project(x, self.weight, self.bias, self.out_dtype)


def project(x: nn.Tensor, weight: nn.Tensor, bias: nn.Tensor | None, out_dtype: str) -> nn.Tensor:
    """``x weight^T (+ bias)`` accumulated in FP32, returned in ``out_dtype``; ``weight`` is ``[out, in]``."""
    y = nn.op.matmul(x, nn.op.permute_dims(weight), out_dtype="float32")
    if bias is not None:
        y = y + (bias.astype("float32") if bias.dtype != "float32" else bias)
    return y.astype(out_dtype) if out_dtype != "float32" else y


def last_token(hidden: nn.Tensor) -> nn.Tensor:
    """hidden[:, -1:, :] — only the last position's logits are needed, so the head runs on one row."""
    def _compute(x: te.Tensor) -> te.Tensor:
        b, s, h = x.shape
        return te.compute((b, 1, h), lambda i, _j, k: x[i, s - 1, k], name="last_token")

    return nn.op.tensor_expr_op(_compute, "take_last_token", [hidden])


def export_spec(cfg: ModelConfig) -> dict[str, Any]:
    """Function signatures that ``nn.Module.export_tvm`` turns into the library's entry points."""
    packed = {"param_mode": "packed", "effect_mode": "none"}
    cache = nn.spec.Object(object_type=PagedKVCache)
    return {
        "embed": {"input_ids": nn.spec.Tensor(["seq_len"], "int32"), "$": packed},
        "prefill": {"input_ids": nn.spec.Tensor([1, "seq_len"], "int32"), "paged_kv_cache": cache, "$": packed},
        "decode": {"input_ids": nn.spec.Tensor([1, 1], "int32"), "paged_kv_cache": cache, "$": packed},
        "create_paged_kv_cache": {
            "max_batch_size": int,
            "max_total_seq_len": int,
            "prefill_chunk_size": int,
            "page_size": int,
            "support_sliding_window": int,
            "$": {"param_mode": "none", "effect_mode": "none"},
        },
    }


class CausalLMBase(nn.Module):
    """Entry points shared by the families.

    A subclass calls :meth:`_setup` with its backbone class, whose instance (``self.model``) holds
    ``embed_tokens``, ``layers`` and a final norm named by :attr:`final_norm` (the checkpoint's name).
    """

    cfg: ModelConfig
    dtype: str
    target: Target
    final_norm = "norm"

    def _setup(self, cfg: ModelConfig, dtype: str, target: Target, backbone: type) -> None:
        self.cfg, self.dtype, self.target = cfg, check_dtype(dtype), target
        self.model = backbone(cfg, dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=cfg.lm_head_bias, dtype=dtype,
                                  out_dtype="float32")

    def embed(self, input_ids: nn.Tensor) -> nn.Tensor:
        return self.model.embed_tokens(input_ids)

    def body(self, hidden: nn.Tensor, paged_kv_cache: PagedKVCache) -> nn.Tensor:
        for layer in self.model.layers:
            hidden = layer(hidden, paged_kv_cache)
        return getattr(self.model, self.final_norm)(hidden)

    def head(self, hidden: nn.Tensor) -> nn.Tensor:
        if self.cfg.tie_word_embeddings:
            return project(hidden, self.model.embed_tokens.weight, None, "float32")
        return self.lm_head(hidden)

    def _forward(self, input_ids: nn.Tensor, paged_kv_cache: PagedKVCache) -> nn.Tensor:
        b, s = input_ids.shape
        hidden = self.embed(input_ids.reshape(b * s)).reshape(b, s, self.cfg.hidden_size)
        hidden = self.body(hidden, paged_kv_cache)
        logits = self.head(last_token(hidden))
        return logits.astype("float32") if logits.dtype != "float32" else logits

    def prefill(self, input_ids: nn.Tensor, paged_kv_cache: PagedKVCache) -> tuple[nn.Tensor, PagedKVCache]:
        return self._forward(input_ids, paged_kv_cache), paged_kv_cache

    def decode(self, input_ids: nn.Tensor, paged_kv_cache: PagedKVCache) -> tuple[nn.Tensor, PagedKVCache]:
        return self._forward(input_ids, paged_kv_cache), paged_kv_cache

    def create_paged_kv_cache(self, max_batch_size: tirx.Var, max_total_seq_len: tirx.Var,
                              prefill_chunk_size: tirx.Var, page_size: tirx.Var,
                              support_sliding_window: tirx.Var) -> PagedKVCache:
        return create_tir_paged_kv_cache(self.cfg, self.dtype, self.target, max_batch_size, max_total_seq_len,
                                         prefill_chunk_size, page_size, support_sliding_window)

    def get_default_spec(self) -> dict[str, Any]:
        return export_spec(self.cfg)


def check_dtype(dtype: str) -> str:
    if dtype not in ("float16", "float32"):
        raise InputError(f"dtype {dtype!r} is not supported (choose float16 or float32)")
    return dtype
