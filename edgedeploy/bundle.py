"""The bundle: what ``build`` writes and every runner reads. ``bundle.json`` holds the manifest.

Standard library only: the runner process on a device imports this, and it must stay small.
A bundle folder holds the model library (``.so`` or ``.tar``), FP16/FP32 weights in TVM's
tensor-cache format, the tokenizer files and ``bundle.json`` with the sha256 of every other file, so a
missing or altered file is named before anything runs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgedeploy.errors import InputError
from edgedeploy.fileio import read_json_object

MANIFEST = "bundle.json"
SCHEMA_VERSION = 1
_CHUNK = 4 * 2**20


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, streamed (bundles hold multi-GB weight shards)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


@dataclass
class Manifest:
    """Contents of ``bundle.json``."""

    architecture: str
    family: str
    config: dict[str, Any]
    parameters: int
    dtype: str
    target: str
    target_triple: str
    context_window: int
    prefill_chunk: int
    library: str
    weights_index: str
    weights_bytes: int
    tokenizer_files: list[str]
    stop_token_ids: list[int]
    tvm_version: str
    edgedeploy_version: str
    source: str
    created: str
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: The rule check at build time (the checkpoint is not beside the bundle on a device farm).
    rules: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def write_manifest(bundle_dir: Path, manifest: Manifest) -> Manifest:
    """Hash every file in ``bundle_dir`` (except the manifest) into ``manifest`` and write ``bundle.json``."""
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in bundle_dir.rglob("*") if p.is_file() and p.name != MANIFEST):
        rel = path.relative_to(bundle_dir).as_posix()
        files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    manifest.files = files
    tmp = bundle_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest.to_dict(), indent=2) + "\n", encoding="utf-8")
    tmp.replace(bundle_dir / MANIFEST)
    return manifest


def read_manifest(bundle_dir: Path | str) -> Manifest:
    """Read ``bundle.json``; errors name the bundle and what is wrong with it."""
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise InputError(f"{bundle_dir}: no such bundle folder")
    path = bundle_dir / MANIFEST
    if not path.is_file():
        raise InputError(f"{bundle_dir}: not a bundle (no {MANIFEST}); make one with `edgedeploy build`")
    data = read_json_object(path, "the bundle manifest")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise InputError(f"{path}: schema_version {data.get('schema_version')!r} is not {SCHEMA_VERSION}; "
                         "rebuild the bundle with this edgedeploy")
    try:
        return Manifest(**data)
    except TypeError as e:
        raise InputError(f"{path}: unexpected manifest fields ({e})") from None


def verify_bundle(bundle_dir: Path | str, manifest: Manifest | None = None) -> Manifest:
    """Check that every file the manifest lists exists with its recorded sha256; name the first that does not."""
    bundle_dir = Path(bundle_dir)
    manifest = manifest or read_manifest(bundle_dir)
    for rel, meta in manifest.files.items():
        path = bundle_dir / rel
        if not path.is_file():
            raise InputError(f"{bundle_dir}: file {rel} is missing from the bundle")
        if path.stat().st_size != meta["bytes"] or sha256_file(path) != meta["sha256"]:
            raise InputError(f"{bundle_dir}: file {rel} was altered (sha256 differs from {MANIFEST})")
    for required in (manifest.library, manifest.weights_index):
        if required not in manifest.files:
            raise InputError(f"{bundle_dir}: {MANIFEST} does not list {required}")
    return manifest
