"""Bench checkpoints at real sizes: random FP16 weights written straight from a config.json to safetensors.

No torch model is ever built: every tensor a transformers ``LlamaForCausalLM`` or ``PhiForCausalLM``
would load is listed from the config (:func:`tensor_shapes`), drawn with numpy (normal × 0.02, norm
weights 1, biases 0; each tensor seeded by its name, so the shard layout does not change the values)
and written shard by shard (``model-0000K-of-0000N.safetensors`` + ``model.safetensors.index.json``).
A tokenizer with exactly ``vocab_size`` ids is generated too (:func:`write_tokenizer`), in the style the
real model ships, so llama.cpp's converter accepts it (see ``bench/llamacpp.py``) and any id is valid.

Checkpoints are cached in a work folder under a hash of everything that goes into them, written into a
``.NAME.partial-*`` folder first and renamed when complete, so an interrupted write is never reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
#: Bumped when what the writer produces changes, so cached checkpoints are rewritten.
WRITER_VERSION = 1
INIT_STD = 0.02
SHARD_BYTES = 1 << 30

_LLAMA_COMMON: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "attention_bias": False, "mlp_bias": False,
    "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float16",
}

#: The bench models by ``--sizes`` name. ``tokenizer`` is the style of the generated tokenizer.
MODELS: dict[str, dict[str, Any]] = {
    # The original bench model: Llama-style MHA, 134M parameters (~110M of them read per decode step).
    "134m": {"tokenizer": "llama", "config": {
        **_LLAMA_COMMON, "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12,
        "num_attention_heads": 12, "num_key_value_heads": 12, "vocab_size": 32000, "max_position_embeddings": 2048,
    }},
    # TinyLlama-1.1B's shape (GQA, 4 kv heads).
    "1.1b": {"tokenizer": "llama", "config": {
        **_LLAMA_COMMON, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
        "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048,
    }},
    # Phi-2 at full size, from its real config.json (kept in the repo for the estimate tests).
    "phi-2": {"tokenizer": "gpt2", "config_file": "tests/data/reference_configs/phi-2/config.json"},
}


def model_config(name: str) -> dict[str, Any]:
    """The config.json contents of bench model ``name`` (a key of :data:`MODELS`)."""
    spec = MODELS[name]
    if "config_file" in spec:
        return json.loads((REPO_ROOT / spec["config_file"]).read_text())
    return dict(spec["config"])


# -- tensors --------------------------------------------------------------------------------------


def tensor_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a checkpoint of this config.json holds (the family registry's declaration)."""
    from edgedeploy.checkpoint.config import parse_config
    from edgedeploy.models import checkpoint_tensors

    return checkpoint_tensors(parse_config(cfg, "bench config"))


def _is_norm_weight(name: str) -> bool:
    return name.endswith(".weight") and name.rsplit(".", 2)[-2].endswith("norm")


def random_tensor(name: str, shape: tuple[int, ...], seed: int, std: float = INIT_STD) -> np.ndarray:
    """FP16 values of one tensor: biases 0, norm weights 1, everything else normal × ``std`` (seeded by name)."""
    if name.endswith(".bias"):
        return np.zeros(shape, dtype=np.float16)
    if _is_norm_weight(name):
        return np.ones(shape, dtype=np.float16)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    x = rng.standard_normal(shape, dtype=np.float32)
    x *= std
    return x.astype(np.float16)


def shard_plan(shapes: dict[str, tuple[int, ...]], max_bytes: int) -> list[list[str]]:
    """Tensor names grouped in order into shards of at most ``max_bytes`` FP16 bytes (a larger tensor alone)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * int(np.prod(shape))
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def write_weights(cfg: dict[str, Any], out: Path, seed: int = 0, max_shard_bytes: int = SHARD_BYTES) -> int:
    """Write the random FP16 weights of ``cfg`` to ``out`` shard by shard; return the bytes of tensor data."""
    from safetensors.numpy import save_file

    shapes = tensor_shapes(cfg)
    plan = shard_plan(shapes, max_shard_bytes)
    weight_map: dict[str, str] = {}
    total = 0
    for k, names in enumerate(plan, 1):
        fname = "model.safetensors" if len(plan) == 1 else f"model-{k:05d}-of-{len(plan):05d}.safetensors"
        tensors = {n: random_tensor(n, shapes[n], seed) for n in names}
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        total += sum(a.nbytes for a in tensors.values())
        weight_map.update(dict.fromkeys(names, fname))
        del tensors
    if len(plan) > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return total


# -- tokenizer ------------------------------------------------------------------------------------


def _pieces(alphabet: list[str], count: int) -> Iterator[tuple[str, str]]:
    """``count`` (left, right) merges over ``alphabet``: every pair first, then pair + letter, as BPE needs."""
    made = 0
    pairs = [(a, b) for a in alphabet for b in alphabet]
    for a, b in pairs:
        if made == count:
            return
        yield a, b
        made += 1
    for a, b in pairs:
        for c in alphabet:
            if made == count:
                return
            yield a + b, c
            made += 1


def write_tokenizer(out: Path, vocab_size: int, style: str, specials: dict[int, str], max_length: int,
                    bos: str | None, eos: str) -> None:
    """A BPE tokenizer with exactly ``vocab_size`` ids (``specials`` at their ids), saved as Hugging Face files.

    ``style="llama"``: SentencePiece-style BPE (``▁`` for spaces, byte fallback ``<0x00>``..``<0xFF>``, a
    ``Sequence`` decoder), as Llama-2 and TinyLlama ship it. ``style="gpt2"``: byte-level BPE (GPT-2's
    pre-tokenizer), as Phi-2 ships it. The merges are synthetic (no training): each token above the
    alphabet is a pair of shorter tokens, so every id is reachable and the vocabulary is well formed.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    if style == "llama":
        base = [f"<0x{b:02X}>" for b in range(256)]
        letters = ["▁", *"etaoinshrdlcumwfgypbvkjxqzETAOINSHRDLCUMWFGYPBVKJXQZ0123456789.,'-!?:;()\""]
    elif style == "gpt2":
        letters = sorted(pre_tokenizers.ByteLevel.alphabet())
        base = []
    else:
        raise ValueError(f"tokenizer style must be 'llama' or 'gpt2', not {style!r}")
    free = [i for i in range(vocab_size) if i not in specials]
    fixed = base + letters
    merges = list(_pieces(letters, len(free) - len(fixed)))
    tokens = fixed + [a + b for a, b in merges]
    if len(tokens) != len(free) or len(set(tokens)) != len(tokens):
        raise ValueError(f"cannot make a {style} vocabulary of {vocab_size} ids")
    vocab = {**dict(zip(tokens, free, strict=True)), **{s: i for i, s in specials.items()}}
    if style == "llama":
        unk = specials.get(0, "<unk>")
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, byte_fallback=True, fuse_unk=True))
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    else:
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for _, s in sorted(specials.items())])
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, vocab[bos])])
    tok.save(str(out / "tokenizer.json"))
    tok_cfg: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos,
                               "bos_token": bos or eos, "model_max_length": max_length,
                               "add_bos_token": bos is not None, "clean_up_tokenization_spaces": False}
    if style == "llama":
        tok_cfg["unk_token"] = specials.get(0, "<unk>")
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))


def tokenizer_for(cfg: dict[str, Any], style: str) -> dict[str, Any]:
    """Arguments of :func:`write_tokenizer` for ``cfg``: the special tokens at the config's bos/eos ids."""
    bos_id, eos_id = cfg.get("bos_token_id"), cfg.get("eos_token_id")
    if style == "llama":
        specials = {0: "<unk>", bos_id if bos_id is not None else 1: "<s>", eos_id if eos_id is not None else 2: "</s>"}
        bos, eos = "<s>", "</s>"
    else:  # GPT-2 / Phi-2: one <|endoftext|> serves as bos and eos and is not prepended
        specials = {eos_id if eos_id is not None else cfg["vocab_size"] - 1: "<|endoftext|>"}
        bos, eos = None, "<|endoftext|>"
    return {"vocab_size": cfg["vocab_size"], "style": style, "specials": specials,
            "max_length": cfg.get("max_position_embeddings", 2048), "bos": bos, "eos": eos}


def prompt_ids(cfg: dict[str, Any], n: int, seed: int = 0) -> list[int]:
    """``n`` random token ids (fixed seed) from the ids that are not special tokens of the bench tokenizer."""
    special = {0, 1, 2, cfg.get("bos_token_id"), cfg.get("eos_token_id")}
    ids = np.random.RandomState(seed).randint(0, cfg["vocab_size"], 2 * n + 64)
    return [int(i) for i in ids if int(i) not in special][:n]


# -- the cached checkpoint --------------------------------------------------------------------------


def checkpoint_key(cfg: dict[str, Any], style: str, seed: int) -> str:
    blob = json.dumps({"config": cfg, "tokenizer": style, "seed": seed, "std": INIT_STD, "writer": WRITER_VERSION},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def write_checkpoint(cfg: dict[str, Any], out: Path, style: str, seed: int = 0,
                     max_shard_bytes: int = SHARD_BYTES) -> Path:
    """Write config.json, random FP16 weights and a tokenizer for ``cfg`` into ``out`` (an empty or new folder)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id") if cfg.get(k) is not None}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    write_weights(cfg, out, seed, max_shard_bytes)
    write_tokenizer(out, **tokenizer_for(cfg, style))
    return out


def cached_checkpoint(name: str, work: Path, seed: int = 0) -> tuple[Path, bool]:
    """The checkpoint of bench model ``name`` in ``work``, written if missing; (folder, whether it was written)."""
    cfg = model_config(name)
    style = MODELS[name]["tokenizer"]
    final = work / f"ckpt-{name}-{checkpoint_key(cfg, style, seed)}"
    if (final / "config.json").is_file():
        return final, False
    work.mkdir(parents=True, exist_ok=True)
    for stale in work.glob(f".{final.name}.partial-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if not (pid.isdigit() and Path(f"/proc/{pid}").exists()):
            shutil.rmtree(stale, ignore_errors=True)
    partial = work / f".{final.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        write_checkpoint(cfg, partial, style, seed)
        partial.rename(final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return final, True


def weights_bytes(cfg: dict[str, Any]) -> int:
    """FP16 bytes of every tensor the checkpoint stores."""
    return sum(2 * int(np.prod(s)) for s in tensor_shapes(cfg).values())
