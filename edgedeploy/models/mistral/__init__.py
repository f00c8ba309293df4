"""Mistral (``MistralForCausalLM``): the Llama graph and names with a sliding attention window.

Mistral 7B v0.1 attends 4,096 tokens back; later versions set ``sliding_window`` to null. Attention past
a window is not built, so a bundle's context is capped at the window (``ModelConfig.usable_context``):
within it sliding and full attention are the same computation.
"""

from __future__ import annotations

from typing import Any

from edgedeploy.checkpoint.config import ConfigFields, ModelConfig
from edgedeploy.models import llama
from edgedeploy.models.family import READ, Family, hf_decoder_layer_sizes
from edgedeploy.models.qwen2 import sliding_window


def _parse(f: ConfigFields, common: dict[str, Any]) -> ModelConfig:
    return llama.parse_decoder(f, common, sliding_window=sliding_window(f, None))


CONFIG_FIELDS: dict[str, str] = {**llama.DECODER_FIELDS,
                                 "sliding_window": f"{READ}: caps the bundle's context at the window"}


def _tiny_config(sizes: dict[str, Any], dtype: str) -> Any:
    from transformers import MistralConfig

    return MistralConfig(**sizes, torch_dtype=dtype)


FAMILY = Family(
    name="mistral", architectures=("MistralForCausalLM",), model_types=("mistral",), parse=_parse,
    params=llama.params, layer_sizes=hf_decoder_layer_sizes, graph="edgedeploy.models.llama.graph:LlamaForCausalLM",
    config_fields=CONFIG_FIELDS, tiny_config=_tiny_config,
)
