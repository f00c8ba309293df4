"""Llama-style decoder graph: pre-norm attention then pre-norm gated MLP, RMSNorm, fused q|k|v and gate|up.

Qwen2, Qwen v1 and Mistral use this graph unchanged; their packages differ only in config and names.
"""

from __future__ import annotations

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache
from tvm.target import Target

from edgedeploy.checkpoint.config import ModelConfig
from edgedeploy.errors import InputError
from edgedeploy.models.blocks import Attention, CausalLMBase, GatedMLP, make_norm


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, dtype: str, norm_offset: float = 0.0):
        self.input_layernorm = make_norm(cfg, dtype, norm_offset)
        self.self_attn = Attention(cfg, layer_id, dtype)
        self.post_attention_layernorm = make_norm(cfg, dtype, norm_offset)
        self.mlp = GatedMLP(cfg, layer_id, dtype)

    def forward(self, x: nn.Tensor, cache: PagedKVCache) -> nn.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(CausalLMBase):
    """Parameter names follow Hugging Face's ``LlamaForCausalLM`` except the fused projections."""

    def __init__(self, cfg: ModelConfig, dtype: str, target: Target):
        if cfg.norm != "rms":
            raise InputError(f"{cfg.architecture}: the Llama graph needs RMSNorm, config says {cfg.norm!r}")
        self._setup(cfg, dtype, target, LlamaDecoderLayer)
