"""Phi-1/1.5/2 decoder in ``tvm.relax.frontend.nn``.

Attention and MLP read the same LayerNorm output and are added to the residual together (parallel
block); RoPE covers only the first ``rotary_dim`` dims of each head, which the paged KV cache's
rotary kernel supports directly.
"""

from __future__ import annotations

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache
from tvm.target import Target

from edgedeploy.checkpoint.config import ModelConfig
from edgedeploy.errors import InputError
from edgedeploy.models._common import CausalLMBase, Linear, WeightSource, fused, single
from edgedeploy.models.llama import _act


class PhiAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, dtype: str):
        self.cfg, self.layer_id = cfg, layer_id
        qkv_out = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, qkv_out, bias=cfg.qkv_bias, dtype=dtype)
        self.dense = Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.o_bias, dtype=dtype)

    def forward(self, x: nn.Tensor, cache: PagedKVCache) -> nn.Tensor:
        c = self.cfg
        b, s, _ = x.shape
        qkv = self.qkv_proj(x).reshape(b, s, c.num_heads + 2 * c.num_kv_heads, c.head_dim)
        out = cache.attention_with_fused_qkv(self.layer_id, qkv, c.num_heads, sm_scale=c.head_dim**-0.5)
        return self.dense(out.reshape(b, s, c.num_heads * c.head_dim))


class PhiMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: str):
        self.act = cfg.hidden_act
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias, dtype=dtype)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias, dtype=dtype)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        return self.fc2(_act(self.act, self.fc1(x)))


class PhiDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, dtype: str):
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, dtype=dtype)
        self.self_attn = PhiAttention(cfg, layer_id, dtype)
        self.mlp = PhiMLP(cfg, dtype)

    def forward(self, x: nn.Tensor, cache: PagedKVCache) -> nn.Tensor:
        h = self.input_layernorm(x)
        return self.self_attn(h, cache) + self.mlp(h) + x


class PhiModel(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: str):
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList([PhiDecoderLayer(cfg, i, dtype) for i in range(cfg.num_layers)])
        self.final_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, dtype=dtype)


class PhiForCausalLM(CausalLMBase):
    """Phi graph; parameter names follow Hugging Face's ``PhiForCausalLM`` except the fused qkv."""

    final_norm = "final_layernorm"

    def __init__(self, cfg: ModelConfig, dtype: str, target: Target):
        if cfg.norm != "layer":
            raise InputError(f"{cfg.architecture}: the Phi graph needs LayerNorm, config says {cfg.norm!r}")
        self._setup(cfg, dtype, target, PhiModel)


def weight_map(cfg: ModelConfig) -> dict[str, WeightSource]:
    """Model parameter name -> checkpoint tensors (Hugging Face Phi naming)."""
    m: dict[str, WeightSource] = {"model.embed_tokens.weight": single("model.embed_tokens.weight")}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}"
        for kind in ("weight", "bias"):
            m[f"{p}.input_layernorm.{kind}"] = single(f"{p}.input_layernorm.{kind}")
        m[f"{p}.self_attn.qkv_proj.weight"] = fused(*(f"{p}.self_attn.{x}_proj.weight" for x in "qkv"))
        if cfg.qkv_bias:
            m[f"{p}.self_attn.qkv_proj.bias"] = fused(*(f"{p}.self_attn.{x}_proj.bias" for x in "qkv"))
        m[f"{p}.self_attn.dense.weight"] = single(f"{p}.self_attn.dense.weight")
        if cfg.o_bias:
            m[f"{p}.self_attn.dense.bias"] = single(f"{p}.self_attn.dense.bias")
        for fc in ("fc1", "fc2"):
            m[f"{p}.mlp.{fc}.weight"] = single(f"{p}.mlp.{fc}.weight")
            if cfg.mlp_bias:
                m[f"{p}.mlp.{fc}.bias"] = single(f"{p}.mlp.{fc}.bias")
    for kind in ("weight", "bias"):
        m[f"model.final_layernorm.{kind}"] = single(f"model.final_layernorm.{kind}")
    if not cfg.tie_word_embeddings:
        m["lm_head.weight"] = single("lm_head.weight")
        if cfg.lm_head_bias:
            m["lm_head.bias"] = single("lm_head.bias")
    return m
