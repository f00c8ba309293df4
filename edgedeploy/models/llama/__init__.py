"""Llama (``LlamaForCausalLM``): config, checkpoint tensors, tiny test config. The graph is in ``graph.py``.

Qwen2, Mistral and Gemma store their tensors under the same names, so they reuse :func:`params` and
:func:`parse_decoder` with their own defaults and flags.
"""

from __future__ import annotations

from typing import Any

from edgedeploy.checkpoint.config import SIZE_LIMITS, ConfigFields, ModelConfig
from edgedeploy.models.family import GENERIC_FIELDS, READ, Family, Param, Params, hf_decoder_layer_sizes


def parse_decoder(f: ConfigFields, common: dict[str, Any], **options: Any) -> ModelConfig:
    """A ``model.layers.N``-style decoder's config: the sizes every such family names the same way.

    ``options`` sets the family's own ModelConfig fields (biases, activation default, sliding window).
    """
    lim = SIZE_LIMITS
    hidden, heads = common["hidden_size"], common["num_heads"]
    kv_heads = f.kv_heads(heads)
    head_dim = f.head_dim("head_dim", hidden, heads)
    act_default = options.pop("hidden_act_default", "silu")
    fields: dict[str, Any] = dict(
        num_kv_heads=kv_heads, head_dim=head_dim,
        intermediate_size=f.size("intermediate_size", limit=lim["intermediate_size"]),
        context_length=f.size("max_position_embeddings", default=2048, limit=lim["context_length"]),
        rope_theta=f.rope_theta(), norm="rms", norm_eps=f.number("rms_norm_eps", default=1e-6),
        hidden_act=f.text("hidden_act", default=act_default), rotary_dim=head_dim,
        qkv_bias=False, o_bias=False, mlp_bias=False, lm_head_bias=False,
    )
    fields.update(options)
    return ModelConfig(**common, **fields)


def _parse(f: ConfigFields, common: dict[str, Any]) -> ModelConfig:
    bias = f.flag("attention_bias", default=False)
    return parse_decoder(f, common, qkv_bias=bias, o_bias=bias, mlp_bias=f.flag("mlp_bias", default=False))


def params(cfg: ModelConfig, norm_bias: bool = False) -> list[Param]:
    """Model parameters of the Llama graph and the ``model.layers.N`` checkpoint tensors they fuse."""
    h, hd = cfg.hidden_size, cfg.head_dim
    ps = Params()
    ps.embedding_and_head(cfg)
    for i in range(cfg.num_layers):
        x, p = cfg.layer(i), f"model.layers.{i}"
        a = f"{p}.self_attn"
        ps.norm(f"{p}.input_layernorm", f"{p}.input_layernorm", h, norm_bias)
        ps.qkv(a, cfg, i)
        ps.linear(f"{a}.o_proj", f"{a}.o_proj", h, x.num_heads * hd, cfg.o_bias)
        ps.norm(f"{p}.post_attention_layernorm", f"{p}.post_attention_layernorm", h, norm_bias)
        m, w = f"{p}.mlp", x.intermediate_size
        ps.fused_linear(f"{m}.gate_up_proj", [(f"{m}.gate_proj", w), (f"{m}.up_proj", w)], h, cfg.mlp_bias)
        ps.linear(f"{m}.down_proj", f"{m}.down_proj", h, w, cfg.mlp_bias)
    ps.norm("model.norm", "model.norm", h, norm_bias)
    return ps.items


#: Fields that every ``model.layers.N``-style config (Llama, Qwen2, Mistral, Gemma) reads the same way.
DECODER_FIELDS: dict[str, str] = {
    **GENERIC_FIELDS,
    **{k: READ for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                         "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
                         "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "rope_parameters",
                         "rope_theta", "rope_scaling")},
}

#: Every LlamaConfig field and what the build does with it.
CONFIG_FIELDS: dict[str, str] = {**DECODER_FIELDS, "attention_bias": READ, "mlp_bias": READ}


def _tiny_config(sizes: dict[str, Any], dtype: str) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(**sizes, torch_dtype=dtype)


FAMILY = Family(
    name="llama", architectures=("LlamaForCausalLM",), model_types=("llama",), parse=_parse, params=params,
    layer_sizes=hf_decoder_layer_sizes, graph="edgedeploy.models.llama.graph:LlamaForCausalLM",
    config_fields=CONFIG_FIELDS, tiny_config=_tiny_config,
)
