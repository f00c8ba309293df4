"""Shared fixtures: tiny random checkpoints made with transformers, once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgedeploy.tiny import FAMILIES, make_tiny_checkpoint

REFERENCE_CONFIGS = Path(__file__).parent / "data" / "reference_configs"


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Runner builds, aarch64 wheels and the results history go to temporary folders, not the user's home."""
    import os

    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))
    # matplotlib (HTML report plots) keeps its config and font cache here, not in ~/.config/matplotlib.
    os.environ["MPLCONFIGDIR"] = str(tmp_path_factory.mktemp("matplotlib"))
    # Profile runs append to the results history: a private database, never ~/.local/share.
    os.environ["EDGEDEPLOY_HISTORY"] = str(tmp_path_factory.mktemp("history") / "history.sqlite")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One FP16 checkpoint per family; the Llama one is sharded (index + several files)."""
    root = tmp_path_factory.mktemp("tiny")
    return {
        fam: make_tiny_checkpoint(root / fam, fam, dtype="float16",
                                  max_shard_size="40KB" if fam == "llama" else None)
        for fam in FAMILIES
    }


@pytest.fixture(scope="session")
def host_bundle(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama built for the host (context 128, prefill chunk 32)."""
    from edgedeploy.compile.build import build_bundle

    out = tmp_path_factory.mktemp("bundles") / "llama-host"
    build_bundle(tiny_models["llama"], out, target="host", context_window=128, prefill_chunk=32)
    return out
