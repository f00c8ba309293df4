"""Graph pieces every family shares: norms, activations, attention, MLPs, the paged KV cache, entry points.

The models are written in ``tvm.relax.frontend.nn`` and export the same four functions as MLC-LLM
(``embed``, ``prefill``, ``decode``, ``create_paged_kv_cache``) so the runtime drives every family
the same way. A family's ``graph`` module composes these; only what is its own lives there.
"""

from __future__ import annotations

from typing import Any

from tvm import relax as rx
from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode, TIRPagedKVCache
from tvm.target import Target

from edgedeploy.checkpoint.config import ModelConfig
from edgedeploy.errors import InputError


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


def activation(name: str, x: nn.Tensor) -> nn.Tensor:
    """The MLP nonlinearity config.json names (``hidden_act``)."""
    if name == "silu":
        return nn.op.silu(x)
    if name in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
        return nn.op.gelu(x, approximate=None if name == "gelu" else "tanh")
    raise InputError(f"activation {name!r} is not supported")


class RMSNorm(nn.Module):
    """RMSNorm without bias (``nn.RMSNorm`` defaults to a bias that Llama does not have).

    ``offset`` 1.0 gives Gemma's ``x * (1 + w)``, computed in FP32 as transformers does.
    """

    def __init__(self, size: int, eps: float, dtype: str, offset: float = 0.0):
        self.weight = nn.Parameter((size,), dtype)
        self.eps, self.offset = eps, offset

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        if not self.offset:
            return nn.op.rms_norm(x, self.weight, axes=[-1], epsilon=self.eps)
        w = self.weight.astype("float32") + self.offset
        return nn.op.rms_norm(x.astype("float32"), w, axes=[-1], epsilon=self.eps).astype(x.dtype)


def make_norm(cfg: ModelConfig, dtype: str, offset: float = 0.0) -> nn.Module:
    """The family's normalisation layer: RMSNorm, or LayerNorm with bias (Phi)."""
    if cfg.norm == "layer":
        return nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, dtype=dtype)
    return RMSNorm(cfg.hidden_size, cfg.norm_eps, dtype, offset)


class Attention(nn.Module):
    """Self-attention with one fused q|k|v projection over the paged KV cache.

    A pruned layer with fewer heads than the cache holds (``cfg.num_heads``/``num_kv_heads``, the
    envelope of all layers) is padded with empty heads around the attention call: a padded query head
    gets zero q and its output meets zero columns of the output projection, so it adds nothing; the
    padding costs KV-cache memory (shown by ``estimate``), not weights. ``out_name`` is the output
    projection's checkpoint name (``o_proj``, Phi's ``dense``).
    """

    def __init__(self, cfg: ModelConfig, layer_id: int, dtype: str, out_name: str = "o_proj"):
        self.cfg, self.layer_id, self.out_name = cfg, layer_id, out_name
        sizes = cfg.layer(layer_id)
        self.nq, self.nkv = sizes.num_heads, sizes.num_kv_heads
        hd = cfg.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, (self.nq + 2 * self.nkv) * hd, bias=cfg.qkv_bias, dtype=dtype)
        setattr(self, out_name, Linear(self.nq * hd, cfg.hidden_size, bias=cfg.o_bias, dtype=dtype))
        if cfg.qk_norm:
            self.q_layernorm = nn.LayerNorm(hd, eps=cfg.norm_eps, dtype=dtype)
            self.k_layernorm = nn.LayerNorm(hd, eps=cfg.norm_eps, dtype=dtype)

    def forward(self, x: nn.Tensor, cache: PagedKVCache) -> nn.Tensor:
        c = self.cfg
        b, s, _ = x.shape
        qkv = self.qkv_proj(x).reshape(b, s, self.nq + 2 * self.nkv, c.head_dim)
        padded = (self.nq, self.nkv) != (c.num_heads, c.num_kv_heads)
        if c.qk_norm or padded:
            q, k, v = nn.op.split(qkv, [self.nq, self.nq + self.nkv], axis=2)
            if c.qk_norm:
                q, k = self.q_layernorm(q), self.k_layernorm(k)
            if padded:
                q, k, v = self._pad_heads(q, k, v)
            qkv = nn.op.concat([q, k, v], dim=2)
        out = cache.attention_with_fused_qkv(self.layer_id, qkv, c.num_heads, sm_scale=c.head_dim**-0.5)
        if padded:
            out = self._unpad_heads(out)
        return getattr(self, self.out_name)(out.reshape(b, s, self.nq * c.head_dim))

    def _pad_heads(self, q: nn.Tensor, k: nn.Tensor, v: nn.Tensor) -> tuple[nn.Tensor, nn.Tensor, nn.Tensor]:
        """This layer's heads laid out as the cache's: KV head j serves query slots j*G .. j*G+G-1."""
        c = self.cfg
        b, s, _, hd = q.shape
        group, full_group = self.nq // self.nkv, c.num_heads // c.num_kv_heads
        extra_kv = c.num_kv_heads - self.nkv
        q = q.reshape(b, s, self.nkv, group, hd)
        q = nn.op.pad(q, [0, 0, 0, 0, 0, extra_kv, 0, full_group - group, 0, 0])
        kv_pad = [0, 0, 0, 0, 0, extra_kv, 0, 0]
        return q.reshape(b, s, c.num_heads, hd), nn.op.pad(k, kv_pad), nn.op.pad(v, kv_pad)

    def _unpad_heads(self, out: nn.Tensor) -> nn.Tensor:
        """The inverse of :meth:`_pad_heads` on the attention output: this layer's query heads only."""
        c = self.cfg
        b, s = out.shape[0], out.shape[1]
        full_group = c.num_heads // c.num_kv_heads
        out = out.reshape(b, s, c.num_kv_heads, full_group, c.head_dim)
        if self.nkv < c.num_kv_heads:
            out = nn.op.split(out, [self.nkv], axis=2)[0]
        if self.nq // self.nkv < full_group:
            out = nn.op.split(out, [self.nq // self.nkv], axis=3)[0]
        return out


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))`` with gate|up fused into one projection (one GEMV instead of two)."""

    def __init__(self, cfg: ModelConfig, layer_id: int, dtype: str):
        self.act = cfg.hidden_act
        width = cfg.layer(layer_id).intermediate_size
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * width, bias=cfg.mlp_bias, dtype=dtype)
        self.down_proj = Linear(width, cfg.hidden_size, bias=cfg.mlp_bias, dtype=dtype)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        gate, up = nn.op.split(self.gate_up_proj(x), 2, axis=-1)
        return self.down_proj(activation(self.act, gate) * up)


class PlainMLP(nn.Module):
    """``fc2(act(fc1(x)))`` (Phi)."""

    def __init__(self, cfg: ModelConfig, layer_id: int, dtype: str):
        self.act = cfg.hidden_act
        width = cfg.layer(layer_id).intermediate_size
        self.fc1 = Linear(cfg.hidden_size, width, bias=cfg.mlp_bias, dtype=dtype)
        self.fc2 = Linear(width, cfg.hidden_size, bias=cfg.mlp_bias, dtype=dtype)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        return self.fc2(activation(self.act, self.fc1(x)))


class Backbone(nn.Module):
    """Embedding, decoder layers of class ``layer_cls`` and the final norm named ``final_norm``."""

    def __init__(self, cfg: ModelConfig, dtype: str, layer_cls: type, final_norm: str, norm_offset: float = 0.0):
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList([layer_cls(cfg, i, dtype) for i in range(cfg.num_layers)])
        setattr(self, final_norm, make_norm(cfg, dtype, norm_offset))


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

    A subclass calls :meth:`_setup` with its decoder layer class; ``self.model`` holds ``embed_tokens``,
    ``layers`` and a final norm named by :attr:`final_norm` (the checkpoint's name).
    """

    cfg: ModelConfig
    dtype: str
    target: Target
    final_norm = "norm"
    norm_offset = 0.0

    def _setup(self, cfg: ModelConfig, dtype: str, target: Target, layer_cls: type) -> None:
        self.cfg, self.dtype, self.target = cfg, check_dtype(dtype), target
        self.model = Backbone(cfg, dtype, layer_cls, self.final_norm, self.norm_offset)
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
