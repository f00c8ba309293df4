"""Phi-1/1.5/2 decoder graph: one LayerNorm feeds attention and MLP, added to the residual together.

RoPE covers only the first ``rotary_dim`` dims of each head, which the paged KV cache's rotary kernel
supports directly; ``qk_layernorm`` normalises each head of q and k before it (see ``blocks.Attention``).
"""

from __future__ import annotations

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache
from tvm.target import Target

from edgedeploy.checkpoint.config import ModelConfig
from edgedeploy.errors import InputError
from edgedeploy.models.blocks import Attention, CausalLMBase, PlainMLP, make_norm


class PhiDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, dtype: str):
        self.input_layernorm = make_norm(cfg, dtype)
        self.self_attn = Attention(cfg, layer_id, dtype, out_name="dense")
        self.mlp = PlainMLP(cfg, layer_id, dtype)

    def forward(self, x: nn.Tensor, cache: PagedKVCache) -> nn.Tensor:
        h = self.input_layernorm(x)
        return self.self_attn(h, cache) + self.mlp(h) + x


class PhiForCausalLM(CausalLMBase):
    """Parameter names follow Hugging Face's ``PhiForCausalLM`` except the fused qkv."""

    final_norm = "final_layernorm"

    def __init__(self, cfg: ModelConfig, dtype: str, target: Target):
        if cfg.norm != "layer":
            raise InputError(f"{cfg.architecture}: the Phi graph needs LayerNorm, config says {cfg.norm!r}")
        self._setup(cfg, dtype, target, PhiDecoderLayer)
