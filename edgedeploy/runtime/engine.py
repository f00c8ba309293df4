"""Host runner for a compiled bundle: load weights, prefill in chunks, decode greedily, time each phase.

Meant to run in its own process so its memory can be measured: with ``TVM_USE_RUNTIME_LIB=1`` in
the environment it imports only TVM's runtime, and neither torch nor the compiler (importing
``tvm_ffi`` would otherwise pull torch in, ~240 MB). Weights are read with ``os.pread`` straight
into the runtime's arrays, so no mmap of the shard files and no second copy is counted in RSS.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgedeploy.bundle import Manifest
from edgedeploy.errors import EdgeDeployError, InputError
from edgedeploy.fileio import pread_exact


def _import_tvm_runtime() -> Any:
    """Import tvm without letting tvm_ffi's optional ``import torch`` happen in a runtime-only process."""
    block = (os.environ.get("TVM_USE_RUNTIME_LIB") == "1" and "tvm" not in sys.modules
             and "torch" not in sys.modules)
    if block:
        sys.modules["torch"] = None  # type: ignore[assignment]  # makes `import torch` raise ImportError
    try:
        import tvm
        import tvm.runtime.vm  # noqa: F401
    finally:
        if block and sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
    return tvm


tvm = _import_tvm_runtime()


class RuntimeFailure(EdgeDeployError):
    """The compiled model failed while running (exit code 3)."""

    exit_code = 3


@dataclass
class GenerationResult:
    """Tokens produced by :meth:`Engine.generate` and the timings of each phase."""

    token_ids: list[int]
    load_s: float
    ttft_s: float
    prefill_tok_s: float
    decode_tok_s: float
    prefill_tokens: int
    decode_tokens: int
    #: "stop" (a stop id), "length" (max_new_tokens) or "context" (the KV cache is full).
    finish_reason: str = "length"
    extra: dict[str, Any] = field(default_factory=dict)


def _pread_into(fd: int, ptr: int, nbytes: int, offset: int) -> None:
    """Read a weight straight into the runtime's tensor memory at ``ptr``."""
    pread_exact(fd, memoryview((ctypes.c_char * nbytes).from_address(ptr)).cast("B"), offset)


class Engine:
    """Runs one bundle (library + tensor cache) on the host CPU with one sequence and greedy decoding."""

    SEQ_ID = 0

    def __init__(self, bundle_dir: Path | str, library_file: str | Path, threads: int | None = None,
                 manifest: Manifest | None = None):
        self.bundle_dir = Path(bundle_dir)
        #: The bundle's manifest (read when loading if not given): it says which files may be read.
        self.manifest = manifest
        lib = Path(library_file)
        self.library_path = lib if lib.is_absolute() else self.bundle_dir / lib
        self.threads = threads
        self.metadata: dict[str, Any] = {}
        self.load_s = 0.0
        self._vm: Any = None
        self._params: Any = None
        self._cache: Any = None
        self._seq_len = 0
        self._seq_open = False

    # -- loading ---------------------------------------------------------------------------------

    def load(self) -> float:
        """Load library, weights and KV cache; return (and remember) the seconds it took."""
        t0 = time.perf_counter()
        if not self.library_path.is_file():
            raise InputError(f"{self.library_path}: no such model library")
        if self.library_path.suffix != ".so":
            raise InputError(f"{self.library_path.name}: only a host .so library can run here "
                             "(.tar libraries are for the phone)")
        if self.threads:
            tvm.get_global_func("runtime.config_threadpool")(0, int(self.threads))
        try:
            lib = tvm.runtime.load_module(str(self.library_path))
        except Exception as e:  # noqa: BLE001 - TVM raises its own error types
            raise InputError(f"{self.library_path}: cannot load model library ({e})") from None
        dev = tvm.cpu()
        try:
            self._vm = tvm.runtime.vm.VirtualMachine(lib, dev)
        except Exception as e:  # noqa: BLE001 - TVM raises its own error types
            raise InputError(f"{self.library_path}: not a TVM Relax VM library ({e})") from None
        try:
            self.metadata = json.loads(str(self._vm["_metadata"]()))
        except Exception as e:  # noqa: BLE001
            raise InputError(f"{self.library_path}: not an edgedeploy model library (no _metadata: {e})") from None
        self._params = tvm.runtime.convert(self._load_params(dev))
        m = self.metadata
        shape = tvm.runtime.ShapeTuple
        self._cache = self._vm["create_paged_kv_cache"](
            shape([1]), shape([m["context_window"]]), shape([m["prefill_chunk"]]), shape([m["page_size"]]),
            shape([0]))
        g = tvm.get_global_func
        self._add_seq = g("vm.builtin.kv_state_add_sequence")
        self._remove_seq = g("vm.builtin.kv_state_remove_sequence")
        self._begin = g("vm.builtin.kv_state_begin_forward")
        self._end = g("vm.builtin.kv_state_end_forward")
        self._prefill = self._vm["prefill"]
        self._decode = self._vm["decode"]
        self.load_s = time.perf_counter() - t0
        return self.load_s

    def _load_params(self, dev: Any) -> list[Any]:
        from edgedeploy.bundle import read_manifest, read_weights_index

        # Only shards the manifest lists are opened (the index itself is one of its files).
        manifest = self.manifest or read_manifest(self.bundle_dir)
        records = read_weights_index(self.bundle_dir, manifest)
        where = manifest.weights_index
        out = []
        fds: dict[str, int] = {}
        try:
            for p in self.metadata["params"]:
                name = p["name"]
                if name not in records:
                    raise InputError(f"{where}: weights lack parameter {name!r}")
                rec = records[name]
                if list(rec.shape) != p["shape"] or rec.dtype != p["dtype"] or rec.format != "raw":
                    raise InputError(f"{where}: {name} is {rec.dtype}{list(rec.shape)}, the library expects "
                                     f"{p['dtype']}{p['shape']}")
                arr = tvm.runtime.empty(tuple(p["shape"]), p["dtype"], dev)
                nbytes = int(np.prod(p["shape"], dtype=np.int64)) * np.dtype(p["dtype"]).itemsize
                if nbytes != rec.nbytes:
                    raise InputError(f"{where}: {name} has {rec.nbytes} bytes, expected {nbytes}")
                if rec.shard not in fds:
                    fds[rec.shard] = os.open(self.bundle_dir / rec.shard, os.O_RDONLY | os.O_NOFOLLOW)
                _pread_into(fds[rec.shard], arr.data_ptr(), nbytes, rec.offset)
                out.append(arr)
        finally:
            for fd in fds.values():
                os.close(fd)
        return out

    # -- properties ------------------------------------------------------------------------------

    @property
    def context_window(self) -> int:
        return int(self.metadata["context_window"])

    @property
    def prefill_chunk(self) -> int:
        return int(self.metadata["prefill_chunk"])

    @property
    def vocab_size(self) -> int:
        return int(self.metadata["vocab_size"])

    @property
    def seq_len(self) -> int:
        """Tokens of the current sequence in the KV cache."""
        return self._seq_len

    # -- low level -------------------------------------------------------------------------------

    def _require_loaded(self) -> None:
        if self._vm is None:
            raise RuntimeError("Engine.load() must be called first")

    def reset(self) -> None:
        """Drop the current sequence and start an empty one."""
        self._require_loaded()
        if self._seq_open:
            self._remove_seq(self._cache, self.SEQ_ID)
        self._add_seq(self._cache, self.SEQ_ID)
        self._seq_open, self._seq_len = True, 0

    def _check_ids(self, ids: list[int]) -> None:
        bad = [t for t in ids if not 0 <= int(t) < self.vocab_size]
        if bad:
            # The embedding gather does not bounds-check; an out-of-range id would read wild memory.
            raise InputError(f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")

    def _forward(self, fn: Any, ids: list[int]) -> Any:
        n = len(ids)
        if self._seq_len + n > self.context_window:
            raise InputError(f"KV cache full: {self._seq_len} + {n} tokens exceed the context window "
                             f"of {self.context_window}")
        data = tvm.runtime.tensor(np.asarray(ids, dtype=np.int32).reshape(1, n))
        self._begin(self._cache, tvm.runtime.ShapeTuple([self.SEQ_ID]), tvm.runtime.ShapeTuple([n]))
        try:
            logits, self._cache = fn(data, self._cache, self._params)
        except Exception as e:  # noqa: BLE001
            raise RuntimeFailure(f"model run failed: {e}") from None
        finally:
            self._end(self._cache)
        self._seq_len += n
        return logits

    def _prefill_all(self, ids: list[int]) -> Any:
        """Feed ``ids`` in chunks of at most ``prefill_chunk``; return the last chunk's logits (runtime array)."""
        if not ids:
            raise InputError("empty prompt")
        if self._seq_len + len(ids) > self.context_window:
            raise InputError(f"prompt of {len(ids)} tokens does not fit the context window of "
                             f"{self.context_window} tokens ({self._seq_len} already used)")
        self._check_ids(ids)
        logits = None
        for i in range(0, len(ids), self.prefill_chunk):
            logits = self._forward(self._prefill, ids[i:i + self.prefill_chunk])
        return logits

    def prefill_logits(self, ids: list[int]) -> np.ndarray:
        """Start a new sequence with ``ids``; return the last token's logits, float32 ``[vocab]``."""
        self.reset()
        return self._prefill_all(list(ids)).numpy().reshape(-1)

    def decode_logits(self, token_id: int) -> np.ndarray:
        """Append one token to the current sequence; return its logits, float32 ``[vocab]``."""
        self._require_loaded()
        if not self._seq_open:
            raise RuntimeError("decode_logits() needs a sequence: call prefill_logits() first")
        self._check_ids([token_id])
        return self._forward(self._decode, [int(token_id)]).numpy().reshape(-1)

    def touch_kv_cache(self) -> None:
        """Write every KV-cache slot once (a full-window dummy prefill) so RSS includes the whole cache."""
        self.reset()
        self._prefill_all([0] * self.context_window)
        self.reset()

    # -- generation ------------------------------------------------------------------------------

    def generate(self, prompt_ids: list[int], max_new_tokens: int, stop_ids: list[int] | tuple[int, ...] = ()
                 ) -> GenerationResult:
        """Greedy generation of up to ``max_new_tokens`` tokens after ``prompt_ids``.

        Raises :class:`InputError` if the prompt does not fit the context window. Generation stops
        early at a stop id or when the KV cache is full (``finish_reason`` says which).
        """
        self._require_loaded()
        prompt = [int(t) for t in prompt_ids]
        if len(prompt) > self.context_window:
            raise InputError(f"prompt of {len(prompt)} tokens is longer than the context window "
                             f"({self.context_window} tokens)")
        stops = {int(s) for s in stop_ids}
        self.reset()
        t0 = time.perf_counter()
        logits = self._prefill_all(prompt)
        token = int(np.argmax(logits.numpy().reshape(-1)))
        ttft = time.perf_counter() - t0
        out: list[int] = []
        reason = "length"
        decode_steps = 0
        t1 = time.perf_counter()
        if max_new_tokens > 0:
            out.append(token)
            while True:
                if token in stops:
                    reason = "stop"
                    break
                if len(out) >= max_new_tokens:
                    break
                if self._seq_len >= self.context_window:
                    reason = "context"
                    break
                logits = self._forward(self._decode, [token])
                decode_steps += 1
                token = int(np.argmax(logits.numpy().reshape(-1)))
                out.append(token)
        decode_s = time.perf_counter() - t1
        return GenerationResult(
            token_ids=out, load_s=self.load_s, ttft_s=ttft,
            prefill_tok_s=len(prompt) / ttft if ttft > 0 else 0.0,
            decode_tok_s=decode_steps / decode_s if decode_steps and decode_s > 0 else 0.0,
            prefill_tokens=len(prompt), decode_tokens=decode_steps, finish_reason=reason,
        )
