"""Which files of a model folder we may open: every name stays inside the folder, links included.

Organisers run edgedeploy on checkpoints that others submit, so a checkpoint must not be able to make
us read (and, in a build, copy into a bundle) a file outside it: an index naming ``../../etc/passwd``
or a ``model.safetensors`` link to someone else's weights is refused before it is opened.

One exception keeps downloaded models working: a snapshot in the Hugging Face hub cache
(``models--ORG--NAME/snapshots/REV/``) is made of links into the repository's ``blobs/`` folder, so for
such a folder the links may point anywhere inside ``models--ORG--NAME``.
"""

from __future__ import annotations

from pathlib import Path

from edgedeploy.errors import InputError
from edgedeploy.fileio import resolve_inside


def confinement_root(model_dir: Path) -> Path:
    """The folder that the files of ``model_dir`` (links followed) must lie in."""
    real = Path(model_dir).resolve()
    snapshots, repo = real.parent, real.parent.parent
    if snapshots.name == "snapshots" and repo.name.startswith("models--") and (repo / "blobs").is_dir():
        return repo
    return real


def model_file(model_dir: Path, name: str, where: str) -> Path:
    """``model_dir / name`` if it is a plain relative name that resolves inside the model folder.

    ``where`` names what the name came from (the index file, or the folder for a fixed name such as
    config.json); the error names it and the offending name.
    """
    return resolve_inside(model_dir, name, confinement_root(model_dir), where)


def require_regular(path: Path, what: str) -> None:
    """:class:`InputError` unless ``path`` (links followed) is a regular file: a FIFO would block a read forever."""
    if not path.exists():
        raise InputError(f"{path}: {what} is missing")
    if not path.is_file():
        raise InputError(f"{path}: {what} is not a regular file")


def _meta_original(folder: Path) -> bool:
    """Whether ``folder`` holds Meta's own release files (params.json plus consolidated.NN.pth shards)."""
    return (folder / "params.json").is_file() and any(folder.glob("consolidated.*.pth"))


def missing_config_message(model_dir: Path) -> str:
    """What to tell a user whose folder has no config.json; Meta's ``original/`` layout gets its own advice.

    Meta ships Llama as ``params.json``, ``consolidated.NN.pth`` (pickled PyTorch shards) and a tiktoken or
    SentencePiece ``tokenizer.model``; Hugging Face repositories keep those under ``original/`` beside the
    Hugging Face files. Only the Hugging Face layout (config.json, *.safetensors) can be read here.
    """
    model_dir = Path(model_dir)
    where = next((f for f in (model_dir, model_dir / "original") if _meta_original(f)), None)
    if where is None:
        return f"{model_dir}: no config.json (is this a Hugging Face model folder?)"
    return (f"{model_dir}: no config.json: {where} holds Meta's original Llama release (params.json, "
            "consolidated.*.pth, tokenizer.model), which edgedeploy cannot read; get the Hugging Face layout "
            "(config.json, *.safetensors, tokenizer.json): download the repository's files outside original/ "
            "(e.g. `huggingface-cli download meta-llama/REPO --exclude 'original/*' --local-dir DIR`), or convert "
            f"with transformers' convert_llama_weights_to_hf.py (src/transformers/models/llama/ in the "
            f"transformers repository): --input_dir {where} --model_size SIZE --llama_version VERSION "
            "--output_dir DIR")
