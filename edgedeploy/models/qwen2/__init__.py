"""Qwen2 (``Qwen2ForCausalLM``): the Llama graph and names with q/k/v biases and an optional sliding window.

Qwen2 slides its window only in layers from ``max_window_layers`` on, and only with
``use_sliding_window``. Attention past a window is not built; a bundle's context is capped at the window
instead (:attr:`ModelConfig.usable_context`), which gives the same tokens wherever it may run.
"""

from __future__ import annotations

from typing import Any

from edgedeploy.checkpoint.config import SIZE_LIMITS, ConfigFields, ModelConfig
from edgedeploy.models import llama
from edgedeploy.models.family import READ, Family, hf_decoder_layer_sizes


def sliding_window(f: ConfigFields, switch: str | None) -> int | None:
    """The window config.json sets (``sliding_window``), if its ``switch`` flag (when it has one) turns it on."""
    if switch is not None and not f.flag(switch, default=False):
        return None
    return f.size("sliding_window", default=None, limit=SIZE_LIMITS["context_length"])


def _parse(f: ConfigFields, common: dict[str, Any]) -> ModelConfig:
    window = sliding_window(f, "use_sliding_window")
    # Layers below max_window_layers attend to everything; capping the context covers both kinds.
    f.size("max_window_layers", default=None, limit=SIZE_LIMITS["num_layers"])
    return llama.parse_decoder(f, common, qkv_bias=True, sliding_window=window)


CONFIG_FIELDS: dict[str, str] = {
    **llama.DECODER_FIELDS,
    "use_sliding_window": f"{READ}: caps the bundle's context at the window",
    "sliding_window": f"{READ}: caps the bundle's context at the window",
    "max_window_layers": f"{READ}: with the context capped at the window, every layer attends the same",
    "layer_types": f"{READ}: with the context capped at the window, every layer attends the same",
}


def _tiny_config(sizes: dict[str, Any], dtype: str) -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(**sizes, torch_dtype=dtype)


FAMILY = Family(
    name="qwen2", architectures=("Qwen2ForCausalLM",), model_types=("qwen2",), parse=_parse, params=llama.params,
    layer_sizes=hf_decoder_layer_sizes, graph="edgedeploy.models.llama.graph:LlamaForCausalLM",
    config_fields=CONFIG_FIELDS, tiny_config=_tiny_config,
)
