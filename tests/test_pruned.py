"""Checkpoints pruned per layer (LLM-Pruner style): layers of different widths that config.json cannot describe.

A tiny transformers Llama is pruned in memory the way LLM-Pruner does it (whole KV groups, single
query heads, MLP channels; different in every layer), saved with ``save_pretrained``, built, and run:
its greedy tokens must equal the pruned transformers model's, and inspect/estimate must count the real
parameters and show the KV-cache padding.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("tvm")

from edgedeploy.checkpoint.config import LayerSizes  # noqa: E402
from edgedeploy.checkpoint.intake import open_checkpoint  # noqa: E402
from edgedeploy.compile.build import build_bundle  # noqa: E402
from edgedeploy.devices.profiles import load_profile  # noqa: E402
from edgedeploy.estimate import estimate  # noqa: E402
from edgedeploy.runtime.engine import Engine  # noqa: E402
from edgedeploy.tiny import make_tokenizer, reference_model_from_config  # noqa: E402

HD = 16
#: layer -> (query heads kept, KV heads kept, MLP channels kept). The model has 4 query heads in 2 KV groups.
PLAN: dict[int, tuple[list[int], list[int], int]] = {
    0: ([0, 1], [0], 96),          # one whole KV group removed (LLM-Pruner's GQA unit), MLP 128 -> 96
    1: ([0, 1, 2, 3], [0, 1], 80),  # attention intact, MLP -> 80
    2: ([1, 2], [0, 1], 128),       # one query head per group removed: groups of 1 where the cache has 2
}


def _pruned_llama(seed: int = 4) -> Any:
    """A tiny FP32 Llama (3 layers, 4 heads / 2 KV heads) pruned per :data:`PLAN`, in memory."""
    from transformers import LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=HD, vocab_size=384, max_position_embeddings=256,
                      bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    model = reference_model_from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.08) if p.dim() >= 2 else p.add_(torch.randn_like(p), alpha=0.05)
    for i, (q_keep, kv_keep, width) in PLAN.items():
        layer = model.model.layers[i]
        att, mlp = layer.self_attn, layer.mlp
        rows = lambda heads: torch.cat([torch.arange(h * HD, (h + 1) * HD) for h in heads])  # noqa: E731
        _keep_rows(att.q_proj, rows(q_keep))
        _keep_rows(att.k_proj, rows(kv_keep))
        _keep_rows(att.v_proj, rows(kv_keep))
        _keep_cols(att.o_proj, rows(q_keep))
        att.num_key_value_groups = len(q_keep) // len(kv_keep)
        channels = torch.arange(width)
        _keep_rows(mlp.gate_proj, channels)
        _keep_rows(mlp.up_proj, channels)
        _keep_cols(mlp.down_proj, channels)
    return model.eval()


def _keep_rows(lin: Any, idx: Any) -> None:
    lin.weight = torch.nn.Parameter(lin.weight.data[idx].clone())
    lin.out_features = len(idx)


def _keep_cols(lin: Any, idx: Any) -> None:
    lin.weight = torch.nn.Parameter(lin.weight.data[:, idx].clone())
    lin.in_features = len(idx)


def _greedy(model: Any, prompt: list[int], steps: int) -> list[int]:
    out_tokens: list[int] = []
    with torch.no_grad():
        out = model(torch.tensor([prompt]), use_cache=True)
        for _ in range(steps):
            out_tokens.append(int(out.logits[0, -1].argmax()))
            out = model(torch.tensor([[out_tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
    return out_tokens


@pytest.fixture(scope="module")
def pruned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    model = _pruned_llama()
    folder = tmp_path_factory.mktemp("pruned") / "ckpt"
    model.save_pretrained(folder, safe_serialization=True)
    make_tokenizer(folder)
    return model, folder


def test_layer_sizes_come_from_the_tensors(pruned: tuple[Any, Path]) -> None:
    model, folder = pruned
    assert json.loads((folder / "config.json").read_text())["intermediate_size"] == 128  # config keeps the original
    ck = open_checkpoint(folder)
    assert ck.rules.passed, [f.message for f in ck.rules.findings]
    cfg = ck.config
    assert cfg.layers == (LayerSizes(2, 1, 96), LayerSizes(4, 2, 80), LayerSizes(2, 2, 128))
    # The envelope: 2 KV heads, groups of 2 -> 4 query heads, the widest MLP.
    assert (cfg.num_kv_heads, cfg.num_heads, cfg.intermediate_size) == (2, 4, 128)
    assert any("per layer" in f.message for f in ck.rules.findings)
    real = sum(p.numel() for p in model.parameters())
    assert ck.parameters == real
    from edgedeploy.models import parameter_count

    assert parameter_count(cfg) == real
    est = estimate(cfg, load_profile("host"), context_window=128, parameters=ck.parameters)
    assert est.parameters == real
    # Layer 0 has one KV head in a cache of two: 1 of 6 KV heads is padding, K and V, FP16.
    assert est.kv_padding_bytes == 1 * HD * 2 * 2 * 128


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_pruned_tokens_match_transformers(pruned: tuple[Any, Path], tmp_path: Path, dtype: str) -> None:
    model, folder = pruned
    bundle = tmp_path / "bundle"
    build_bundle(folder, bundle, target="host", dtype=dtype, context_window=128, prefill_chunk=16)
    prompt = [int(t) for t in torch.randint(2, 384, (40,), generator=torch.Generator().manual_seed(7))]
    want = _greedy(model, prompt, 12)
    engine = Engine(bundle, "model.so", threads=2)
    engine.load()
    got = engine.generate(prompt, 12, stop_ids=[]).token_ids
    assert got == want


def test_pickled_pruned_model_goes_through_convert(pruned: tuple[Any, Path], tmp_path: Path) -> None:
    """LLM-Pruner's route: the whole model pickled, ``edgedeploy convert --trust-pickle``, build, same tokens."""
    from edgedeploy.cli import main

    model, folder = pruned
    torch.save({"model": model}, tmp_path / "pruned.bin")
    hf = tmp_path / "hf"
    assert main(["convert", str(tmp_path / "pruned.bin"), "--out", str(hf), "--trust-pickle",
                 "--tokenizer-from", str(folder)]) == 0
    ck = open_checkpoint(hf)
    assert ck.rules.passed and ck.config.layers == open_checkpoint(folder).config.layers
    build_bundle(hf, tmp_path / "bundle", target="host", dtype="float32", context_window=64, prefill_chunk=16)
    prompt = list(range(5, 25))
    engine = Engine(tmp_path / "bundle", "model.so", threads=2)
    engine.load()
    assert engine.generate(prompt, 8, stop_ids=[]).token_ids == _greedy(model, prompt, 8)
