"""Checkpoint intake: everything ``edgedeploy inspect`` knows about a model folder, from headers alone."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgedeploy.checkpoint.config import ModelConfig, load_config
from edgedeploy.checkpoint.rules import RuleReport, check_rules
from edgedeploy.checkpoint.safetensors_index import TensorInfo, read_checkpoint_tensors
from edgedeploy.errors import InputError
from edgedeploy.models import parameter_count, with_layer_sizes


@dataclass
class Checkpoint:
    """A model folder after intake: parsed config, tensor index and rule check."""

    path: Path
    config: ModelConfig
    raw_config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    rules: RuleReport

    @property
    def has_weights(self) -> bool:
        return bool(self.tensors)

    @property
    def parameters(self) -> int:
        """Parameters stored in the checkpoint, or implied by config.json when it has no weights."""
        if not self.tensors:
            return parameter_count(self.config)
        return sum(t.numel for t in self.tensors.values())

    @property
    def weight_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def dtype_histogram(self) -> dict[str, dict[str, int]]:
        """Per safetensors dtype: number of tensors, parameters and bytes."""
        hist: dict[str, Counter[str]] = {}
        for t in self.tensors.values():
            h = hist.setdefault(t.dtype, Counter())
            h["tensors"] += 1
            h["parameters"] += t.numel
            h["bytes"] += t.nbytes
        return {k: dict(v) for k, v in sorted(hist.items())}

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "architecture": self.config.architecture,
            "config": self.config.to_dict(),
            "has_weights": self.has_weights,
            "parameters": self.parameters,
            "parameters_from_config": parameter_count(self.config),
            "weight_bytes": self.weight_bytes,
            "files": sorted({t.file.name for t in self.tensors.values()}),
            "dtypes": self.dtype_histogram(),
            "rules": self.rules.to_dict(),
        }


def open_checkpoint(model_dir: Path | str) -> Checkpoint:
    """Read config.json and every safetensors header in ``model_dir`` and run the rule check."""
    path = Path(model_dir)
    if path.is_dir() and not any(path.iterdir()):
        raise InputError(f"{path}: folder is empty (expected config.json and *.safetensors)")
    cfg, raw = load_config(path)
    tensors = read_checkpoint_tensors(path)
    if not tensors and any(path.glob("*.bin")):
        raise InputError(f"{path}: weights are PyTorch pickles (*.bin); edgedeploy reads safetensors only "
                         "(convert with transformers: model.save_pretrained(dir, safe_serialization=True))")
    # A pruned checkpoint's layers may differ in width; only the tensor shapes say how.
    cfg = with_layer_sizes(cfg, {name: t.shape for name, t in tensors.items()})
    return Checkpoint(path, cfg, raw, tensors, check_rules(cfg, raw, tensors))
