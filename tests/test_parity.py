"""Compiled bundles against transformers on the same tiny random weights, plus runtime guards.

Each case compiles one library (a few seconds) in a module-scoped fixture; prompts are longer than
one prefill chunk so chunked prefill over the paged KV cache is exercised.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("tvm")

from edgedeploy.bundle import Manifest, write_manifest  # noqa: E402
from edgedeploy.checkpoint.config import ModelConfig, load_config  # noqa: E402
from edgedeploy.checkpoint.intake import open_checkpoint  # noqa: E402
from edgedeploy.compile.library import compile_model_library  # noqa: E402
from edgedeploy.compile.weights import SafetensorsReader, write_tensor_cache  # noqa: E402
from edgedeploy.errors import InputError  # noqa: E402
from edgedeploy.runtime.engine import Engine  # noqa: E402
from edgedeploy.tiny import load_reference_model, make_tiny_checkpoint  # noqa: E402

CONTEXT = 128
CHUNK = 16
PROMPT_LEN = 40
DECODE_STEPS = 16
FP32_TOL = 1e-4

#: name -> (family, checkpoint overrides, make_tiny_checkpoint extras)
CASES: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "llama-gqa-untied": ("llama", {}, {}),
    # MHA, head_dim 24 (not a power of two), Llama-3 RoPE scaling whose low/high-frequency split the prompt crosses.
    "llama-mha-headdim24-rope3": ("llama", {"num_key_value_heads": 4, "head_dim": 24, "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}, {}),
    "qwen2-tied": ("qwen2", {"tie_word_embeddings": True}, {}),
    "qwen-v1": ("qwen", {}, {}),
    "phi-partial-rotary": ("phi", {}, {}),
    "phi-qk-layernorm": ("phi", {"qk_layernorm": True}, {}),
    # GQA; its sliding window (64) is wider than the prompt plus generation, where full attention is exact.
    "mistral-gqa-window": ("mistral", {"sliding_window": 64}, {}),
    # Tied head (Gemma's default), GeGLU, (1 + w) norms, embeddings scaled by sqrt(hidden), head dim 32.
    "gemma-tied": ("gemma", {"tie_word_embeddings": True, "head_dim": 32}, {}),
    # Pruned: odd MLP width, three layers, 2 heads of 32 with one KV head; sharded checkpoint.
    "qwen2-pruned-sharded": ("qwen2", {"intermediate_size": 80, "num_hidden_layers": 3, "num_attention_heads": 2,
                                       "num_key_value_heads": 1}, {"max_shard_size": "40KB"}),
}
FP16_CASES = ("llama-gqa-untied", "phi-partial-rotary", "qwen-v1", "gemma-tied")


@dataclass
class Built:
    ckpt: Path
    cfg: ModelConfig
    bundles: dict[str, Path]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("parity")


_built: dict[tuple[Path, str], Built] = {}


def _build(workdir: Path, case: str, dtype: str) -> tuple[Built, Path]:
    family, overrides, extra = CASES[case]
    if (workdir, case) not in _built:
        ckpt = make_tiny_checkpoint(workdir / f"ckpt-{case}", family, "float32", seed=1, **extra, **overrides)
        _built[workdir, case] = Built(ckpt, open_checkpoint(ckpt).config, {})
    b = _built[workdir, case]
    if dtype not in b.bundles:
        bundle = workdir / f"bundle-{case}-{dtype}"
        compile_model_library(b.cfg, dtype, "host", CONTEXT, CHUNK, bundle / "model.so")
        write_tensor_cache(b.ckpt, b.cfg, dtype, bundle)
        # The engine reads only what a manifest lists: a bundle without the tokenizer, not without one.
        write_manifest(bundle, Manifest(
            architecture=b.cfg.architecture, family=b.cfg.family, config=b.cfg.to_dict(), parameters=0, dtype=dtype,
            target="host", target_triple="host", context_window=CONTEXT, prefill_chunk=CHUNK, library="model.so",
            weights_index="tensor-cache.json", weights_bytes=0, tokenizer_files=[], stop_token_ids=[],
            tvm_version="", edgedeploy_version="", source=str(b.ckpt), created=""))
        b.bundles[dtype] = bundle
    return b, b.bundles[dtype]


def _engine(bundle: Path) -> Engine:
    e = Engine(bundle, "model.so", threads=2)
    e.load()
    return e


def _prompt(cfg: ModelConfig, seed: int = 0) -> list[int]:
    return [int(t) for t in np.random.RandomState(seed).randint(2, cfg.vocab_size, PROMPT_LEN)]


def _reference(ckpt: Path, prompt: list[int], steps: int) -> tuple[list[np.ndarray], list[int]]:
    """Logits after the prompt and after each greedy token fed back, from transformers in FP32."""
    model = load_reference_model(ckpt, "float32")
    logits, tokens = [], []
    with torch.no_grad():
        out = model(torch.tensor([prompt]), use_cache=True)
        for _ in range(steps + 1):
            row = out.logits[0, -1].float().numpy()
            logits.append(row)
            tokens.append(int(row.argmax()))
            out = model(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
    return logits, tokens


@pytest.mark.parametrize("case", list(CASES))
def test_fp32_logits_match_transformers(workdir: Path, case: str) -> None:
    b, bundle = _build(workdir, case, "float32")
    prompt = _prompt(b.cfg)
    ref_logits, ref_tokens = _reference(b.ckpt, prompt, DECODE_STEPS)
    e = _engine(bundle)
    got = [e.prefill_logits(prompt)]
    for tok in ref_tokens[:DECODE_STEPS]:
        got.append(e.decode_logits(tok))
    assert e.seq_len == PROMPT_LEN + DECODE_STEPS
    for step, (g, r) in enumerate(zip(got, ref_logits, strict=True)):
        assert g.dtype == np.float32 and g.shape == (b.cfg.vocab_size,)
        diff = float(np.abs(g - r).max())
        assert diff <= FP32_TOL, f"{case} step {step}: max |diff| {diff}"
    # generate() is greedy and must reproduce the same tokens.
    res = e.generate(prompt, DECODE_STEPS + 1, stop_ids=[])
    assert res.token_ids == ref_tokens
    assert res.prefill_tokens == PROMPT_LEN and res.decode_tokens == DECODE_STEPS


@pytest.mark.parametrize("case", FP16_CASES)
def test_fp16_greedy_matches_transformers_fp32(workdir: Path, case: str) -> None:
    b, bundle = _build(workdir, case, "float16")
    prompt = _prompt(b.cfg, seed=3)
    _, ref_tokens = _reference(b.ckpt, prompt, DECODE_STEPS - 1)
    res = _engine(bundle).generate(prompt, DECODE_STEPS, stop_ids=[])
    assert res.token_ids == ref_tokens
    assert res.finish_reason == "length"


def test_fp16_weights_are_bit_exact(tmp_path: Path) -> None:
    ckpt = make_tiny_checkpoint(tmp_path / "ck", "llama", "float16", seed=2)
    cfg, _ = load_config(ckpt)
    write_tensor_cache(ckpt, cfg, "float16", tmp_path / "out")
    index = json.loads((tmp_path / "out" / "tensor-cache.json").read_text())
    assert (tmp_path / "out" / "ndarray-cache.json").read_text() == (tmp_path / "out" / "tensor-cache.json").read_text()
    rec = {r["name"]: (s["dataPath"], r) for s in index["records"] for r in s["records"]}
    reader = SafetensorsReader(ckpt)
    try:
        src = np.concatenate([reader.read(f"model.layers.0.self_attn.{x}_proj.weight") for x in "qkv"])
        path, r = rec["model.layers.0.self_attn.qkv_proj.weight"]
        raw = (tmp_path / "out" / path).read_bytes()[r["byteOffset"]:r["byteOffset"] + r["nbytes"]]
        assert raw == src.tobytes()
    finally:
        reader.close()


def test_bf16_checkpoint_converts(tmp_path: Path) -> None:
    ckpt = make_tiny_checkpoint(tmp_path / "ck", "llama", "bfloat16", seed=2)
    cfg, _ = load_config(ckpt)
    write_tensor_cache(ckpt, cfg, "float32", tmp_path / "out")
    index = json.loads((tmp_path / "out" / "tensor-cache.json").read_text())
    path, r = next((s["dataPath"], r) for s in index["records"] for r in s["records"]
                   if r["name"] == "model.embed_tokens.weight")
    got = np.frombuffer((tmp_path / "out" / path).read_bytes(), np.float32, r["nbytes"] // 4, r["byteOffset"])
    from safetensors.torch import load_file

    ref = load_file(str(ckpt / "model.safetensors"))["model.embed_tokens.weight"].float().numpy().reshape(-1)
    assert np.array_equal(got, ref)


def test_tensor_cache_loads_with_tvm_loader(workdir: Path) -> None:
    import tvm

    b, bundle = _build(workdir, "llama-gqa-untied", "float32")
    tvm.get_global_func("vm.builtin.tensor_cache.load")(str(bundle), tvm.cpu().dlpack_device_type(), 0)
    try:
        arr = tvm.get_global_func("vm.builtin.tensor_cache.get")("model.norm.weight")
        assert tuple(arr.shape) == (b.cfg.hidden_size,)
    finally:
        tvm.get_global_func("vm.builtin.tensor_cache.clear")()


def test_runtime_guards(workdir: Path) -> None:
    b, bundle = _build(workdir, "llama-gqa-untied", "float32")
    e = _engine(bundle)
    with pytest.raises(InputError, match="context window"):
        e.generate([5] * (CONTEXT + 1), 4, [])
    with pytest.raises(InputError, match="vocabulary"):
        e.prefill_logits([5, b.cfg.vocab_size])
    with pytest.raises(InputError, match="empty prompt"):
        e.prefill_logits([])
    # A prompt that exactly fills the window is fine; the next token no longer fits.
    e.prefill_logits([7] * CONTEXT)
    with pytest.raises(InputError, match="KV cache full"):
        e.decode_logits(7)
    res = e.generate([7] * (CONTEXT - 3), 50, [])
    assert res.finish_reason == "context" and len(res.token_ids) == 4
    stop = res.token_ids[0]
    assert e.generate([7] * 20, 50, [stop]).finish_reason == "stop"
    e.touch_kv_cache()
    assert e.seq_len == 0


def test_runner_process_has_no_torch(workdir: Path) -> None:
    _, bundle = _build(workdir, "llama-gqa-untied", "float32")
    code = (
        "import sys, json\n"
        "from edgedeploy.runtime.engine import Engine\n"
        f"e = Engine({str(bundle)!r}, 'model.so'); e.load()\n"
        "r = e.generate(list(range(2, 42)), 8, [])\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'relax': 'tvm.relax' in sys.modules,"
        " 'n': len(r.token_ids)}))\n"
    )
    env = {**os.environ, "TVM_USE_RUNTIME_LIB": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info == {"torch": False, "relax": False, "n": 8}


def _elf_machine(data: bytes) -> int:
    assert data[:4] == b"\x7fELF", "not an ELF file"
    return int.from_bytes(data[18:20], "little")


@pytest.mark.parametrize("target", ["android", "android-opencl"])
def test_android_library_is_aarch64_elf(workdir: Path, target: str) -> None:
    b, _ = _build(workdir, "llama-gqa-untied", "float32")
    out = compile_model_library(b.cfg, "float16", target, CONTEXT, CHUNK, workdir / f"lib-{target}.tar")
    with tarfile.open(out) as tf:
        members = [m for m in tf.getmembers() if m.isfile()]
        assert members
        blobs = {m.name: tf.extractfile(m).read() for m in members}
    for name, data in blobs.items():
        assert name.endswith(".o")
        assert _elf_machine(data) == 183, name  # EM_AARCH64
    if target == "android-opencl":
        assert any(b"__kernel" in data for data in blobs.values()), "no OpenCL C embedded"
    with pytest.raises(InputError, match="produces a .tar"):
        compile_model_library(b.cfg, "float16", target, CONTEXT, CHUNK, workdir / "lib.so")
