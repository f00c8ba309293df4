"""Read tensor names, dtypes and shapes from safetensors headers, never the tensor data.

The header is an 8-byte little-endian length followed by that many bytes of JSON. We check it
against the file size ourselves so that a truncated download or a lying header becomes a clear
error before anything trusts the offsets (the compiler later reads tensors at those offsets).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from edgedeploy.errors import InputError

#: Bytes per element of each safetensors dtype.
DTYPE_SIZES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}

#: A header larger than this is not a real checkpoint header (the largest real ones are a few MB).
_MAX_HEADER = 100 * 2**20


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


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate the header of one ``.safetensors`` file."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise InputError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", prefix)
            if n > _MAX_HEADER or 8 + n > size:
                raise InputError(f"{path}: safetensors header claims {n} bytes but the file has {size}")
            blob = f.read(n)
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(blob)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(f"{path}: safetensors header is not valid JSON (truncated or corrupt file)") from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: safetensors header is not a JSON object")
    data_start, data_size = 8 + n, size - 8 - n
    out: dict[str, TensorInfo] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        out[name] = _tensor_info(path, name, meta, data_start, data_size)
    return out


def _tensor_info(path: Path, name: str, meta: object, data_start: int, data_size: int) -> TensorInfo:
    try:
        dtype = meta["dtype"]  # type: ignore[index]
        shape = tuple(int(d) for d in meta["shape"])  # type: ignore[index]
        begin, end = (int(x) for x in meta["data_offsets"])  # type: ignore[index]
    except (KeyError, TypeError, ValueError):
        raise InputError(f"{path}: tensor {name!r} has a malformed header entry") from None
    if dtype not in DTYPE_SIZES:
        raise InputError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
    numel = 1
    for d in shape:
        if d < 0:
            raise InputError(f"{path}: tensor {name!r} has a negative dimension")
        numel *= d
    if not 0 <= begin <= end <= data_size:
        raise InputError(f"{path}: tensor {name!r} lies outside the file (bytes {begin}..{end} of {data_size}); "
                         "the file is truncated or its header is wrong")
    if end - begin != numel * DTYPE_SIZES[dtype]:
        raise InputError(f"{path}: tensor {name!r} header says {dtype}{list(shape)} "
                         f"({numel * DTYPE_SIZES[dtype]} bytes) but spans {end - begin} bytes")
    return TensorInfo(name, path, dtype, shape, data_start + begin, data_start + end)


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the index's shards, or the ``*.safetensors`` in the folder."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise InputError(f"{index}: malformed index (expected a 'weight_map' object)") from None
        missing = [s for s in shards if not (model_dir / s).is_file()]
        if missing:
            raise InputError(f"{index}: names shard {missing[0]!r} which is missing from {model_dir}")
        return [model_dir / s for s in shards]
    return sorted(model_dir.glob("*.safetensors"))


def read_checkpoint_tensors(model_dir: Path) -> dict[str, TensorInfo]:
    """Every tensor of the checkpoint in ``model_dir`` (empty when it has no weights)."""
    tensors: dict[str, TensorInfo] = {}
    for path in checkpoint_files(model_dir):
        for name, info in read_header(path).items():
            if name in tensors:
                raise InputError(f"{path}: tensor {name!r} also appears in {tensors[name].file.name}")
            tensors[name] = info
    return tensors
