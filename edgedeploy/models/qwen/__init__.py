"""Qwen v1 (``QWenLMHeadModel``, remote code): the Llama graph under Qwen v1's names and config fields.

Checkpoint names: ``transformer.h.N.attn.c_attn`` (q|k|v already stacked, with bias), ``attn.c_proj``,
``mlp.w1``/``w2``/``c_proj`` computing ``c_proj(w1(x) * silu(w2(x)))`` (w2 is the gate), ``ln_1``/``ln_2``
RMSNorm. transformers has no Qwen v1 class, so a Qwen2 model with equal heads is its numeric twin: the
tiny checkpoints are saved from one and loaded back into one through :func:`config_from_twin` and
:func:`twin_config` (tensor names translate through the two families' :class:`Param` lists).
"""

from __future__ import annotations

from typing import Any

from edgedeploy.checkpoint.config import SIZE_LIMITS, ConfigFields, ModelConfig
from edgedeploy.errors import InputError
from edgedeploy.models.family import GENERIC_FIELDS, IGNORED, READ, Family, Param, Params, layer_sizes_from_rows


def _parse(f: ConfigFields, common: dict[str, Any]) -> ModelConfig:
    lim = SIZE_LIMITS
    hidden, heads = common["hidden_size"], common["num_heads"]
    head_dim = f.head_dim("kv_channels", hidden, heads)
    # Qwen v1's intermediate_size covers w1 and w2 together, so its bound is twice ours.
    inter = f.size("intermediate_size", limit=2 * lim["intermediate_size"])
    if inter % 2:
        raise InputError(f"{f.source}: Qwen v1 intermediate_size must be even (w1 and w2 each take half)")
    # use_logn_attn and use_dynamic_ntk act only past seq_length, which caps every bundle's context.
    f.flag("use_logn_attn", default=False), f.flag("use_dynamic_ntk", default=False)
    return ModelConfig(
        **common, num_kv_heads=heads, head_dim=head_dim, intermediate_size=inter // 2,
        context_length=f.size("seq_length", "max_position_embeddings", default=2048, limit=lim["context_length"]),
        norm="rms", norm_eps=f.number("layer_norm_epsilon", default=1e-6), hidden_act="silu",
        rope_theta=f.number("rotary_emb_base", default=10000.0),
        rotary_dim=f.rotary_dim(head_dim, f.number("rotary_pct", default=1.0, at_most=1.0), "rotary_pct"),
        qkv_bias=True, o_bias=False, mlp_bias=False, lm_head_bias=False,
    )


def params(cfg: ModelConfig) -> list[Param]:
    """Model parameters of the Llama graph and the Qwen v1 checkpoint tensors they come from."""
    h, hd = cfg.hidden_size, cfg.head_dim
    ps = Params()
    ps.embedding_and_head(cfg, embed="transformer.wte")
    for i in range(cfg.num_layers):
        x, p, s = cfg.layer(i), f"model.layers.{i}", f"transformer.h.{i}"
        ps.norm(f"{p}.input_layernorm", f"{s}.ln_1", h, False)
        # c_attn already stores q|k|v stacked along the output dim, the order the cache expects.
        ps.linear(f"{p}.self_attn.qkv_proj", f"{s}.attn.c_attn", (x.num_heads + 2 * x.num_kv_heads) * hd, h, True)
        ps.linear(f"{p}.self_attn.o_proj", f"{s}.attn.c_proj", h, x.num_heads * hd, False)
        ps.norm(f"{p}.post_attention_layernorm", f"{s}.ln_2", h, False)
        w = x.intermediate_size
        ps.fused_linear(f"{p}.mlp.gate_up_proj", [(f"{s}.mlp.w2", w), (f"{s}.mlp.w1", w)], h, False)
        ps.linear(f"{p}.mlp.down_proj", f"{s}.mlp.c_proj", h, w, False)
    ps.norm("model.norm", "transformer.ln_f", h, False)
    return ps.items


def _layer_sizes(cfg: ModelConfig, i: int, shapes: Any) -> Any:
    qkv, w1 = shapes.get(f"transformer.h.{i}.attn.c_attn.weight"), shapes.get(f"transformer.h.{i}.mlp.w1.weight")
    if qkv is None or w1 is None or qkv[0] % 3:
        return None
    return layer_sizes_from_rows(cfg, qkv[0] // 3, qkv[0] // 3, w1[0])


CONFIG_FIELDS: dict[str, str] = {
    **GENERIC_FIELDS,
    **{k: READ for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                         "num_attention_heads", "kv_channels", "rotary_emb_base", "rotary_pct",
                         "layer_norm_epsilon", "seq_length", "max_position_embeddings", "tie_word_embeddings")},
    "use_logn_attn": f"{READ}: acts only past seq_length, which caps the bundle's context",
    "use_dynamic_ntk": f"{READ}: acts only past seq_length, which caps the bundle's context",
    "no_bias": f"{IGNORED}: Qwen v1's c_attn always has a bias and nothing else does, whatever it says",
    **{k: f"{IGNORED}: kernel choice or precision switch of the remote code, not the model's arithmetic"
       for k in ("use_flash_attn", "bf16", "fp16", "fp32", "softmax_in_fp32", "use_cache_quantization",
                 "use_cache_kernel", "onnx_safe", "scale_attn_weights")},
}


def config_from_twin(twin: Any, dtype: str) -> dict[str, Any]:
    """Qwen v1's config.json for a checkpoint saved from ``twin``, a transformers Qwen2 config with MHA."""
    return {
        "architectures": ["QWenLMHeadModel"], "model_type": "qwen", "hidden_size": twin.hidden_size,
        "intermediate_size": 2 * twin.intermediate_size, "num_hidden_layers": twin.num_hidden_layers,
        "num_attention_heads": twin.num_attention_heads,
        "kv_channels": twin.hidden_size // twin.num_attention_heads,
        "rotary_emb_base": twin.rope_parameters["rope_theta"], "rotary_pct": 1.0,
        "layer_norm_epsilon": twin.rms_norm_eps, "seq_length": twin.max_position_embeddings,
        "vocab_size": twin.vocab_size, "tie_word_embeddings": twin.tie_word_embeddings, "no_bias": True,
        "torch_dtype": dtype, "bos_token_id": twin.bos_token_id, "eos_token_id": twin.eos_token_id,
    }


def twin_config(raw: dict[str, Any]) -> Any:
    """The transformers Qwen2 config whose model computes what Qwen v1's ``raw`` config.json describes."""
    from transformers import Qwen2Config

    heads = raw["num_attention_heads"]
    return Qwen2Config(hidden_size=raw["hidden_size"], intermediate_size=raw["intermediate_size"] // 2,
                       num_hidden_layers=raw["num_hidden_layers"], num_attention_heads=heads,
                       num_key_value_heads=heads, vocab_size=raw["vocab_size"],
                       max_position_embeddings=raw["seq_length"], rms_norm_eps=raw["layer_norm_epsilon"],
                       rope_theta=raw["rotary_emb_base"], tie_word_embeddings=raw["tie_word_embeddings"])


def _tiny_config(sizes: dict[str, Any], dtype: str) -> Any:
    from transformers import Qwen2Config

    # Qwen v1 is multi-head attention only.
    return Qwen2Config(**{**sizes, "num_key_value_heads": sizes["num_attention_heads"]}, torch_dtype=dtype)


FAMILY = Family(
    name="qwen", architectures=("QWenLMHeadModel",), model_types=("qwen",), parse=_parse, params=params,
    layer_sizes=_layer_sizes, graph="edgedeploy.models.llama.graph:LlamaForCausalLM", config_fields=CONFIG_FIELDS,
    tiny_config=_tiny_config, twin="qwen2", config_from_twin=config_from_twin, twin_config=twin_config,
)
