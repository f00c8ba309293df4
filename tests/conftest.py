"""Shared fixtures: tiny random checkpoints made with transformers, once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgedeploy.tiny import FAMILIES, make_tiny_checkpoint

REFERENCE_CONFIGS = Path(__file__).parent / "data" / "reference_configs"


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One FP16 checkpoint per family; the Llama one is sharded (index + several files)."""
    root = tmp_path_factory.mktemp("tiny")
    return {
        fam: make_tiny_checkpoint(root / fam, fam, dtype="float16",
                                  max_shard_size="40KB" if fam == "llama" else None)
        for fam in FAMILIES
    }
