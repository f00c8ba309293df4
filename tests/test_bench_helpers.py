"""The cheap, deterministic parts of bench/speed.py: checkpoint writer, tokenizer, llama-bench parsing, helpers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import llamacpp  # noqa: E402
import models  # noqa: E402
import speed  # noqa: E402

TINY_LLAMA = {**models._LLAMA_COMMON, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 600, "max_position_embeddings": 128}


def tiny_phi(**over: object) -> dict:
    cfg = {**models.model_config("phi-2"), "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 700, "bos_token_id": 650,
           "eos_token_id": 650}
    cfg.update(over)
    return cfg


def _load(ckpt: Path):
    import torch
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float16, output_loading_info=True)
    return model, info


@pytest.mark.parametrize("cfg, style", [
    (TINY_LLAMA, "llama"),
    ({**TINY_LLAMA, "tie_word_embeddings": True, "attention_bias": True, "head_dim": 24}, "llama"),
    (tiny_phi(), "gpt2"),
    (tiny_phi(qk_layernorm=True), "gpt2"),
], ids=["llama-gqa", "llama-tied-bias-headdim", "phi", "phi-qk-layernorm"])
def test_written_checkpoint_is_what_transformers_loads(tmp_path: Path, cfg: dict, style: str) -> None:
    ckpt = models.write_checkpoint(cfg, tmp_path / "ckpt", style, max_shard_bytes=40_000)
    model, info = _load(ckpt)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    written = models.tensor_shapes(cfg)
    state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if cfg.get("tie_word_embeddings"):
        assert state.pop("lm_head.weight") == written["model.embed_tokens.weight"]
    assert state == written
    # sharded, with an index that covers every tensor and the bytes written
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(written)
    assert index["metadata"]["total_size"] == models.weights_bytes(cfg)
    assert len(set(index["weight_map"].values())) > 1
    # norms 1, biases 0, the rest small random FP16
    sd = model.state_dict()
    for name, t in sd.items():
        if name.endswith(".bias"):
            assert not t.any()
        elif models._is_norm_weight(name):
            assert (t == 1).all()
    emb = sd["model.embed_tokens.weight"].float()
    assert 0.015 < float(emb.std()) < 0.025


def test_random_values_do_not_depend_on_sharding(tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    one = models.write_checkpoint(TINY_LLAMA, tmp_path / "one", "llama", max_shard_bytes=1 << 30)
    many = models.write_checkpoint(TINY_LLAMA, tmp_path / "many", "llama", max_shard_bytes=30_000)
    a = load_file(str(one / "model.safetensors"))
    b: dict[str, np.ndarray] = {}
    for f in sorted(many.glob("model-*.safetensors")):
        b.update(load_file(str(f)))
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert all(v.dtype == np.float16 for v in a.values())


def test_shard_plan_keeps_order_and_limit() -> None:
    shapes = {"a": (10,), "b": (20,), "c": (100,), "d": (5,)}
    assert models.shard_plan(shapes, 64) == [["a", "b"], ["c"], ["d"]]
    assert models.shard_plan(shapes, 10_000) == [["a", "b", "c", "d"]]


@pytest.mark.parametrize("style, cfg", [("llama", TINY_LLAMA), ("gpt2", tiny_phi())])
def test_tokenizer_covers_the_whole_vocabulary(tmp_path: Path, style: str, cfg: dict) -> None:
    from transformers import AutoTokenizer

    models.write_tokenizer(tmp_path, **models.tokenizer_for(cfg, style))
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tok) == cfg["vocab_size"]
    assert sorted(tok.get_vocab().values()) == list(range(cfg["vocab_size"]))
    assert tok.convert_ids_to_tokens(cfg["eos_token_id"]) == tok.eos_token
    text = "hello world, the quick brown fox"
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text
    raw = json.loads((tmp_path / "tokenizer.json").read_text())
    if style == "llama":
        # what gguf.LlamaHfVocab accepts (llama.cpp's converter, no sentencepiece model needed)
        assert raw["model"]["type"] == "BPE" and raw["model"]["byte_fallback"]
        assert raw["decoder"]["type"] == "Sequence"
        assert tok(text).input_ids[0] == cfg["bos_token_id"]
        assert not llamacpp._byte_level_bpe(tmp_path)
    else:
        assert llamacpp._byte_level_bpe(tmp_path)


def test_prompt_ids_are_fixed_and_plain() -> None:
    cfg = models.model_config("phi-2")
    ids = models.prompt_ids(cfg, 2000)
    assert ids == models.prompt_ids(cfg, 2000) and len(ids) == 2000
    assert ids != models.prompt_ids(cfg, 2000, seed=1)
    assert cfg["eos_token_id"] not in ids and min(ids) > 2 and max(ids) < cfg["vocab_size"]


def test_bench_model_configs() -> None:
    tiny = models.model_config("1.1b")
    assert (tiny["num_hidden_layers"], tiny["hidden_size"], tiny["intermediate_size"], tiny["num_attention_heads"],
            tiny["num_key_value_heads"], tiny["vocab_size"]) == (22, 2048, 5632, 32, 4, 32000)
    assert sum(np.prod(s) for s in models.tensor_shapes(tiny).values()) == 1_100_048_384
    phi = models.model_config("phi-2")
    assert sum(np.prod(s) for s in models.tensor_shapes(phi).values()) == 2_779_683_840  # README's count
    assert models.checkpoint_key(phi, "gpt2", 0) != models.checkpoint_key(phi, "gpt2", 1)


def test_interrupted_checkpoint_write_is_never_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(models.MODELS, "tiny", {"tokenizer": "llama", "config": TINY_LLAMA})

    def boom(*args: object, **kwargs: object) -> int:
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(models, "write_weights", boom)
        with pytest.raises(KeyboardInterrupt):
            models.cached_checkpoint("tiny", tmp_path)
    assert list(tmp_path.iterdir()) == []
    # a partial folder left by a killed process is removed, not reused
    stale = tmp_path / f".ckpt-tiny-{models.checkpoint_key(TINY_LLAMA, 'llama', 0)}.partial-999999999"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    ckpt, written = models.cached_checkpoint("tiny", tmp_path)
    assert written and not stale.exists() and (ckpt / "tokenizer.json").is_file()
    assert models.cached_checkpoint("tiny", tmp_path) == (ckpt, False)


LLAMA_BENCH_JSON = """build: 0c1e570 (1) with cc for x86_64-linux-gnu
[
  {
    "build_commit": "0c1e570",
    "build_number": 1,
    "cpu_info": "AMD EPYC",
    "model_filename": "m.gguf",
    "model_size": 268435456,
    "model_n_params": 134217728,
    "n_threads": 2,
    "flash_attn": 0,
    "n_prompt": 512,
    "n_gen": 0,
    "n_depth": 0,
    "avg_ts": 700.5,
    "stddev_ts": 3.1,
    "samples_ns": [ 1, 2, 3 ],
    "samples_ts": [ 697.0, 700.0, 704.5 ]
  },
  {
    "build_commit": "0c1e570",
    "build_number": 1,
    "cpu_info": "AMD EPYC",
    "model_size": 268435456,
    "model_n_params": 134217728,
    "n_threads": 2,
    "flash_attn": 1,
    "n_prompt": 512,
    "n_gen": 0,
    "n_depth": 0,
    "avg_ts": 650.0,
    "stddev_ts": 1.0,
    "samples_ns": [ 1, 2, 3 ],
    "samples_ts": [ 649.0, 650.0, 651.0 ]
  },
  {
    "build_commit": "0c1e570",
    "n_threads": 2,
    "flash_attn": 1,
    "n_prompt": 0,
    "n_gen": 16,
    "n_depth": 512,
    "avg_ts": 70.0,
    "stddev_ts": 1.0,
    "samples_ts": [ 69.0, 72.0, 70.0 ]
  }
]
"""


def test_parse_llama_bench_json() -> None:
    tests = llamacpp.parse_bench_json(LLAMA_BENCH_JSON)
    assert [(t["phase"], t["tokens"], t["depth"], t["flash_attn"]) for t in tests] == [
        ("prefill", 512, 0, "off"), ("prefill", 512, 0, "on"), ("decode", 16, 512, "on")]
    assert tests[0]["median_tok_s"] == 700.0 and tests[2]["samples_tok_s"] == [69.0, 72.0, 70.0]
    assert llamacpp.best(tests, "prefill")["flash_attn"] == "off"
    assert llamacpp.best(tests, "decode")["median_tok_s"] == 70.0
    with pytest.raises(llamacpp.Unavailable):
        llamacpp.parse_bench_json("error: failed to load model")


def test_llamacpp_unavailable_is_a_reason_not_a_crash(tmp_path: Path) -> None:
    with pytest.raises(llamacpp.Unavailable, match="no-such-tool"):
        llamacpp._run(["no-such-tool-edgedeploy"], "x", tmp_path / "log")
    with pytest.raises(llamacpp.Unavailable, match=r"exit 3.*boom"):
        llamacpp._run([sys.executable, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)"], "x",
                      tmp_path / "log")


def test_cache_root_honours_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert llamacpp.cache_root() == tmp_path / "edgedeploy"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert llamacpp.cache_root() == Path.home() / ".cache" / "edgedeploy"


def test_speed_helpers() -> None:
    assert speed.parse_cache_size("32768K\n") == 32 << 20
    assert speed.parse_cache_size("1M") == 1 << 20
    # 100 weight bytes of which a 10x2 FP16 embedding table (40 bytes): 60 + one row (4) + KV 8 B/token at 10 tokens
    assert speed.decode_bytes_per_token(2, 10, 8, "float16", 100, 10) == 60 + 4 + 80
    s = speed.stats([3.0, 1.0, 2.0])
    assert (s["median"], s["min"], s["max"]) == (2.0, 1.0, 3.0)
    args = speed.parse_args(["--sizes", "134m,phi-2", "--prompts", "512,2000", "--reps", "2"])
    assert args.sizes == ["134m", "phi-2"] and args.prompts == [512, 2000] and args.context == 2048
    for bad in (["--sizes", "7b"], ["--prompts", "2040"], ["--reps", "0"]):
        with pytest.raises(SystemExit):
            speed.parse_args(bad)


def test_add_ratios_skips_a_missing_column() -> None:
    pr = {"ours": {"prefill": {"median": 10.0}, "decode": {"median": 4.0}},
          "eager": {"prefill": {"median": 20.0}, "decode": {"median": 2.0}},
          "llamacpp": {"skipped": "not built"}, "roofline_decode_tok_s": 5.0}
    speed.add_ratios(pr)
    assert pr["prefill_ours_over_eager"] == 0.5 and pr["decode_ours_over_eager"] == 2.0
    assert "decode_ours_over_llamacpp" not in pr and "llamacpp_decode_roofline_fraction" not in pr
    assert pr["ours_decode_roofline_fraction"] == 0.8


def test_bandwidth_probe_and_cpu_share_shapes() -> None:
    share = speed.CpuShare()
    bw = speed.measure_read_bandwidth(2, 8 << 20, repeat=2)
    assert bw["bytes"] == 8 << 20 and bw["kernel"] in speed.READ_KERNELS
    assert bw["min"] <= bw["median"] <= bw["max"] and set(bw["kernels"]) == set(speed.READ_KERNELS)
    got = share.stop()
    assert set(got) == {"others_pct", "steal_pct"} and all(v >= 0 for v in got.values())


def test_remove_stale_keeps_live_partials(tmp_path: Path) -> None:
    import os

    dead, live = tmp_path / ".x.partial-999999999", tmp_path / f".x.partial-{os.getpid()}"
    dead.mkdir()
    live.write_text("")
    llamacpp.remove_stale(tmp_path, ".x.partial-")
    assert not dead.exists() and live.exists()


def test_llamacpp_failure_becomes_a_skip_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> Path:
        raise OSError("disk full")

    monkeypatch.setattr(llamacpp, "fetch_source", broken)
    lcpp = speed.LlamaCpp(tmp_path, enabled=True)
    assert lcpp.binary is None and "disk full" in lcpp.reason
    args = speed.parse_args(["--sizes", "134m"])
    assert speed.bench_llamacpp(lcpp, tmp_path, tmp_path, args, 512, "134m") == {"skipped": lcpp.reason}
    assert speed.LlamaCpp(tmp_path, enabled=False).reason == "skipped (--skip-llamacpp)"
