"""``edgedeploy convert``: a whole pickled model (as LLM-Pruner saves it) -> a Hugging Face folder.

LLM-Pruner saves its pruned model with ``torch.save({'model': model, 'tokenizer': tokenizer}, path)`` (or the
bare model): a pickle of the Python objects, not of tensors. Loading such a file imports and calls whatever
the file names, i.e. it runs code from the file. That is why nothing else in edgedeploy reads pickles, and
why this step runs only when the user says they trust the file. What it writes is plain data:
``save_pretrained`` with safetensors, config.json and the tokenizer files, which every other command reads.

The folder is written beside ``--out`` under a hidden temporary name and renamed into place when complete,
so a failed or interrupted conversion never leaves a half-written model folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgedeploy.errors import InputError

#: Tokenizer files taken from ``--tokenizer-from`` when the pickle holds no tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "qwen.tiktoken", "added_tokens.json", "generation_config.json")

PICKLE_WARNING = ("loading a pickled model runs code from the file (Python pickle): only convert a file from a "
                  "source you trust")


@dataclass
class ConvertResult:
    """What :func:`convert_pickled_model` wrote."""

    out_dir: Path
    model_class: str
    tensors: int
    parameters: int
    tokenizer_from: str | None
    files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"out": str(self.out_dir), "model_class": self.model_class, "tensors": self.tensors,
                "parameters": self.parameters, "tokenizer_from": self.tokenizer_from, "files": self.files}


def _check_out(out_dir: Path) -> None:
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise InputError(f"{out_dir}: --out exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise InputError(f"{out_dir}: --out is not empty; give a new folder")


def _load_pickle(path: Path) -> Any:
    """``torch.load`` of a whole pickled object; import failures name the module the pickle needs."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except ModuleNotFoundError as e:
        raise InputError(f"{path}: the pickle needs the Python module {e.name!r}, which is not installed (a model "
                         "saved from a project's own copy of its classes, e.g. LLM-Pruner's, needs that project "
                         "importable)") from None
    except Exception as e:  # noqa: BLE001 - unpickling runs the file's own code, which may raise anything
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InputError(f"{path}: cannot load the pickled model ({type(e).__name__}: {reason:.200})") from None


def _split(obj: Any, path: Path) -> tuple[Any, Any]:
    """(model, tokenizer or None) from what the pickle held: a dict with 'model' (LLM-Pruner) or a model."""
    if isinstance(obj, dict):
        if "model" not in obj:
            keys = ", ".join(repr(k) for k in list(obj)[:8])
            raise InputError(f"{path}: a dict without a 'model' entry (keys: {keys or 'none'}); expected "
                             "{'model': MODEL, 'tokenizer': TOKENIZER} as LLM-Pruner saves it, or a bare model")
        model, tokenizer = obj["model"], obj.get("tokenizer")
    else:
        model, tokenizer = obj, None
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise InputError(f"{path}: holds a {type(model).__module__}.{type(model).__name__}, not a transformers "
                         "model (PreTrainedModel), so it cannot be saved as a Hugging Face folder")
    if tokenizer is not None and not hasattr(tokenizer, "save_pretrained"):
        raise InputError(f"{path}: its 'tokenizer' entry is a {type(tokenizer).__name__}, not a transformers "
                         "tokenizer; pass --tokenizer-from DIR instead")
    return model, tokenizer


def _copy_tokenizer(src: Path, dest: Path) -> list[str]:
    from edgedeploy.checkpoint.folder import model_file, require_regular

    if not src.is_dir():
        raise InputError(f"{src}: --tokenizer-from must be a folder")
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            path = model_file(src, name, str(src))
            require_regular(path, name)
            shutil.copyfile(path, dest / name)
            copied.append(name)
    if not any(n in copied for n in ("tokenizer.json", "tokenizer.model", "vocab.json", "qwen.tiktoken")):
        raise InputError(f"{src}: no tokenizer files (tokenizer.json, tokenizer.model, vocab.json or qwen.tiktoken) "
                         "for --tokenizer-from")
    return copied


def convert_pickled_model(pickled: Path | str, out_dir: Path | str, tokenizer_from: Path | str | None = None,
                          trust_pickle: bool = False) -> ConvertResult:
    """Load a pickled transformers model (``trust_pickle`` required: it runs the file's code) and write it to
    ``out_dir`` as a Hugging Face folder (safetensors, config.json, tokenizer files).

    The tokenizer comes from ``tokenizer_from`` when given, else from the pickle's ``'tokenizer'`` entry;
    without either the folder has no tokenizer. ``out_dir`` must be absent or an empty folder.
    """
    pickled, out_dir = Path(pickled), Path(out_dir)
    if not pickled.exists():
        raise InputError(f"{pickled}: no such file")
    if not pickled.is_file():
        raise InputError(f"{pickled}: not a regular file")
    if not trust_pickle:
        raise InputError(f"{pickled}: not loaded: {PICKLE_WARNING}; pass --trust-pickle to convert it")
    _check_out(out_dir)
    if tokenizer_from is not None and not Path(tokenizer_from).is_dir():
        raise InputError(f"{tokenizer_from}: --tokenizer-from must be a folder")
    model, tokenizer = _split(_load_pickle(pickled), pickled)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.convert-", dir=out_dir.parent))
    try:
        model.save_pretrained(work, safe_serialization=True)
        if tokenizer_from is not None:
            _copy_tokenizer(Path(tokenizer_from), work)
            source = str(tokenizer_from)
        elif tokenizer is not None:
            tokenizer.save_pretrained(work)
            source = "the pickle"
        else:
            source = None
        files = sorted(p.name for p in work.iterdir())
        if not any(f.endswith(".safetensors") for f in files):
            raise InputError(f"{pickled}: save_pretrained wrote no safetensors ({', '.join(files)})")
        _check_out(out_dir)
        os.chmod(work, 0o755)  # mkdtemp's folder is private; the model folder is an ordinary one
        # rename(2) replaces an empty folder and fails on one that filled up meanwhile: never merges into it.
        os.rename(work, out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    state = model.state_dict()
    return ConvertResult(out_dir=out_dir, model_class=type(model).__name__, tensors=len(state),
                         parameters=sum(p.numel() for p in model.parameters()), tokenizer_from=source, files=files)
