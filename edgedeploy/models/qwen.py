"""Qwen v1 (``QWenLMHeadModel``): the Llama graph with MHA, fused-qkv bias and no o_proj bias.

Only the checkpoint names differ, so this module is a weight map onto :mod:`edgedeploy.models.llama`.
"""

from __future__ import annotations

from edgedeploy.checkpoint.config import ModelConfig
from edgedeploy.models._common import WeightSource, fused, single
from edgedeploy.models.llama import LlamaForCausalLM

QWenForCausalLM = LlamaForCausalLM


def weight_map(cfg: ModelConfig) -> dict[str, WeightSource]:
    """Model parameter name (Llama graph) -> Qwen v1 checkpoint tensors."""
    m: dict[str, WeightSource] = {"model.embed_tokens.weight": single("transformer.wte.weight")}
    for i in range(cfg.num_layers):
        p, s = f"model.layers.{i}", f"transformer.h.{i}"
        m[f"{p}.input_layernorm.weight"] = single(f"{s}.ln_1.weight")
        m[f"{p}.post_attention_layernorm.weight"] = single(f"{s}.ln_2.weight")
        # c_attn already stores q|k|v stacked along the output dim, the order the cache expects.
        m[f"{p}.self_attn.qkv_proj.weight"] = single(f"{s}.attn.c_attn.weight")
        m[f"{p}.self_attn.qkv_proj.bias"] = single(f"{s}.attn.c_attn.bias")
        m[f"{p}.self_attn.o_proj.weight"] = single(f"{s}.attn.c_proj.weight")
        # Qwen v1 computes c_proj(w1(x) * silu(w2(x))): w2 is the gate, w1 the up projection.
        m[f"{p}.mlp.gate_up_proj.weight"] = fused(f"{s}.mlp.w2.weight", f"{s}.mlp.w1.weight")
        m[f"{p}.mlp.down_proj.weight"] = single(f"{s}.mlp.c_proj.weight")
    m["model.norm.weight"] = single("transformer.ln_f.weight")
    if not cfg.tie_word_embeddings:
        m["lm_head.weight"] = single("lm_head.weight")
    return m
