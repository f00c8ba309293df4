"""Scripted prompts (``profiles/prompts/*.json``), tokenized on the host for a bundle.

A prompt file is ``{"name", "text", "max_new_tokens", "fill_to_tokens"?, "suffix"?, "description"?}``.
``fill_to_tokens`` repeats ``text`` until the prompt has that many tokens with the bundle's own
tokenizer, so one file gives a 2k-token prompt for any model. A prompt that does not leave room for
its answer in the bundle's context window is clipped (its head is kept) and the report says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgedeploy.errors import InputError
from edgedeploy.fileio import read_json_object
from edgedeploy.runtime.tokenizer import tokenizer_errors

PROMPTS_DIR = Path(__file__).resolve().parents[2] / "profiles" / "prompts"
DEFAULT_SETS = ("chat-short", "doc-1k", "long-2k")


@dataclass(frozen=True)
class PromptSpec:
    name: str
    text: str
    max_new_tokens: int
    fill_to_tokens: int | None = None
    suffix: str = ""
    description: str = ""


@dataclass
class TokenizedPrompt:
    """A prompt ready for the runner, with what had to be changed to fit the bundle."""

    name: str
    token_ids: list[int]
    max_new_tokens: int
    clipped_from: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "prompt_tokens": len(self.token_ids), "max_new_tokens": self.max_new_tokens,
                "clipped_from": self.clipped_from}


def load_prompt_file(path: Path | str) -> PromptSpec:
    """Read and validate one prompt file; errors name the file and the field."""
    path = Path(path)
    if not path.is_file():
        named = PROMPTS_DIR / f"{path}.json"
        if not named.is_file():
            raise InputError(f"{path}: no such prompt file (built-in sets: {', '.join(DEFAULT_SETS)})")
        path = named
    data = read_json_object(path, "the prompt file")
    text, max_new = data.get("text"), data.get("max_new_tokens", 64)
    if not isinstance(text, str) or not text:
        raise InputError(f"{path}: field 'text' must be a non-empty string")
    if not isinstance(max_new, int) or isinstance(max_new, bool) or max_new < 1:
        raise InputError(f"{path}: field 'max_new_tokens' must be a positive integer")
    fill = data.get("fill_to_tokens")
    if fill is not None and (not isinstance(fill, int) or isinstance(fill, bool) or fill < 1):
        raise InputError(f"{path}: field 'fill_to_tokens' must be a positive integer")
    return PromptSpec(name=str(data.get("name") or path.stem), text=text, max_new_tokens=max_new,
                      fill_to_tokens=fill, suffix=str(data.get("suffix", "")),
                      description=str(data.get("description", "")))


def tokenize_prompt(spec: PromptSpec, tokenizer: Any, context_window: int,
                    source: Path | str = "the bundle's tokenizer") -> TokenizedPrompt:
    """Token ids for ``spec`` with ``tokenizer`` (a :class:`~edgedeploy.runtime.tokenizer.TextTokenizer`,
    e.g. from :func:`~edgedeploy.runtime.tokenizer.open_tokenizer`), fitted to ``context_window``.

    A failure of the tokenizer is an :class:`InputError` naming ``source`` (the tokenizer's file) and the prompt.
    """

    def encode(text: str, special: bool = True) -> list[int]:
        with tokenizer_errors(source, f"encode prompt {spec.name!r}"):
            return list(tokenizer.encode(text, add_special_tokens=special))

    max_new = min(spec.max_new_tokens, max(context_window // 4, 1))
    suffix = encode(spec.suffix, special=False) if spec.suffix else []
    ids = encode(spec.text)
    if spec.fill_to_tokens:
        body = encode(spec.text, special=False) or [0]
        target = max(spec.fill_to_tokens - len(suffix), 1)
        while len(ids) < target:
            ids += body
        ids = ids[:target]
    ids += suffix
    room = context_window - max_new
    clipped = None
    if len(ids) > room:
        clipped = len(ids)
        ids = ids[: max(room - len(suffix), 1)] + suffix if room > len(suffix) else ids[:room]
    return TokenizedPrompt(spec.name, ids, max_new, clipped)
