"""Qwen v1 checkpoints tokenize with their ``qwen.tiktoken`` (no tokenizer.json): the tokenizer itself, then
build, ``run --prompt`` and a virtual-phone profile with parity against transformers (issue #10, item 2)."""

from __future__ import annotations

import base64
import json
import shutil
import unicodedata
from pathlib import Path

import pytest

from edgedeploy.cli import main
from edgedeploy.errors import InputError
from edgedeploy.runtime.tokenizer import (
    QWEN_PATTERN,
    QWEN_SPECIAL_TOKENS,
    load_tokenizer,
    open_tokenizer,
    read_tiktoken_ranks,
)
from edgedeploy.tiny_tokenizers import CORPUS, make_tiny_qwen_v1_checkpoint, write_qwen_tiktoken

from .test_virtual_phone import Phone

CONTEXT, CHUNK = 128, 32
TEXTS = ["hello world, the capital of france is paris.", "In 2024 there were 1234 prompts!\n\n  ok",
         "你好，世界 — naïve café", "it's   spaced\tout  \r\n", ""]


def _reference_bpe(text: str, ranks: dict[bytes, int]) -> list[int]:
    """Qwen's algorithm written out plainly: NFC, split with its pattern, then merge the lowest-ranked pair."""
    import regex

    ids = []
    for word in regex.findall(QWEN_PATTERN, unicodedata.normalize("NFC", text)):
        parts = [bytes([b]) for b in word.encode("utf-8")]
        while True:
            pairs = [(ranks[a + b], i) for i, (a, b) in enumerate(zip(parts, parts[1:], strict=False))
                     if a + b in ranks]
            if not pairs:
                break
            i = min(pairs)[1]
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        ids += [ranks[p] for p in parts]
    return ids


@pytest.fixture(scope="module")
def tiktoken_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "qwen.tiktoken"
    write_qwen_tiktoken(path, 512 - len(QWEN_SPECIAL_TOKENS))
    return path


# -- the tokenizer ------------------------------------------------------------------------------------

def test_tiny_file_is_a_byte_level_bpe_of_the_requested_size(tiktoken_file: Path) -> None:
    ranks = read_tiktoken_ranks(tiktoken_file)
    assert sorted(ranks.values()) == list(range(304))
    assert all(ranks[bytes([b])] == b for b in range(256))
    # Every merged token is ranked after the two tokens it was made of (what tiktoken's merge order needs).
    merged = sorted((r, t) for t, r in ranks.items() if len(t) > 1)
    assert merged and all(any(t[:k] in ranks and t[k:] in ranks and max(ranks[t[:k]], ranks[t[k:]]) < r
                                  for k in range(1, len(t))) for r, t in merged)


def test_encode_matches_qwen_bpe_and_decodes_back(tiktoken_file: Path) -> None:
    tok = load_tokenizer(tiktoken_file)
    ranks = read_tiktoken_ranks(tiktoken_file)
    for text in [*TEXTS, CORPUS]:
        ids = tok.encode(text)
        assert ids == _reference_bpe(text, ranks), text
        assert tok.decode(ids) == unicodedata.normalize("NFC", text)
    assert len(tok.encode(CORPUS)) < len(CORPUS.encode("utf-8")) * 0.7  # the merges are used


def test_special_tokens_follow_the_ranks_as_qwen_defines_them(tiktoken_file: Path) -> None:
    tok = load_tokenizer(tiktoken_file)
    assert tok.token_to_id("<|endoftext|>") == 304
    assert tok.token_to_id("<|im_start|>") == 305 and tok.token_to_id("<|im_end|>") == 306
    assert tok.token_to_id("<|extra_0|>") == 307 and tok.token_to_id("<|extra_204|>") == 511
    assert tok.token_to_id("<|extra_205|>") is None and tok.token_to_id(" the") is not None
    assert tok.default_eos == "<|endoftext|>"
    # Special-token text in the input is the special token (Qwen's allowed_special="all"), no BOS is added.
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 305 and ids[-1] == 306 and 304 not in ids
    assert tok.decode(ids) == "user\nhi"  # skip_special_tokens drops every id from <|endoftext|> on
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>"
    assert tok.decode([104, 600, 105]) == "hi"  # an id outside the vocabulary has no text


def test_digits_are_split_one_by_one(tmp_path: Path, tiktoken_file: Path) -> None:
    """Qwen's pattern has ``\\p{N}`` where GPT-4's has ``\\p{N}{1,3}``: a "12" merge must never apply."""
    import tiktoken

    lines = tiktoken_file.read_text().splitlines()
    path = tmp_path / "qwen.tiktoken"
    path.write_text("\n".join([*lines, f"{base64.b64encode(b'12').decode()} {len(lines)}"]) + "\n")
    tok = load_tokenizer(path)
    assert tok.encode("12") == [ord("1"), ord("2")]
    ranks = read_tiktoken_ranks(path)
    gpt4_style = tiktoken.Encoding("x", pat_str=QWEN_PATTERN.replace(r"\p{N}|", r"\p{N}{1,3}|"),
                                   mergeable_ranks=ranks, special_tokens={})
    assert gpt4_style.encode("12") == [len(lines)]  # the test would see a wrong pattern


def test_nfc_normalisation(tiktoken_file: Path) -> None:
    tok = load_tokenizer(tiktoken_file)
    assert tok.encode("cafe\u0301") == tok.encode("caf\u00e9")


@pytest.mark.parametrize("content, needle", [
    ("aGk= 0\nnot-a-line\n", "line 2 is not 'BASE64_TOKEN RANK'"),
    ("!!!! 3\n", "line 1: the token is not valid base64"),
    ("aGk= 0\naGk= 1\n", "line 2: a duplicate token or rank"),
    ("aGk= 99999999999\n", "line 1 is not 'BASE64_TOKEN RANK'"),
    ("aGk= 2147483647\n", "line 1: rank 2147483647 is not below"),
    ("aGk= 0\n", "not a byte-level BPE vocabulary: 256 single bytes have no token (first: 0x00)"),
])
def test_bad_tiktoken_files_name_the_file(tmp_path: Path, content: str, needle: str) -> None:
    path = tmp_path / "qwen.tiktoken"
    path.write_text(content)
    with pytest.raises(InputError, match="qwen.tiktoken: ") as e:
        load_tokenizer(path)
    assert needle in str(e.value)


def test_a_folder_without_tokenizer_is_named(tmp_path: Path) -> None:
    with pytest.raises(InputError) as e:
        open_tokenizer(tmp_path, "to tokenize the scripted prompts")
    assert str(e.value) == (f"{tmp_path}: no tokenizer (tokenizer.json or qwen.tiktoken) to tokenize the "
                            "scripted prompts")


# -- a tiny Qwen v1 checkpoint with only qwen.tiktoken, built and run ---------------------------------

@pytest.fixture(scope="module")
def qwen_v1(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint, FP32 host bundle) of a tiny Qwen v1 whose tokenizer is only qwen.tiktoken."""
    from edgedeploy.compile.build import build_bundle

    root = tmp_path_factory.mktemp("qwen-v1")
    ckpt = make_tiny_qwen_v1_checkpoint(root / "ckpt", dtype="float32", seed=3)
    bundle = root / "bundle"
    build_bundle(ckpt, bundle, dtype="float32", context_window=CONTEXT, prefill_chunk=CHUNK)
    return ckpt, bundle


def _greedy(ckpt: Path, prompt: list[int], max_new: int, stops: list[int]) -> list[int]:
    """transformers' greedy tokens for ``prompt`` (FP32), ending at a stop id as the runner does."""
    import torch

    from edgedeploy.tiny import load_reference_model

    model = load_reference_model(ckpt, "float32")
    out: list[int] = []
    with torch.no_grad():
        ids = torch.tensor([prompt])
        while len(out) < max_new:
            token = int(model(ids).logits[0, -1].argmax())
            out.append(token)
            if token in stops:
                break
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out


def test_bundle_carries_qwen_tiktoken_and_its_eos(qwen_v1: tuple[Path, Path]) -> None:
    from edgedeploy.bundle import read_manifest

    ckpt, bundle = qwen_v1
    assert not (ckpt / "tokenizer.json").exists() and (ckpt / "qwen.tiktoken").is_file()
    manifest = read_manifest(bundle)
    assert "qwen.tiktoken" in manifest.tokenizer_files and "tokenizer.json" not in manifest.files
    # config.json's eos (1) and Qwen's <|endoftext|>, which its tokenizer_config.json does not name.
    assert manifest.stop_token_ids == [1, 304]


def test_run_prompt_prints_text_equal_to_transformers(qwen_v1: tuple[Path, Path], capsys) -> None:
    ckpt, bundle = qwen_v1
    tok = open_tokenizer(bundle)
    prompt = "what is the capital of france?"
    assert main(["run", str(bundle), "--prompt", prompt, "--max-new-tokens", "12", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    ids = out["result"]["token_ids"]
    assert len(ids) > 4 and ids == _greedy(ckpt, tok.encode(prompt), 12, [1, 304])
    assert out["result"]["prompt_tokens"] == len(tok.encode(prompt))
    assert out["text"] == tok.decode(ids) and out["text"]
    assert main(["run", str(bundle), "--prompt", prompt, "--max-new-tokens", "12"]) == 0
    printed = capsys.readouterr().out
    assert "output:" in printed and out["text"].split()[0] in printed


def test_profile_on_virtual_phone_passes_with_parity(qwen_v1: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    from edgedeploy.profile.prompts import load_prompt_file, tokenize_prompt

    ckpt, bundle = qwen_v1
    phone = Phone(tmp_path / "sandbox")
    try:
        rc = main(["profile", str(bundle), "--device", f"tcp:127.0.0.1:{phone.port}", "--out", str(tmp_path / "r"),
                   "--prompts", "chat-short", "--runs", "1", "--warmup", "0"])
    finally:
        phone.stop()
    assert rc == 0, capsys.readouterr().err
    model = json.loads((tmp_path / "r" / "results.json").read_text())["models"][0]
    assert model["verdict"] == "PASS"
    assert {c["name"]: c["status"] for c in model["checks"]}["parity"] == "PASS"
    prompt = tokenize_prompt(load_prompt_file("chat-short"), open_tokenizer(bundle), CONTEXT)
    run = model["prompts"][0]["runs"][0]
    assert run["prompt_tokens"] == len(prompt.token_ids)
    assert len(run["token_ids"]) > 4
    assert run["token_ids"] == _greedy(ckpt, prompt.token_ids, prompt.max_new_tokens, [1, 304])


def test_no_tokenizer_fails_before_anything_is_pushed(qwen_v1: tuple[Path, Path], tmp_path: Path,
                                                     capsys) -> None:
    from edgedeploy.compile.build import build_bundle

    ckpt = Path(shutil.copytree(qwen_v1[0], tmp_path / "ckpt"))
    (ckpt / "qwen.tiktoken").unlink()
    bundle = tmp_path / "bundle"
    build_bundle(ckpt, bundle, dtype="float32", context_window=CONTEXT, prefill_chunk=CHUNK)
    phone = Phone(tmp_path / "sandbox")
    try:
        rc = main(["profile", str(bundle), "--device", f"tcp:127.0.0.1:{phone.port}", "--keep",
                   "--out", str(tmp_path / "r"), "--prompts", "chat-short", "--runs", "1", "--warmup", "0"])
    finally:
        phone.stop()
    err = capsys.readouterr().err
    assert rc == 2 and f"error: {bundle}: no tokenizer (tokenizer.json or qwen.tiktoken)" in err
    assert "push" not in err
    pushed = [p for p in (phone.tmp / "edgedeploy").rglob("*") if p.is_file()] if (phone.tmp / "edgedeploy").exists() \
        else []
    assert pushed == []  # --keep: anything pushed would still be there
    rc = main(["run", str(bundle), "--prompt", "hi"])
    assert rc == 2 and f"{bundle}: no tokenizer" in capsys.readouterr().err
