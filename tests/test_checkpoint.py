"""Checkpoint intake: parameter counts against transformers, dtype histogram, rule check."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from edgedeploy.checkpoint.config import load_config
from edgedeploy.checkpoint.intake import open_checkpoint
from edgedeploy.models import parameter_count
from edgedeploy.tiny import load_reference_model

from .conftest import REFERENCE_CONFIGS

#: Parameter counts of the real models (docs/NOTES §2), computed from config.json alone.
REFERENCE_PARAMS = {
    "phi-2": 2_779_683_840,
    "llama-3-8b": 8_030_261_248,
    "qwen2-7b": 7_615_616_512,
    "qwen-7b": 7_721_324_544,
}


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS))
def test_reference_parameter_counts_exact(name: str) -> None:
    cfg, _ = load_config(REFERENCE_CONFIGS / name)
    assert parameter_count(cfg) == REFERENCE_PARAMS[name]


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi", "qwen"])
def test_tiny_parameter_count_matches_transformers(tiny_models: dict[str, Path], family: str) -> None:
    ck = open_checkpoint(tiny_models[family])
    model = load_reference_model(tiny_models[family])
    assert ck.parameters == sum(p.numel() for p in model.parameters())
    assert ck.parameters == parameter_count(ck.config)
    assert ck.rules.status == "PASS", ck.rules.to_dict()
    assert set(ck.dtype_histogram()) == {"F16"}
    assert ck.weight_bytes == 2 * ck.parameters


def test_sharded_checkpoint_reads_every_shard(tiny_models: dict[str, Path]) -> None:
    folder = tiny_models["llama"]
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1
    ck = open_checkpoint(folder)
    assert {t.file.name for t in ck.tensors.values()} == shards
    assert set(ck.tensors) == set(index["weight_map"])


def test_tied_embeddings_counted_once(tmp_path: Path) -> None:
    from edgedeploy.tiny import make_tiny_checkpoint

    folder = make_tiny_checkpoint(tmp_path / "tied", "qwen2", tie_word_embeddings=True)
    ck = open_checkpoint(folder)
    model = load_reference_model(folder)
    assert ck.config.tie_word_embeddings
    assert ck.parameters == sum(p.numel() for p in model.parameters())
    assert ck.rules.status == "PASS"


def _copy_config(src: Path, dst: Path, **changes: object) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    raw = json.loads((src / "config.json").read_text())
    raw.update(changes)
    (dst / "config.json").write_text(json.dumps(raw))


def test_quantized_checkpoint_fails_naming_tensors(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """A GPTQ-style checkpoint: int32 qweight/qzeros, fp16 scales, and a quantization_config."""
    folder = tmp_path / "gptq"
    _copy_config(tiny_models["llama"], folder,
                 quantization_config={"quant_method": "gptq", "bits": 4, "group_size": 32})
    tensors = {
        "model.embed_tokens.weight": np.zeros((512, 64), np.float16),
        "model.layers.0.self_attn.q_proj.qweight": np.zeros((8, 64), np.int32),
        "model.layers.0.self_attn.q_proj.qzeros": np.zeros((2, 8), np.int32),
        "model.layers.0.self_attn.q_proj.scales": np.zeros((2, 64), np.float16),
    }
    save_file(tensors, str(folder / "model.safetensors"))
    ck = open_checkpoint(folder)
    assert ck.rules.status == "FAIL"
    text = " ".join(f.message for f in ck.rules.findings)
    assert "quantization_config" in text and "gptq" in text
    assert "model.layers.0.self_attn.q_proj.qweight" in text
    assert "model.layers.0.self_attn.q_proj.qzeros" in text


def test_int8_weight_matrix_fails_without_quant_config(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "int8"
    _copy_config(tiny_models["llama"], folder)
    save_file({"model.embed_tokens.weight": np.zeros((512, 64), np.int8)}, str(folder / "model.safetensors"))
    ck = open_checkpoint(folder)
    assert ck.rules.status == "FAIL"
    assert any("I8" in f.message and "model.embed_tokens.weight" in f.tensors for f in ck.rules.findings)


def test_bf16_is_a_warning_not_a_failure(tmp_path: Path) -> None:
    from edgedeploy.tiny import make_tiny_checkpoint

    folder = make_tiny_checkpoint(tmp_path / "bf16", "llama", dtype="bfloat16")
    ck = open_checkpoint(folder)
    assert ck.rules.status == "WARN"
    assert any("BF16" in f.message and "converts" in f.message for f in ck.rules.findings)
    assert ck.rules.passed


def test_pruned_checkpoint_that_lies_about_sizes_fails(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """config.json says intermediate 96 but the tensors are 128 wide: the build would break, so FAIL."""
    folder = tmp_path / "liar"
    _copy_config(tiny_models["qwen2"], folder, intermediate_size=96)
    (folder / "model.safetensors").write_bytes((tiny_models["qwen2"] / "model.safetensors").read_bytes())
    ck = open_checkpoint(folder)
    assert ck.rules.status == "FAIL"
    assert any("mlp.gate_proj.weight" in " ".join(f.tensors) for f in ck.rules.findings)


def test_config_only_folder_counts_from_config(tmp_path: Path) -> None:
    folder = tmp_path / "what-if"
    _copy_config(REFERENCE_CONFIGS / "llama-3-8b", folder, num_hidden_layers=16)
    ck = open_checkpoint(folder)
    assert not ck.has_weights
    assert ck.parameters == REFERENCE_PARAMS["llama-3-8b"] - 16 * 218_112_000
