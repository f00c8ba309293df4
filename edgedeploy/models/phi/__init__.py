"""Phi-1/1.5/2 (``PhiForCausalLM``): config, checkpoint tensors, tiny test config; the graph is in ``graph.py``.

Parallel attention + MLP block, LayerNorm with bias, partial rotary, GELU, biases everywhere, untied
head with bias, and optionally ``qk_layernorm`` (a LayerNorm over each head of q and k).
"""

from __future__ import annotations

from typing import Any

from edgedeploy.checkpoint.config import SIZE_LIMITS, ConfigFields, ModelConfig
from edgedeploy.models.family import GENERIC_FIELDS, IGNORED, READ, Family, Param, Params, hf_decoder_layer_sizes


def _parse(f: ConfigFields, common: dict[str, Any]) -> ModelConfig:
    lim = SIZE_LIMITS
    hidden, heads = common["hidden_size"], common["num_heads"]
    kv_heads = f.kv_heads(heads)
    head_dim = f.head_dim(None, hidden, heads)  # transformers' Phi has no head_dim field
    factor, name = f.number("partial_rotary_factor", default=None, at_most=1.0), "partial_rotary_factor"
    if factor is None:
        rope = f.rope()[0]
        factor, name = rope.number(name, default=0.5, at_most=1.0), f"{rope.prefix}{name}"
    return ModelConfig(
        **common, num_kv_heads=kv_heads, head_dim=head_dim,
        intermediate_size=f.size("intermediate_size", limit=lim["intermediate_size"]),
        context_length=f.size("max_position_embeddings", default=2048, limit=lim["context_length"]),
        rope_theta=f.rope_theta(), norm="layer", norm_eps=f.number("layer_norm_eps", default=1e-5),
        hidden_act=f.text("hidden_act", default="gelu_new"), rotary_dim=f.rotary_dim(head_dim, factor, name),
        qkv_bias=True, o_bias=True, mlp_bias=True, lm_head_bias=True,
        qk_norm=f.flag("qk_layernorm", default=False),
    )


def params(cfg: ModelConfig) -> list[Param]:
    """Model parameters of the Phi graph and the checkpoint tensors they fuse."""
    h, hd = cfg.hidden_size, cfg.head_dim
    ps = Params()
    ps.embedding_and_head(cfg)
    for i in range(cfg.num_layers):
        x, p = cfg.layer(i), f"model.layers.{i}"
        a = f"{p}.self_attn"
        ps.norm(f"{p}.input_layernorm", f"{p}.input_layernorm", h, True)
        ps.qkv(a, cfg, i)
        ps.linear(f"{a}.dense", f"{a}.dense", h, x.num_heads * hd, cfg.o_bias)
        if cfg.qk_norm:
            ps.norm(f"{a}.q_layernorm", f"{a}.q_layernorm", hd, True)
            ps.norm(f"{a}.k_layernorm", f"{a}.k_layernorm", hd, True)
        ps.linear(f"{p}.mlp.fc1", f"{p}.mlp.fc1", x.intermediate_size, h, cfg.mlp_bias)
        ps.linear(f"{p}.mlp.fc2", f"{p}.mlp.fc2", h, x.intermediate_size, cfg.mlp_bias)
    ps.norm("model.final_layernorm", "model.final_layernorm", h, True)
    return ps.items


CONFIG_FIELDS: dict[str, str] = {
    **GENERIC_FIELDS,
    **{k: READ for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                         "num_attention_heads", "num_key_value_heads", "hidden_act", "max_position_embeddings",
                         "layer_norm_eps", "tie_word_embeddings", "rope_parameters", "rope_theta", "rope_scaling",
                         "partial_rotary_factor", "qk_layernorm")},
    "head_dim": f"{IGNORED}: transformers' Phi derives it as hidden_size / num_attention_heads, and so do we",
    "resid_pdrop": f"{IGNORED}: dropout, training only",
    "embd_pdrop": f"{IGNORED}: dropout, training only",
}


def _tiny_config(sizes: dict[str, Any], dtype: str) -> Any:
    from transformers import PhiConfig

    return PhiConfig(**{"partial_rotary_factor": 0.4, **sizes}, torch_dtype=dtype)


FAMILY = Family(
    name="phi", architectures=("PhiForCausalLM",), model_types=("phi",), parse=_parse, params=params,
    layer_sizes=lambda cfg, i, shapes: hf_decoder_layer_sizes(cfg, i, shapes, mlp="model.layers.{i}.mlp.fc1.weight"),
    graph="edgedeploy.models.phi.graph:PhiForCausalLM", config_fields=CONFIG_FIELDS, tiny_config=_tiny_config,
)
