"""Tiny tokenizer files in formats that transformers cannot write, for tiny checkpoints of real layouts.

A real Qwen-7B (v1) checkpoint ships ``qwen.tiktoken`` and no ``tokenizer.json``. :func:`write_qwen_tiktoken`
learns a small byte-level BPE vocabulary from a built-in text with Qwen v1's pre-tokenizer pattern and
writes it in that format (``BASE64_TOKEN RANK`` per line: all 256 single bytes, then merges in the order
they were learned, so every token's rank is above its parts' as tiktoken expects).
:func:`make_tiny_qwen_v1_checkpoint` turns a tiny ``qwen`` checkpoint into that layout.
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from pathlib import Path
from typing import Any

from edgedeploy.runtime.tokenizer import QWEN_PATTERN, QWEN_SPECIAL_TOKENS, QWEN_TIKTOKEN

#: What the tiny vocabulary is learned from: English, numbers, some Chinese (Qwen's other language).
CORPUS = (
    "hello world. the quick brown fox jumps over the lazy dog. edgedeploy builds small language models "
    "for phones with twelve gigabytes of memory and measures how fast they run. once upon a time there "
    "was a little model that wanted to fit on a phone. it was pruned and trained and compiled. "
    "what is the capital of france? paris is the capital of france. in 2024 there were 12 teams and 1234 "
    "prompts. 你好，世界。手机上的模型。\n"
)


def learn_byte_bpe(text: str, n_ranks: int, pattern: str = QWEN_PATTERN) -> dict[bytes, int]:
    """``{token: rank}``: the 256 single bytes (rank = byte value), then up to ``n_ranks - 256`` merges.

    Plain BPE: the text is split with ``pattern`` into words of UTF-8 bytes, and the most frequent
    adjacent pair (ties: the smallest pair) is merged and given the next rank, until ``n_ranks`` tokens
    exist or no pair occurs twice.
    """
    import regex

    if n_ranks < 256:
        raise ValueError(f"a byte-level vocabulary needs at least 256 ranks, got {n_ranks}")
    ranks = {bytes([b]): b for b in range(256)}
    words = Counter(tuple(bytes([b]) for b in w.encode("utf-8")) for w in regex.findall(pattern, text))
    while len(ranks) < n_ranks:
        pairs: Counter[tuple[bytes, bytes]] = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:], strict=False):
                pairs[pair] += count
        if not pairs:
            break
        best, count = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        if count < 2:
            break
        merged = best[0] + best[1]
        if merged not in ranks:
            ranks[merged] = len(ranks)
        new_words: Counter[tuple[bytes, ...]] = Counter()
        for word, c in words.items():
            out: list[bytes] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new_words[tuple(out)] += c
        words = new_words
    return ranks


def write_qwen_tiktoken(path: Path | str, n_ranks: int, text: str = CORPUS * 4) -> dict[bytes, int]:
    """Write a ``qwen.tiktoken`` of at most ``n_ranks`` ranks learned from ``text``; return the ranks."""
    ranks = learn_byte_bpe(text, n_ranks)
    lines = [f"{base64.b64encode(tok).decode('ascii')} {rank}\n" for tok, rank in sorted(ranks.items(),
                                                                                          key=lambda kv: kv[1])]
    Path(path).write_text("".join(lines), encoding="ascii")
    return ranks


def make_tiny_qwen_v1_checkpoint(out_dir: Path | str, **kwargs: Any) -> Path:
    """A tiny ``qwen`` checkpoint (:func:`~edgedeploy.tiny.make_tiny_checkpoint`) with Qwen v1's tokenizer files.

    ``tokenizer.json`` goes; ``qwen.tiktoken`` fills the vocabulary up to where Qwen's 208 special
    tokens end exactly at config.json's ``vocab_size``; ``tokenizer_config.json`` is Qwen-7B's (it names
    the remote-code class and no eos token). ``kwargs`` go to ``make_tiny_checkpoint``.
    """
    from edgedeploy.tiny import make_tiny_checkpoint

    out = make_tiny_checkpoint(out_dir, "qwen", **kwargs)
    vocab = json.loads((out / "config.json").read_text())["vocab_size"]
    (out / "tokenizer.json").unlink()
    write_qwen_tiktoken(out / QWEN_TIKTOKEN, vocab - len(QWEN_SPECIAL_TOKENS))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": 8192, "tokenizer_class": "QWenTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]},
    }, indent=2))
    return out
