"""Read tensor names, dtypes and shapes from safetensors headers, never the tensor data.

The header is an 8-byte little-endian length followed by that many bytes of JSON. We check it as
strictly as the safetensors library does (types, sizes, offsets that tile the data section exactly,
no overlaps or holes) so that a truncated download or a lying header becomes a clear error before
anything trusts the offsets (the compiler later reads tensors at those offsets).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgedeploy.checkpoint.folder import model_file, require_regular
from edgedeploy.errors import InputError
from edgedeploy.fileio import parse_json, read_json_object

#: Bytes per element of each safetensors dtype.
DTYPE_SIZES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}

#: The format's own limit on the header: the safetensors library refuses larger ones (real ones are KBs to MBs).
MAX_HEADER_BYTES = 100_000_000
INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype, shape and absolute byte range in the file."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def _header_bytes(path: Path) -> tuple[int, bytes]:
    """(file size, header JSON bytes) of a safetensors file, the claimed length checked before reading."""
    require_regular(path, "safetensors file")
    try:
        with path.open("rb") as f:
            size = path.stat().st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise InputError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise InputError(f"{path}: safetensors header claims {n} bytes but the file has {size} "
                                 f"(and a header may hold at most {MAX_HEADER_BYTES:,})")
            blob = f.read(n)
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from None
    if len(blob) != n:
        raise InputError(f"{path}: truncated safetensors header (the file shrank while it was read)")
    return size, blob


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate the header of one ``.safetensors`` file."""
    size, blob = _header_bytes(path)
    header = parse_json(blob, str(path), "safetensors header")
    if not isinstance(header, dict):
        raise InputError(f"{path}: safetensors header is not a JSON object")
    if "__metadata__" in header:
        _check_metadata(path, header["__metadata__"])
    data_start, data_size = 8 + len(blob), size - 8 - len(blob)
    out = {name: _tensor_info(path, name, meta, data_start, data_size)
           for name, meta in header.items() if name != "__metadata__"}
    _check_tiling(path, out, data_start, data_size)
    return out


def _check_metadata(path: Path, meta: object) -> None:
    """``__metadata__`` is a string-to-string map in the format (the safetensors library refuses anything else)."""
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise InputError(f"{path}: '__metadata__' must be an object of strings, got {meta!r:.80}")


def _json_ints(value: object) -> tuple[int, ...] | None:
    """``value`` as a tuple if it is a JSON list of non-negative integers (``true`` and ``2.0`` are not), else None."""
    if not isinstance(value, list):
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        return None
    return tuple(value)


def _tensor_info(path: Path, name: str, meta: object, data_start: int, data_size: int) -> TensorInfo:
    """One header entry, every field type-checked; offsets are relative to the data section in the header."""
    where = f"{path}: tensor {name!r:.120}"
    if not isinstance(meta, dict):
        raise InputError(f"{where} has a malformed header entry (expected an object, got {meta!r:.60})")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in meta]
    if missing:
        raise InputError(f"{where} has a malformed header entry (no {missing[0]!r})")
    dtype = meta["dtype"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise InputError(f"{where} has unknown dtype {dtype!r:.60}")
    shape = _json_ints(meta["shape"])
    if shape is None:
        raise InputError(f"{where}: 'shape' must be a list of non-negative integers, got {meta['shape']!r:.60}")
    offsets = _json_ints(meta["data_offsets"])
    if offsets is None or len(offsets) != 2:
        raise InputError(f"{where}: 'data_offsets' must be two non-negative integers [begin, end], "
                         f"got {meta['data_offsets']!r:.60}")
    begin, end = offsets
    if begin > end:
        raise InputError(f"{where}: data_offsets begin {begin} is after end {end}")
    if end > data_size:
        raise InputError(f"{where} lies outside the file (bytes {begin}..{end} of {data_size}); "
                         "the file is truncated or its header is wrong")
    numel = 1
    for d in shape:
        numel *= d
    want = numel * DTYPE_SIZES[dtype]
    if end - begin != want:
        raise InputError(f"{where} header says {dtype}{list(shape)} ({want} bytes) but spans {end - begin} bytes")
    return TensorInfo(name, path, dtype, shape, data_start + begin, data_start + end)


def _check_tiling(path: Path, tensors: dict[str, TensorInfo], data_start: int, data_size: int) -> None:
    """The tensors must cover the data section exactly once: no overlap (two names, one set of bytes), no hole.

    The safetensors library enforces the same, so a file that fails here fails in transformers too;
    bytes that belong to no tensor are how a file smuggles a second format (a polyglot) past a reader.
    """
    pos, prev = data_start, None
    for t in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        if t.start < pos:
            raise InputError(f"{path}: tensor {t.name!r:.120} (bytes {t.start - data_start}..{t.end - data_start}) "
                             f"overlaps tensor {prev!r:.120}")
        if t.start > pos:
            raise InputError(f"{path}: bytes {pos - data_start}..{t.start - data_start} before tensor "
                             f"{t.name!r:.120} belong to no tensor (the header does not describe the file)")
        pos, prev = t.end, t.name
    if pos != data_start + data_size:
        raise InputError(f"{path}: the last {data_start + data_size - pos} bytes belong to no tensor "
                         "(the header does not describe the file)")


def _index_shards(model_dir: Path, index: Path) -> list[Path]:
    """The shard files that ``index`` names, each confined to the model folder and present."""
    model_file(model_dir, INDEX, str(model_dir))  # the index itself may be a link out of the folder
    data = read_json_object(index, "safetensors index")
    weight_map: Any = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise InputError(f"{index}: malformed index (expected a non-empty 'weight_map' object)")
    names = set()
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str):
            raise InputError(f"{index}: weight_map[{tensor!r:.120}] must be a file name, got {shard!r:.60}")
        names.add(shard)
    paths = [model_file(model_dir, name, str(index)) for name in sorted(names)]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise InputError(f"{index}: names shard {missing[0].relative_to(model_dir).as_posix()!r} "
                         f"which is missing from {model_dir}")
    return paths


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the index's shards, or the ``*.safetensors`` in the folder.

    Every file is confined to the model folder (see :mod:`edgedeploy.checkpoint.folder`) before it is opened.
    """
    model_dir = Path(model_dir)
    index = model_dir / INDEX
    if index.is_file() or index.is_symlink():
        return _index_shards(model_dir, index)
    return [model_file(model_dir, p.name, str(model_dir)) for p in sorted(model_dir.glob("*.safetensors"))]


def read_checkpoint_tensors(model_dir: Path) -> dict[str, TensorInfo]:
    """Every tensor of the checkpoint in ``model_dir`` (empty when it has no weights)."""
    tensors: dict[str, TensorInfo] = {}
    for path in checkpoint_files(model_dir):
        for name, info in read_header(path).items():
            if name in tensors:
                raise InputError(f"{path}: tensor {name!r:.120} also appears in {tensors[name].file.name}")
            tensors[name] = info
    return tensors
