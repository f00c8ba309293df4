"""Llama-style decoder (Llama, Qwen2, and Qwen v1 through its own weight map) in ``tvm.relax.frontend.nn``.

q/k/v are one fused projection and gate/up another, so a decode step runs three GEMVs per layer
instead of five; the weight map tells the tensor-cache writer how to fuse the checkpoint tensors.
"""

from __future__ import annotations

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache
from tvm.target import Target

from edgedeploy.checkpoint.config import ModelConfig
from edgedeploy.errors import InputError
from edgedeploy.models._common import CausalLMBase, Linear, WeightSource, fused, single


def _act(name: str, x: nn.Tensor) -> nn.Tensor:
    if name == "silu":
        return nn.op.silu(x)
    if name in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
        return nn.op.gelu(x, approximate=None if name == "gelu" else "tanh")
    raise InputError(f"activation {name!r} is not supported")


class RMSNorm(nn.Module):
    """RMSNorm without bias (``nn.RMSNorm`` defaults to a bias that Llama does not have)."""

    def __init__(self, size: int, eps: float, dtype: str):
        self.weight = nn.Parameter((size,), dtype)
        self.eps = eps

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        return nn.op.rms_norm(x, self.weight, axes=[-1], epsilon=self.eps)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, dtype: str):
        self.cfg, self.layer_id = cfg, layer_id
        qkv_out = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, qkv_out, bias=cfg.qkv_bias, dtype=dtype)
        self.o_proj = Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.o_bias, dtype=dtype)

    def forward(self, x: nn.Tensor, cache: PagedKVCache) -> nn.Tensor:
        c = self.cfg
        b, s, _ = x.shape
        qkv = self.qkv_proj(x).reshape(b, s, c.num_heads + 2 * c.num_kv_heads, c.head_dim)
        out = cache.attention_with_fused_qkv(self.layer_id, qkv, c.num_heads, sm_scale=c.head_dim**-0.5)
        return self.o_proj(out.reshape(b, s, c.num_heads * c.head_dim))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: str):
        self.cfg = cfg
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias, dtype=dtype)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias, dtype=dtype)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        gate, up = nn.op.split(self.gate_up_proj(x), 2, axis=-1)
        return self.down_proj(_act(self.cfg.hidden_act, gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, dtype: str):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps, dtype)
        self.self_attn = LlamaAttention(cfg, layer_id, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps, dtype)
        self.mlp = LlamaMLP(cfg, dtype)

    def forward(self, x: nn.Tensor, cache: PagedKVCache) -> nn.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: str):
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList([LlamaDecoderLayer(cfg, i, dtype) for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, dtype)


class LlamaForCausalLM(CausalLMBase):
    """Llama/Qwen2 graph; parameter names follow the Hugging Face names except the fused projections."""

    def __init__(self, cfg: ModelConfig, dtype: str, target: Target):
        if cfg.norm != "rms":
            raise InputError(f"{cfg.architecture}: the Llama graph needs RMSNorm, config says {cfg.norm!r}")
        self._setup(cfg, dtype, target, LlamaModel)


def weight_map(cfg: ModelConfig) -> dict[str, WeightSource]:
    """Model parameter name -> checkpoint tensors (Hugging Face Llama/Qwen2 naming)."""
    m: dict[str, WeightSource] = {"model.embed_tokens.weight": single("model.embed_tokens.weight")}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}"
        m[f"{p}.input_layernorm.weight"] = single(f"{p}.input_layernorm.weight")
        m[f"{p}.post_attention_layernorm.weight"] = single(f"{p}.post_attention_layernorm.weight")
        m[f"{p}.self_attn.qkv_proj.weight"] = fused(*(f"{p}.self_attn.{x}_proj.weight" for x in "qkv"))
        if cfg.qkv_bias:
            m[f"{p}.self_attn.qkv_proj.bias"] = fused(*(f"{p}.self_attn.{x}_proj.bias" for x in "qkv"))
        m[f"{p}.self_attn.o_proj.weight"] = single(f"{p}.self_attn.o_proj.weight")
        if cfg.o_bias:
            m[f"{p}.self_attn.o_proj.bias"] = single(f"{p}.self_attn.o_proj.bias")
        m[f"{p}.mlp.gate_up_proj.weight"] = fused(f"{p}.mlp.gate_proj.weight", f"{p}.mlp.up_proj.weight")
        m[f"{p}.mlp.down_proj.weight"] = single(f"{p}.mlp.down_proj.weight")
        if cfg.mlp_bias:
            m[f"{p}.mlp.gate_up_proj.bias"] = fused(f"{p}.mlp.gate_proj.bias", f"{p}.mlp.up_proj.bias")
            m[f"{p}.mlp.down_proj.bias"] = single(f"{p}.mlp.down_proj.bias")
    m["model.norm.weight"] = single("model.norm.weight")
    if not cfg.tie_word_embeddings:
        m["lm_head.weight"] = single("lm_head.weight")
        if cfg.lm_head_bias:
            m["lm_head.bias"] = single("lm_head.bias")
    return m
