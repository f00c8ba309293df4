"""Gemma v1 (``GemmaForCausalLM``): Llama names, GeGLU, ``(1 + w)`` RMSNorm, scaled embeddings, tied head.

The graph (``graph.py``) adds the two numeric differences to the Llama graph. Gemma 2 and 3
(soft-capping, sandwich norms, local/global layers) are other families and are refused by name.
"""

from __future__ import annotations

from typing import Any

from edgedeploy.checkpoint.config import ConfigFields, ModelConfig
from edgedeploy.models import llama
from edgedeploy.models.family import IGNORED, READ, Family, hf_decoder_layer_sizes


def _parse(f: ConfigFields, common: dict[str, Any]) -> ModelConfig:
    f.refuse("use_bidirectional_attention", False, "the graph is causal only")
    common = {**common, "tie_word_embeddings": f.flag("tie_word_embeddings", default=True)}
    # Released Gemma configs say "gelu" but mean the tanh approximation; transformers rewrites it the same way.
    act = f.text("hidden_activation", "hidden_act", default="gelu_pytorch_tanh")
    bias = f.flag("attention_bias", default=False)
    return llama.parse_decoder(f, common, hidden_act="gelu_pytorch_tanh" if act == "gelu" else act,
                               qkv_bias=bias, o_bias=bias)


CONFIG_FIELDS: dict[str, str] = {
    **llama.DECODER_FIELDS, "attention_bias": READ, "hidden_activation": READ,
    "use_bidirectional_attention": "refused unless false/null: the graph is causal only",
    "query_pre_attn_scalar": f"{IGNORED}: Gemma 2's; Gemma v1 scales by the head dim",
}


def _tiny_config(sizes: dict[str, Any], dtype: str) -> Any:
    from transformers import GemmaConfig

    sizes = {"head_dim": sizes["hidden_size"] // sizes["num_attention_heads"], **sizes}
    return GemmaConfig(**sizes, torch_dtype=dtype)


FAMILY = Family(
    name="gemma", architectures=("GemmaForCausalLM",), model_types=("gemma",), parse=_parse, params=llama.params,
    layer_sizes=hf_decoder_layer_sizes, graph="edgedeploy.models.gemma.graph:GemmaForCausalLM",
    config_fields=CONFIG_FIELDS, tiny_config=_tiny_config,
)
