"""Architecture families: one subpackage each, behind the registry here.

A family's ``__init__`` declares its config fields, checkpoint tensors, per-layer sizes and tiny test
config as a :class:`~edgedeploy.models.family.Family` (no TVM import: ``inspect`` and ``estimate`` use
it); its ``graph`` module holds the ``tvm.relax.frontend.nn`` model, imported only to compile. Shared
graph blocks are in :mod:`edgedeploy.models.blocks`. Adding a family is one new subpackage and one
line in :data:`FAMILIES`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from edgedeploy.checkpoint.config import LayerSizes, ModelConfig
from edgedeploy.errors import InputError
from edgedeploy.models import gemma, llama, mistral, phi, qwen, qwen2
from edgedeploy.models.family import Family, Shape, WeightSource, expected_tensors, weight_map

#: Every supported family by name.
FAMILIES: dict[str, Family] = {f.name: f for f in (llama.FAMILY, qwen2.FAMILY, mistral.FAMILY, gemma.FAMILY,
                                                   phi.FAMILY, qwen.FAMILY)}

__all__ = ["FAMILIES", "Family", "WeightSource", "checkpoint_tensors", "family_of_architecture",
           "family_of_model_type", "get_family", "get_model_class", "get_weight_map", "parameter_count",
           "with_layer_sizes"]


def get_family(name: str) -> Family:
    """The family called ``name``; :class:`InputError` listing the supported ones otherwise."""
    if name not in FAMILIES:
        raise InputError(f"no model definition for family {name!r:.60} (supported: {', '.join(FAMILIES)})")
    return FAMILIES[name]


def family_of_architecture(architecture: str) -> str | None:
    """The family whose Hugging Face class is ``architecture`` (config.json's ``architectures[0]``)."""
    return next((f.name for f in FAMILIES.values() if architecture in f.architectures), None)


def family_of_model_type(model_type: str) -> str | None:
    return next((f.name for f in FAMILIES.values() if model_type in f.model_types), None)


def get_model_class(family: str) -> type:
    """The graph's ``nn.Module`` class for ``family`` (imports TVM); construct it as ``cls(cfg, dtype, target)``."""
    return get_family(family).model_class()


def get_weight_map(cfg: ModelConfig) -> dict[str, WeightSource]:
    """Model parameter name -> the checkpoint tensors it is made of, for ``cfg``'s checkpoint."""
    return weight_map(get_family(cfg.family), cfg)


def checkpoint_tensors(cfg: ModelConfig) -> dict[str, Shape]:
    """Checkpoint tensor name -> shape that a checkpoint of ``cfg`` holds."""
    return expected_tensors(get_family(cfg.family), cfg)


def parameter_count(cfg: ModelConfig) -> int:
    """Exact number of parameters a checkpoint of ``cfg`` holds (tied head counted once, per-layer sizes)."""
    total = 0
    for shape in checkpoint_tensors(cfg).values():
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


def with_layer_sizes(cfg: ModelConfig, shapes: Mapping[str, Shape]) -> ModelConfig:
    """``cfg`` with per-layer sizes when the tensor shapes say the layers were pruned unevenly.

    config.json cannot describe layers of different widths (LLM-Pruner's output keeps the original
    config), so the q/k and MLP tensors of each layer are read instead. ``cfg`` comes back unchanged
    when every layer matches it, or when some layer's tensors are missing, no whole number of heads, or
    larger than config.json says (pruning only removes; a wider tensor means a wrong config, and the rule
    check then names the tensors). The uniform sizes become the envelope: the most KV heads, the
    largest query group and the widest MLP of any layer.
    """
    family = get_family(cfg.family)
    sizes = [family.layer_sizes(cfg, i, shapes) for i in range(cfg.num_layers)]
    if any(s is None or not _within(s, cfg) for s in sizes) or all(s == cfg.layer(i) for i, s in enumerate(sizes)):
        return cfg
    kv = max(s.num_kv_heads for s in sizes)
    group = max(s.num_heads // s.num_kv_heads for s in sizes)
    return replace(cfg, layers=tuple(sizes), num_kv_heads=kv, num_heads=kv * group,
                   intermediate_size=max(s.intermediate_size for s in sizes))


def _within(sizes: LayerSizes, cfg: ModelConfig) -> bool:
    return (sizes.num_heads <= cfg.num_heads and sizes.num_kv_heads <= cfg.num_kv_heads
            and sizes.intermediate_size <= cfg.intermediate_size)
