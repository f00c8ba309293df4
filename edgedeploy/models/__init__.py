"""Model definitions per architecture family, in ``tvm.relax.frontend.nn``.

Importing this package imports the TVM compiler; the runtime (:mod:`edgedeploy.runtime.engine`)
never imports it.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module

from edgedeploy.checkpoint.config import ModelConfig
from edgedeploy.errors import InputError

#: family -> (module, model class name); Qwen2 differs from Llama only in flags that ModelConfig carries.
_REGISTRY: dict[str, tuple[str, str]] = {
    "llama": ("edgedeploy.models.llama", "LlamaForCausalLM"),
    "qwen2": ("edgedeploy.models.llama", "LlamaForCausalLM"),
    "qwen": ("edgedeploy.models.qwen", "QWenForCausalLM"),
    "phi": ("edgedeploy.models.phi", "PhiForCausalLM"),
}


def get_model_class(family: str) -> type:
    """The ``nn.Module`` class for ``family``; construct it as ``cls(cfg, dtype, target)``."""
    if family not in _REGISTRY:
        raise InputError(f"no model definition for family {family!r} (supported: {', '.join(_REGISTRY)})")
    module, name = _REGISTRY[family]
    return getattr(import_module(module), name)


def get_weight_map(cfg: ModelConfig) -> dict:
    """Model parameter name -> :class:`~edgedeploy.models._common.WeightSource` for ``cfg``'s checkpoint."""
    if cfg.family not in _REGISTRY:
        raise InputError(f"no model definition for family {cfg.family!r}")
    fn: Callable = import_module(_REGISTRY[cfg.family][0]).weight_map
    return fn(cfg)
