"""Tiny random-weight checkpoints of every supported architecture, made with transformers.

No weights can be downloaded where edgedeploy is developed and tested, so the demo and the tests
build their own models here. The checkpoints are real Hugging Face folders (config.json,
safetensors, tokenizer.json) and transformers itself is the numeric reference for them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgedeploy.models import FAMILIES as _FAMILIES
from edgedeploy.models import get_family

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

#: Every supported family (the registry's order).
FAMILIES: tuple[str, ...] = tuple(_FAMILIES)

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
    sizes = {**TINY_SIZES, "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": False, **overrides}
    if family not in _FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")
    return get_family(family).tiny_config(sizes, dtype)


def _config_of(raw: dict[str, Any]) -> Any:
    from edgedeploy.checkpoint.config import parse_config

    return parse_config(raw, "tiny checkpoint")


def _save_as(family: str, model: Any, out_dir: Path, dtype: str) -> None:
    """Save a transformers model of ``family``'s twin under ``family``'s own names and config fields."""
    from safetensors.torch import save_file

    fam = get_family(family)
    assert fam.twin is not None and fam.config_from_twin is not None
    raw = fam.config_from_twin(model.config, dtype)
    twin_cfg = _config_of({**model.config.to_dict(), "architectures": list(get_family(fam.twin).architectures)})
    tensors = _translate(get_family(fam.twin).params(twin_cfg), fam.params(_config_of(raw)), model.state_dict())
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(raw, indent=2))


def _translate(params_from: list, params_to: list, tensors: dict[str, Any]) -> dict[str, Any]:
    from edgedeploy.models.family import translate

    return translate(params_from, params_to, tensors)


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
    if get_family(family).twin:
        _save_as(family, model, out, dtype)
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
    """Load a tiny checkpoint into transformers (a twin family's model for Qwen v1) for parity tests."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model_dir = Path(model_dir)
    raw = json.loads((model_dir / "config.json").read_text())
    fam = get_family(_config_of(raw).family)
    if not fam.twin:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype),
                                                     attn_implementation="eager")
        return model.eval()
    assert fam.twin_config is not None
    twin_hf = fam.twin_config(raw)
    model = reference_model_from_config(twin_hf)
    src: dict[str, Any] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        src.update(load_file(str(f)))
    twin_cfg = _config_of({**twin_hf.to_dict(), "architectures": list(get_family(fam.twin).architectures)})
    sd = _translate(fam.params(_config_of(raw)), get_family(fam.twin).params(twin_cfg), src)
    model.load_state_dict(sd, strict=not twin_hf.tie_word_embeddings)
    return model.to(getattr(torch, dtype)).eval()
