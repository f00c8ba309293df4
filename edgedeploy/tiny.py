"""Tiny random-weight checkpoints of every supported architecture, made with transformers.

No weights can be downloaded where edgedeploy is developed and tested, so the demo and the tests
build their own models here. The checkpoints are real Hugging Face folders (config.json,
safetensors, tokenizer.json) and transformers itself is the numeric reference for them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: Small sizes shared by every family; tests override single fields (GQA, head dim, pruning).
TINY_SIZES: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "max_position_embeddings": 512,
}

FAMILIES = ("llama", "qwen2", "phi", "qwen")

_CORPUS = (
    "hello world. the quick brown fox jumps over the lazy dog. edgedeploy builds small language models "
    "for phones with twelve gigabytes of memory and measures how fast they run. once upon a time there "
    "was a little model that wanted to fit on a phone. it was pruned and trained and compiled. "
    "what is the capital of france? paris is the capital of france. 1 2 3 4 5 6 7 8 9 10. "
)


def make_tokenizer(out_dir: Path, vocab_size: int = 384) -> None:
    """Train a byte-level BPE tokenizer on a built-in text and save it as a Hugging Face tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "add_bos_token": False, "model_max_length": TINY_SIZES["max_position_embeddings"],
    }, indent=2))


def _hf_config(family: str, dtype: str, overrides: dict[str, Any]) -> Any:
    from transformers import LlamaConfig, PhiConfig, Qwen2Config

    sizes = {**TINY_SIZES, "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": False, **overrides}
    if family == "llama":
        return LlamaConfig(**sizes, torch_dtype=dtype)
    if family in ("qwen2", "qwen"):
        if family == "qwen":  # Qwen v1 is multi-head attention only
            sizes["num_key_value_heads"] = sizes["num_attention_heads"]
        return Qwen2Config(**sizes, torch_dtype=dtype)
    if family == "phi":
        sizes.setdefault("partial_rotary_factor", 0.4)
        return PhiConfig(**sizes, torch_dtype=dtype)
    raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")


def _to_qwen_v1(model: Any, out_dir: Path, dtype: str) -> None:
    """Save a Qwen2 model (MHA) under Qwen v1's remote-code names and config fields."""
    import torch
    from safetensors.torch import save_file

    cfg = model.config
    sd = model.state_dict()
    tensors: dict[str, torch.Tensor] = {"transformer.wte.weight": sd["model.embed_tokens.weight"]}
    for i in range(cfg.num_hidden_layers):
        s, d = f"model.layers.{i}", f"transformer.h.{i}"
        tensors[f"{d}.ln_1.weight"] = sd[f"{s}.input_layernorm.weight"]
        for kind in ("weight", "bias"):
            tensors[f"{d}.attn.c_attn.{kind}"] = torch.cat(
                [sd[f"{s}.self_attn.{p}_proj.{kind}"] for p in "qkv"], dim=0)
        tensors[f"{d}.attn.c_proj.weight"] = sd[f"{s}.self_attn.o_proj.weight"]
        tensors[f"{d}.ln_2.weight"] = sd[f"{s}.post_attention_layernorm.weight"]
        # Qwen v1 computes c_proj(w1(x) * silu(w2(x))): w2 is the gate, w1 the up projection.
        tensors[f"{d}.mlp.w1.weight"] = sd[f"{s}.mlp.up_proj.weight"]
        tensors[f"{d}.mlp.w2.weight"] = sd[f"{s}.mlp.gate_proj.weight"]
        tensors[f"{d}.mlp.c_proj.weight"] = sd[f"{s}.mlp.down_proj.weight"]
    tensors["transformer.ln_f.weight"] = sd["model.norm.weight"]
    if not cfg.tie_word_embeddings:
        tensors["lm_head.weight"] = sd["lm_head.weight"]
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / "model.safetensors"),
              metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps({
        "architectures": ["QWenLMHeadModel"], "model_type": "qwen", "hidden_size": cfg.hidden_size,
        "intermediate_size": 2 * cfg.intermediate_size, "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads, "kv_channels": cfg.hidden_size // cfg.num_attention_heads,
        "rotary_emb_base": cfg.rope_parameters["rope_theta"], "rotary_pct": 1.0,
        "layer_norm_epsilon": cfg.rms_norm_eps, "seq_length": cfg.max_position_embeddings,
        "vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_word_embeddings, "no_bias": True,
        "torch_dtype": dtype, "bos_token_id": 0, "eos_token_id": 1,
    }, indent=2))


def make_tiny_checkpoint(out_dir: Path | str, family: str = "llama", dtype: str = "float16", seed: int = 0,
                         max_shard_size: str | None = None, **overrides: Any) -> Path:
    """Write a random-weight checkpoint of ``family`` with a tokenizer to ``out_dir``; return the folder.

    ``overrides`` replace fields of :data:`TINY_SIZES` (e.g. ``num_key_value_heads=4``,
    ``head_dim=24``, ``tie_word_embeddings=True``). ``max_shard_size`` (e.g. ``"40KB"``) writes a
    sharded checkpoint with ``model.safetensors.index.json``. Qwen v1 checkpoints are a Qwen2 model
    saved under Qwen v1's names, so :func:`load_reference_model` gives their transformers twin.
    """
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = reference_model_from_config(_hf_config(family, dtype, overrides))
    # Random init gives near-uniform logits; larger weights make greedy tokens well separated.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
            elif not _is_norm_param(p, model):
                p.normal_(0.0, 0.02)
    model = model.to(getattr(torch, dtype))
    if family == "qwen":
        _to_qwen_v1(model, out, dtype)
    else:
        kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
        model.save_pretrained(out, safe_serialization=True, **kwargs)
    make_tokenizer(out)
    return out


def _is_norm_param(p: Any, model: Any) -> bool:
    return any(p is q for n, q in model.named_parameters() if "norm" in n and n.endswith("weight"))


def reference_model_from_config(hf_config: Any) -> Any:
    """A transformers causal LM for ``hf_config`` in eager attention, on the CPU."""
    from transformers import AutoModelForCausalLM

    hf_config._attn_implementation = "eager"
    return AutoModelForCausalLM.from_config(hf_config).eval()


def load_reference_model(model_dir: Path | str, dtype: str = "float32") -> Any:
    """Load a tiny checkpoint into transformers (Qwen v1 names mapped back onto Qwen2) for parity tests."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, Qwen2Config

    model_dir = Path(model_dir)
    raw = json.loads((model_dir / "config.json").read_text())
    if raw.get("model_type") != "qwen":
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype),
                                                     attn_implementation="eager")
        return model.eval()
    heads = raw["num_attention_heads"]
    cfg = Qwen2Config(hidden_size=raw["hidden_size"], intermediate_size=raw["intermediate_size"] // 2,
                      num_hidden_layers=raw["num_hidden_layers"], num_attention_heads=heads,
                      num_key_value_heads=heads, vocab_size=raw["vocab_size"],
                      max_position_embeddings=raw["seq_length"], rms_norm_eps=raw["layer_norm_epsilon"],
                      rope_theta=raw["rotary_emb_base"], tie_word_embeddings=raw["tie_word_embeddings"])
    model = reference_model_from_config(cfg)
    src = load_file(str(model_dir / "model.safetensors"))
    sd: dict[str, Any] = {"model.embed_tokens.weight": src["transformer.wte.weight"],
                          "model.norm.weight": src["transformer.ln_f.weight"]}
    for i in range(cfg.num_hidden_layers):
        s, d = f"transformer.h.{i}", f"model.layers.{i}"
        sd[f"{d}.input_layernorm.weight"] = src[f"{s}.ln_1.weight"]
        for kind in ("weight", "bias"):
            q, k, v = src[f"{s}.attn.c_attn.{kind}"].chunk(3, dim=0)
            sd[f"{d}.self_attn.q_proj.{kind}"], sd[f"{d}.self_attn.k_proj.{kind}"] = q, k
            sd[f"{d}.self_attn.v_proj.{kind}"] = v
        sd[f"{d}.self_attn.o_proj.weight"] = src[f"{s}.attn.c_proj.weight"]
        sd[f"{d}.post_attention_layernorm.weight"] = src[f"{s}.ln_2.weight"]
        sd[f"{d}.mlp.up_proj.weight"] = src[f"{s}.mlp.w1.weight"]
        sd[f"{d}.mlp.gate_proj.weight"] = src[f"{s}.mlp.w2.weight"]
        sd[f"{d}.mlp.down_proj.weight"] = src[f"{s}.mlp.c_proj.weight"]
    if not cfg.tie_word_embeddings:
        sd["lm_head.weight"] = src["lm_head.weight"]
    model.load_state_dict(sd, strict=not cfg.tie_word_embeddings)
    return model.to(getattr(torch, dtype)).eval()
