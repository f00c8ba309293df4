"""``bundle.json`` and the rules every reader of a bundle applies before it trusts a byte.

Standard library only: the runner process on a device imports this, and it must stay small.
A bundle folder holds the model library (``.so`` or ``.tar``), FP16/FP32 weights in TVM's
tensor-cache format, the tokenizer files and ``bundle.json`` with the sha256 of every other file.
The manifest is the root of trust: a file it does not list is refused, every name in it (and in the
weights index) must be a plain relative name inside the bundle, and every listed file must have its
recorded size and sha256 before anything reads it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgedeploy.errors import InputError
from edgedeploy.fileio import check_field_names, plain_relative_name, read_json_object

MANIFEST = "bundle.json"
SCHEMA_VERSION = 1
_CHUNK = 4 * 2**20
_SHA256 = re.compile(r"[0-9a-f]{64}")
#: A bundle's files: a few dozen in practice; the cap keeps a hostile manifest from costing much.
MAX_FILES = 100_000


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, streamed (bundles hold multi-GB weight shards)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def is_int(value: object) -> bool:
    """True for a JSON integer (Python's bool is an int, but ``true`` is no size or token id)."""
    return isinstance(value, int) and not isinstance(value, bool)


#: Every file name that comes from a file we read (a manifest, a weights index) passes through this,
#: so that no index can make us read, push or replace a file outside the folder it describes.
safe_relative_name = plain_relative_name


#: Manifest field -> (check, what the check wants); ``files`` and cross-field rules are checked apart.
_FIELD_CHECKS: dict[str, tuple[Any, str]] = {
    "str": (lambda v: isinstance(v, str), "a string"),
    "int": (lambda v: is_int(v) and v >= 0, "a non-negative integer"),
    "pos": (lambda v: is_int(v) and v > 0, "a positive integer"),
    "dict": (lambda v: isinstance(v, dict), "an object"),
    "ints": (lambda v: isinstance(v, list) and all(is_int(t) and t >= 0 for t in v),
             "a list of non-negative integers"),
    "strs": (lambda v: isinstance(v, list) and all(isinstance(t, str) for t in v), "a list of strings"),
}
_FIELD_KIND = {"config": "dict", "rules": "dict", "target_cpu": "dict", "parameters": "int", "weights_bytes": "int",
               "context_window": "pos", "prefill_chunk": "pos", "tokenizer_files": "strs",
               "stop_token_ids": "ints", "schema_version": "int", "files": "dict"}


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
    #: The CPU a phone build was compiled for (``mcpu``, ``mattr``, where they came from); empty for host.
    target_cpu: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> Manifest:
        """A manifest from parsed JSON, every field type-checked; :class:`InputError` names the first bad one."""
        check_field_names(cls, data, where)
        for name, value in data.items():
            check, wants = _FIELD_CHECKS[_FIELD_KIND.get(name, "str")]
            if not check(value):
                raise InputError(f"{where}: manifest field {name!r} must be {wants}, not {value!r:.60}")
        m = cls(**data)
        m._check_consistency(where)
        return m

    def _check_consistency(self, where: str) -> None:
        from edgedeploy.checkpoint.config import ModelConfig

        ModelConfig.from_dict(self.config, f"{where}: config")
        if self.dtype not in ("float16", "float32"):
            raise InputError(f"{where}: dtype {self.dtype!r} is not float16 or float32")
        if self.prefill_chunk > self.context_window:
            raise InputError(f"{where}: prefill_chunk {self.prefill_chunk} exceeds context_window "
                             f"{self.context_window}")
        if len(self.files) > MAX_FILES:
            raise InputError(f"{where}: lists {len(self.files)} files (at most {MAX_FILES})")
        for rel, meta in self.files.items():
            safe_relative_name(rel, where)
            if rel == MANIFEST:
                raise InputError(f"{where}: the manifest cannot list itself")
            if (not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str)
                    or not _SHA256.fullmatch(meta["sha256"]) or not is_int(meta.get("bytes"))
                    or meta["bytes"] < 0):
                raise InputError(f"{where}: files[{rel!r}] must be {{\"sha256\": 64 hex digits, \"bytes\": N}}")
        for what, name in (("library", self.library), ("weights_index", self.weights_index)):
            if safe_relative_name(name, where) not in self.files:
                raise InputError(f"{where}: {what} {name!r} is not among the files the manifest lists")
        for name in self.tokenizer_files:
            safe_relative_name(name, where)

    def derived_files(self) -> set[str]:
        """Files a runner may find beside the listed ones: the ``model.so`` linked on the host from a ``.tar``.

        It is made per device (with the device's toolchain) after the build, so the manifest cannot
        list it; the push records and verifies its hash instead.
        """
        return {self.library[: -len(".tar")] + ".so"} if self.library.endswith(".tar") else set()


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
    """Read and validate ``bundle.json``; errors name the bundle and what is wrong with it.

    A build killed while it swapped bundles is finished (or rolled back) first, so a reader never
    finds the bundle missing because of an interrupted build.
    """
    from edgedeploy.bundle.install import recover

    bundle_dir = Path(bundle_dir)
    recover(bundle_dir)
    return read_manifest_file(bundle_dir)


def read_manifest_file(bundle_dir: Path) -> Manifest:
    """Read and validate ``bundle.json`` as it is (no recovery of an interrupted build)."""
    if not bundle_dir.is_dir():
        raise InputError(f"{bundle_dir}: no such bundle folder")
    path = bundle_dir / MANIFEST
    if not path.is_file():
        raise InputError(f"{bundle_dir}: not a bundle (no {MANIFEST}); make one with `edgedeploy build`")
    data = read_json_object(path, "the bundle manifest")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise InputError(f"{path}: schema_version {data.get('schema_version')!r:.40} is not {SCHEMA_VERSION}; "
                         "rebuild the bundle with this edgedeploy")
    return Manifest.from_dict(data, str(path))


def bundle_entries(bundle_dir: Path) -> dict[str, os.stat_result]:
    """Every entry below ``bundle_dir`` (relative posix name -> lstat), links not followed."""
    out: dict[str, os.stat_result] = {}
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        with os.scandir(bundle_dir / rel_dir if rel_dir else bundle_dir) as it:
            for entry in it:
                rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
                st = entry.stat(follow_symlinks=False)
                out[rel] = st
                if stat.S_ISDIR(st.st_mode):
                    stack.append(rel)
                if len(out) > MAX_FILES:
                    raise InputError(f"{bundle_dir}: holds more than {MAX_FILES} entries; not a bundle")
    return out


def unlisted_files(bundle_dir: Path, manifest: Manifest, allowed: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """Files and links in ``bundle_dir`` that the manifest does not list (folders holding listed files aside)."""
    listed = set(manifest.files) | {MANIFEST} | set(allowed)
    parents = {p for rel in listed for p in _parents(rel)}
    return sorted(rel for rel, st in bundle_entries(bundle_dir).items()
                  if rel not in listed and not (stat.S_ISDIR(st.st_mode) and rel in parents))


def _parents(rel: str) -> list[str]:
    parts = rel.split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def verify_bundle(bundle_dir: Path | str, manifest: Manifest | None = None, hashes: bool = True,
                  allowed: set[str] | frozenset[str] = frozenset()) -> Manifest:
    """Check the bundle against its manifest before anything is read from it; name the first problem.

    Refuses files the manifest does not list (``allowed`` names extra ones, e.g. a linked library),
    links and non-regular files, files of the wrong size, with ``hashes`` files whose sha256 differs,
    and a weights index that names a shard the manifest does not list. ``hashes=False`` is for a
    device copy that the profiler verified just before the run (see :mod:`edgedeploy.profile.push`).
    """
    bundle_dir = Path(bundle_dir)
    manifest = manifest or read_manifest(bundle_dir)
    extra = unlisted_files(bundle_dir, manifest, allowed)
    if extra:
        raise InputError(f"{bundle_dir}: file {extra[0]} is not listed in {MANIFEST}"
                         + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
                         + "; a bundle holds only the files its manifest lists")
    for rel, meta in manifest.files.items():
        path = bundle_dir / rel
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise InputError(f"{bundle_dir}: file {rel} is missing from the bundle") from None
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"{bundle_dir}: file {rel} is not a regular file (a link or a folder)")
        if st.st_size != meta["bytes"]:
            raise InputError(f"{bundle_dir}: file {rel} was altered (size differs from {MANIFEST})")
        if hashes and sha256_file(path) != meta["sha256"]:
            raise InputError(f"{bundle_dir}: file {rel} was altered (sha256 differs from {MANIFEST})")
    read_weights_index(bundle_dir, manifest)
    return manifest


@dataclass(frozen=True)
class WeightRecord:
    """Where one parameter's bytes are: a shard the manifest lists, an offset, a size, a dtype and shape."""

    name: str
    shard: str
    offset: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]
    format: str


def read_weights_index(bundle_dir: Path, manifest: Manifest) -> dict[str, WeightRecord]:
    """Parse the manifest's weights index; every shard it names must be a file the manifest lists."""
    path = bundle_dir / manifest.weights_index
    where = str(path)
    data = read_json_object(path, "the weights index")
    shards = data.get("records")
    if not isinstance(shards, list):
        raise InputError(f"{where}: 'records' must be a list of shards")
    out: dict[str, WeightRecord] = {}
    for shard in shards:
        if not isinstance(shard, dict) or not isinstance(shard.get("records"), list):
            raise InputError(f"{where}: each shard must be an object with a 'records' list")
        data_path = safe_relative_name(shard.get("dataPath"), where)
        if data_path not in manifest.files or data_path in (manifest.weights_index, manifest.library):
            raise InputError(f"{where}: shard {data_path!r} is not a weights file listed in {MANIFEST}")
        size = manifest.files[data_path]["bytes"]
        for rec in shard["records"]:
            out_rec = _weight_record(rec, data_path, where)
            if out_rec.offset + out_rec.nbytes > size:
                raise InputError(f"{where}: {out_rec.name} lies beyond the end of {data_path}")
            out[out_rec.name] = out_rec
    return out


def _weight_record(rec: object, shard: str, where: str) -> WeightRecord:
    if not isinstance(rec, dict):
        raise InputError(f"{where}: a weight record must be an object")
    name, shape, dtype = rec.get("name"), rec.get("shape"), rec.get("dtype")
    offset, nbytes, fmt = rec.get("byteOffset"), rec.get("nbytes"), rec.get("format", "raw")
    if not (isinstance(name, str) and isinstance(dtype, str) and isinstance(fmt, str)
            and isinstance(shape, list) and all(is_int(d) and d >= 0 for d in shape)
            and is_int(offset) and offset >= 0 and is_int(nbytes) and nbytes >= 0):
        raise InputError(f"{where}: weight record {str(name)[:80]!r} has a missing or mistyped field")
    return WeightRecord(name, shard, offset, nbytes, dtype, tuple(shape), fmt)
