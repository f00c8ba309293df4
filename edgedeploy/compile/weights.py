"""Stream a Hugging Face safetensors checkpoint into TVM's tensor-cache format, one tensor at a time.

The output (``tensor-cache.json`` + ``params_shard_*.bin``) is what ``tvm.runtime``'s tensor-cache
loader and MLC-LLM read; ``ndarray-cache.json`` is the same file under MLC's older name. Peak memory
is one model parameter (plus its checkpoint pieces when fused), never the whole checkpoint.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgedeploy.checkpoint.config import ModelConfig
from edgedeploy.checkpoint.safetensors_index import read_checkpoint_tensors
from edgedeploy.errors import InputError
from edgedeploy.fileio import pread_exact

#: Bytes per shard file; a larger tensor gets a shard of its own.
SHARD_CAP_BYTES = 32 << 20

_ST_DTYPES: dict[str, tuple[np.dtype, int]] = {
    "F16": (np.dtype("<f2"), 2),
    "BF16": (np.dtype("<u2"), 2),  # reinterpreted to float32 by shifting into the high half
    "F32": (np.dtype("<f4"), 4),
    "F64": (np.dtype("<f8"), 8),
}

Progress = Callable[[int, int, str], None]


class SafetensorsReader:
    """Reads single tensors from one or more safetensors files by name with ``os.pread`` (no mmap).

    Tensor locations come from the intake's validated header index, so a truncated or lying header is
    rejected before any offset is trusted.
    """

    def __init__(self, model_dir: Path):
        self.model_dir = Path(model_dir)
        self._where = read_checkpoint_tensors(self.model_dir)
        if not self._where:
            raise InputError(f"{self.model_dir}: no safetensors weights found")
        self._fds: dict[Path, int] = {}

    def names(self) -> list[str]:
        return list(self._where)

    def read(self, name: str) -> np.ndarray:
        """The tensor ``name`` as float16 (BF16 is widened to float32 first) or its stored float dtype."""
        info = self._where.get(name)
        if info is None:
            raise InputError(f"{self.model_dir}: checkpoint lacks tensor {name!r}")
        if info.dtype not in _ST_DTYPES:
            raise InputError(f"{info.file}: tensor {name!r} has unsupported dtype {info.dtype}")
        fd = self._fds.get(info.file)
        if fd is None:
            fd = self._fds[info.file] = os.open(info.file, os.O_RDONLY)
        arr = np.empty(info.numel, dtype=_ST_DTYPES[info.dtype][0])
        pread_exact(fd, memoryview(arr).cast("B"), info.start)
        if info.dtype == "BF16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        return arr.reshape(info.shape)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def model_parameters(cfg: ModelConfig, dtype: str) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every parameter of the compiled model, in the order the library expects."""
    from tvm.target import Target

    from edgedeploy.models import get_model_class

    model = get_model_class(cfg.family)(cfg, dtype, Target({"kind": "llvm"}))
    return [(n, tuple(int(d) for d in p.shape)) for n, p in model.named_parameters()]


def _convert(arr: np.ndarray, dtype: str, name: str) -> np.ndarray:
    target = np.dtype(dtype)
    if arr.dtype == target:
        return arr  # same dtype: bytes go out unchanged (FP16 stays bit-for-bit)
    if target == np.float16:
        with np.errstate(over="ignore"):
            out = arr.astype(np.float16)
        if not np.isfinite(out).all() and np.isfinite(arr).all():
            raise InputError(f"tensor {name!r} overflows float16; build in float32")
        return out
    return arr.astype(target)


def write_tensor_cache(model_dir: Path, cfg: ModelConfig, dtype: str, out_dir: Path,
                       progress: Progress | None = None, shard_cap_bytes: int = SHARD_CAP_BYTES) -> dict[str, Any]:
    """Write the weights of ``model_dir`` as ``dtype`` into ``out_dir`` in TVM's tensor-cache format.

    Parameter names are the compiled model's (fused ``qkv_proj``, ``gate_up_proj``). ``progress`` is
    called as ``progress(bytes_done, bytes_total, param_name)`` after each parameter. Returns a summary:
    ``{"files": [...], "num_params": int, "param_count": int, "nbytes": int}``.
    """
    from edgedeploy.models import get_weight_map

    if dtype not in ("float16", "float32"):
        raise InputError(f"dtype {dtype!r} is not supported (choose float16 or float32)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    params = model_parameters(cfg, dtype)
    wmap = get_weight_map(cfg)
    missing = [n for n, _ in params if n not in wmap]
    if missing:
        raise InputError(f"no checkpoint mapping for model parameters {missing[:3]}")
    itemsize = np.dtype(dtype).itemsize
    total = sum(int(np.prod(s)) * itemsize for _, s in params)
    reader = SafetensorsReader(model_dir)
    shards: list[dict[str, Any]] = []
    cur: dict[str, Any] | None = None
    fh = None
    done = 0
    count = 0

    def close_shard() -> None:
        nonlocal fh, cur
        if fh is not None:
            fh.close()
            shards.append(cur)
        fh, cur = None, None

    try:
        for name, shape in params:
            src = wmap[name]
            arr = _convert(src.build([reader.read(t) for t in src.tensors]), dtype, name)
            if tuple(arr.shape) != shape:
                raise InputError(f"{model_dir}: {name} from {list(src.tensors)} has shape {tuple(arr.shape)}, "
                                 f"config.json implies {shape}")
            arr = np.ascontiguousarray(arr)
            nbytes = arr.nbytes
            if cur is not None and cur["nbytes"] + nbytes > shard_cap_bytes:
                close_shard()
            if cur is None:
                path = f"params_shard_{len(shards)}.bin"
                cur = {"dataPath": path, "format": "raw-shard", "nbytes": 0, "records": []}
                fh = open(out_dir / path, "wb")  # noqa: SIM115 - closed in close_shard
            cur["records"].append({"name": name, "shape": list(shape), "dtype": dtype, "format": "raw",
                                   "nbytes": nbytes, "byteOffset": cur["nbytes"]})
            fh.write(memoryview(arr).cast("B"))
            cur["nbytes"] += nbytes
            count += arr.size
            done += nbytes
            del arr
            if progress is not None:
                progress(done, total, name)
        close_shard()
    finally:
        if fh is not None:
            fh.close()
        reader.close()
    meta = {"ParamSize": len(params), "ParamBytes": total, "BitsPerParam": itemsize * 8, "dtype": dtype,
            "family": cfg.family}
    text = json.dumps({"metadata": meta, "records": shards}, indent=1)
    for fname in ("tensor-cache.json", "ndarray-cache.json"):
        tmp = out_dir / f".{fname}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out_dir / fname)
    return {"files": ["tensor-cache.json", "ndarray-cache.json"] + [s["dataPath"] for s in shards],
            "num_params": len(params), "param_count": count, "nbytes": total}
