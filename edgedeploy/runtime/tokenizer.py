"""Text <-> token ids for the host side of a run, whatever tokenizer file the model ships.

Two kinds of tokenizer are found in the checkpoints we support, behind one small interface
(:class:`TextTokenizer`: ``encode``, ``decode``, ``token_to_id``), so callers never branch on the kind:

- ``tokenizer.json`` (Hugging Face ``tokenizers``): Llama, Qwen2, Phi;
- ``qwen.tiktoken`` (Qwen v1, ``QWenLMHeadModel``): one ``BASE64_TOKEN RANK`` line per byte-level BPE token,
  read with the ``tiktoken`` package. Qwen's own ``tokenization_qwen.py`` (remote code, never run here)
  defines the pre-tokenizer pattern and the special tokens reproduced below: ``<|endoftext|>``,
  ``<|im_start|>``, ``<|im_end|>``, then ``<|extra_0|>`` .. ``<|extra_204|>``, numbered right after the
  ranks (151643.. in the real file). It normalises text to NFC, adds no BOS, lets special-token text
  in the input encode as the special token, and ``skip_special_tokens`` drops every id from
  ``<|endoftext|>`` on.

``tokenizer.json`` wins when a folder has both. The runner never imports this module: a phone's runner
takes token ids.
"""

from __future__ import annotations

import base64
import binascii
import unicodedata
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from edgedeploy.errors import InputError
from edgedeploy.fileio import read_capped

HF_TOKENIZER = "tokenizer.json"
QWEN_TIKTOKEN = "qwen.tiktoken"
#: The tokenizer files we can read, in order of preference.
TOKENIZER_FILES = (HF_TOKENIZER, QWEN_TIKTOKEN)

#: Qwen v1's pre-tokenizer: like GPT-4's cl100k pattern, except that digits are split one by one (``\p{N}``).
QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_ENDOFTEXT = "<|endoftext|>"
QWEN_SPECIAL_TOKENS = (QWEN_ENDOFTEXT, "<|im_start|>", "<|im_end|>", *(f"<|extra_{i}|>" for i in range(205)))
#: The real qwen.tiktoken is ~2.5 MB; this refuses a runaway file before it is parsed.
MAX_TIKTOKEN_BYTES = 64 * 2**20
#: Token ids are below 2^31 everywhere (prompt files, the runners); the special tokens come after the ranks.
MAX_RANK = 2**31 - 1 - len(QWEN_SPECIAL_TOKENS)


class TextTokenizer(Protocol):
    """What edgedeploy needs from a tokenizer."""

    #: The file it was read from (errors name it).
    path: Path
    #: The end-of-text token the tokenizer itself defines when tokenizer_config.json names none (or None).
    default_eos: str | None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` adds what the model wants around it (e.g. BOS)."""
        ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """The text of ``ids``."""
        ...

    def token_to_id(self, token: str) -> int | None:
        """The id of one token given by its text, or None if the vocabulary lacks it."""
        ...


@contextmanager
def tokenizer_errors(path: Path | str, action: str) -> Iterator[None]:
    """Turn a failure of a tokenizer library inside the block into an InputError naming ``path``.

    The tokenizers library reports a corrupt or truncated file, an unknown model type and a bad argument
    as a bare ``Exception`` (sometimes TypeError) carrying its parser's message, and tiktoken raises
    ValueError/KeyError from its Rust core, so no narrower clause catches them; only library calls belong
    inside the block.
    """
    try:
        yield
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - see above
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InputError(f"{path}: cannot {action} ({reason})") from None


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` from ``tokenizer.json``."""

    default_eos: str | None = None

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        self.path = Path(path)
        with tokenizer_errors(self.path, "load the tokenizer"):
            self._tok = Tokenizer.from_file(str(self.path))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        with tokenizer_errors(self.path, "encode the text"):
            return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        with tokenizer_errors(self.path, "decode the tokens"):
            return str(self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def token_to_id(self, token: str) -> int | None:
        with tokenizer_errors(self.path, "look up a token"):
            tid = self._tok.token_to_id(token)
        return None if tid is None else int(tid)


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """``{token bytes: rank}`` from a ``.tiktoken`` file; :class:`InputError` naming the file and line.

    The file must hold every single byte (tiktoken cannot encode a byte it has no token for) and no
    duplicate token or rank.
    """
    data = read_capped(path, "the tiktoken file", MAX_TIKTOKEN_BYTES)
    ranks: dict[bytes, int] = {}
    seen: set[int] = set()
    for n, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit() or len(parts[1]) > 10:
            raise InputError(f"{path}: line {n} is not 'BASE64_TOKEN RANK'")
        try:
            token = base64.b64decode(parts[0], validate=True)
        except (binascii.Error, ValueError):
            raise InputError(f"{path}: line {n}: the token is not valid base64") from None
        rank = int(parts[1])
        if rank >= MAX_RANK:
            raise InputError(f"{path}: line {n}: rank {rank} is not below {MAX_RANK}")
        if not token or token in ranks or rank in seen:
            raise InputError(f"{path}: line {n}: {'an empty' if not token else 'a duplicate'} token or rank")
        ranks[token] = rank
        seen.add(rank)
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise InputError(f"{path}: not a byte-level BPE vocabulary: {len(missing)} single bytes have no token "
                         f"(first: 0x{missing[0]:02x})")
    return ranks


class QwenTiktokenTokenizer:
    """Qwen v1's tokenizer: ``qwen.tiktoken`` read with tiktoken, with Qwen's pattern and special tokens."""

    default_eos: str | None = QWEN_ENDOFTEXT

    def __init__(self, path: Path):
        import tiktoken

        self.path = Path(path)
        self.ranks = read_tiktoken_ranks(self.path)
        first = max(self.ranks.values()) + 1
        self.special_tokens = {tok: first + i for i, tok in enumerate(QWEN_SPECIAL_TOKENS)}
        self.eod_id = self.special_tokens[QWEN_ENDOFTEXT]
        with tokenizer_errors(self.path, "load the tokenizer"):
            self._enc = tiktoken.Encoding("qwen-v1", pat_str=QWEN_PATTERN, mergeable_ranks=self.ranks,
                                          special_tokens=self.special_tokens)
        self._known = set(self.ranks.values()) | set(self.special_tokens.values())

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # Qwen adds no BOS/EOS; special-token text in the input is read as the special token (Qwen's default).
        with tokenizer_errors(self.path, "encode the text"):
            return list(self._enc.encode(unicodedata.normalize("NFC", text), allowed_special="all",
                                         disallowed_special=()))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        # Ids the vocabulary lacks (a padded embedding row) have no text; they are left out.
        keep = [int(i) for i in ids if int(i) in self._known and not (skip_special_tokens and int(i) >= self.eod_id)]
        with tokenizer_errors(self.path, "decode the tokens"):
            return self._enc.decode(keep, errors="replace")

    def token_to_id(self, token: str) -> int | None:
        if token in self.special_tokens:
            return self.special_tokens[token]
        return self.ranks.get(token.encode("utf-8"))


def find_tokenizer_file(folder: Path) -> Path | None:
    """The tokenizer file in ``folder`` that we would read (tokenizer.json first), or None."""
    for name in TOKENIZER_FILES:
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


def load_tokenizer(path: Path) -> TextTokenizer:
    """The tokenizer in the file ``path`` (its kind from its name); :class:`InputError` naming the file."""
    path = Path(path)
    if path.name == QWEN_TIKTOKEN:
        return QwenTiktokenTokenizer(path)
    return HFTokenizer(path)


def open_tokenizer(folder: Path, why: str = "") -> TextTokenizer:
    """The tokenizer of a bundle or model folder; :class:`InputError` naming the folder when it has none.

    ``why`` ends the message (e.g. "to tokenize the scripted prompts").
    """
    path = find_tokenizer_file(folder)
    if path is None:
        raise InputError(f"{folder}: no tokenizer ({' or '.join(TOKENIZER_FILES)}){' ' + why if why else ''}")
    return load_tokenizer(path)


def tokenizer_of(folder: Path) -> TextTokenizer | None:
    """The folder's tokenizer, or None when it has no tokenizer file (a corrupt one is still an error)."""
    path = find_tokenizer_file(folder)
    return load_tokenizer(path) if path else None

