"""Build a model library (the compiled ``prefill``/``decode``/KV-cache functions) for one target."""

from __future__ import annotations

import contextlib
import inspect
import json
import linecache
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgedeploy.checkpoint.config import ModelConfig
from edgedeploy.errors import InputError

if TYPE_CHECKING:
    from edgedeploy.compile.targets import CpuIsa

#: Tokens per KV-cache page; the runtime passes the same value to ``create_paged_kv_cache``.
PAGE_SIZE = 16


def library_metadata(cfg: ModelConfig, dtype: str, target_name: str, context_window: int, prefill_chunk: int,
                     params: list[tuple[str, tuple[int, ...], str]]) -> dict[str, Any]:
    """What the runtime needs to drive the library; compiled in as the ``_metadata`` function."""
    import tvm

    import edgedeploy

    return {
        "format": 1,
        "family": cfg.family,
        "architecture": cfg.architecture,
        "dtype": dtype,
        "target": target_name,
        "context_window": context_window,
        "prefill_chunk": prefill_chunk,
        "page_size": PAGE_SIZE,
        "vocab_size": cfg.vocab_size,
        "num_layers": cfg.num_layers,
        "num_kv_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "params": [{"name": n, "shape": list(s), "dtype": d} for n, s, d in params],
        "edgedeploy_version": edgedeploy.__version__,
        "tvm_version": tvm.__version__,
    }


#: Frames whose source lines TVMScript reads from ``inspect.stack()`` (it looks at the third, for a class body).
_FRAMES_WITH_SOURCE = 4


def _light_stack(context: int = 1) -> list[inspect.FrameInfo]:
    """``inspect.stack()`` without the module lookups, and with source lines for the innermost frames only.

    TVMScript's ``@T.prim_func`` takes a full stack each time it parses a function (the paged KV cache parses
    dozens per build). A full stack looks up the module of every frame, and each frame that is not a module's
    file scans all of ``sys.modules``: with torch loaded under a deep caller that was 2-9 s of a tiny build.
    Source lines come straight from ``linecache`` (as the full stack's do in the end).
    """
    frame = sys._getframe(1)
    infos: list[inspect.FrameInfo] = []
    while frame is not None:
        code, lineno = frame.f_code, frame.f_lineno
        lines, index = None, None
        if len(infos) < _FRAMES_WITH_SOURCE and context > 0:
            source = linecache.getlines(code.co_filename, frame.f_globals)
            if 0 < lineno <= len(source):
                start = min(max(lineno - 1 - context // 2, 0), max(len(source) - context, 0))
                lines, index = source[start:start + context], lineno - 1 - start
        infos.append(inspect.FrameInfo(frame, code.co_filename, lineno, code.co_name, lines, index))
        frame = frame.f_back
    return infos


@contextlib.contextmanager
def _light_tvmscript_stacks() -> Iterator[None]:
    """Swap in :func:`_light_stack` while a model is exported (one thread builds; restored on the way out)."""
    full = inspect.stack
    inspect.stack = _light_stack  # type: ignore[assignment]
    try:
        yield
    finally:
        inspect.stack = full  # type: ignore[assignment]


def build_ir_module(cfg: ModelConfig, dtype: str, target_name: str, context_window: int,
                    prefill_chunk: int, isa: CpuIsa | None = None,
                    ) -> tuple[Any, list[tuple[str, tuple[int, ...], str]], dict[str, Any]]:
    """Export the model of ``cfg`` to a Relax IRModule; return (module, params, metadata).

    ``isa`` is the phone CPU of an aarch64 target (:func:`~edgedeploy.compile.targets.get_target`).
    """
    import tvm
    from tvm import relax

    from edgedeploy.compile.targets import get_target
    from edgedeploy.models import get_model_class

    if context_window <= 0 or prefill_chunk <= 0:
        raise InputError("context window and prefill chunk must be positive")
    if prefill_chunk > context_window:
        raise InputError(f"prefill chunk ({prefill_chunk}) is larger than the context window ({context_window})")
    spec = get_target(target_name, isa)
    target = spec.tvm_target()
    model = get_model_class(cfg.family)(cfg, dtype, target)
    with _light_tvmscript_stacks():
        mod, named_params = model.export_tvm(spec=model.get_default_spec())
    params = [(name, tuple(int(d) for d in p.shape), str(p.dtype)) for name, p in named_params]
    meta = library_metadata(cfg, dtype, target_name, context_window, prefill_chunk, params)
    bb = relax.BlockBuilder(mod)
    with bb.function("_metadata", params=[]):
        bb.emit_func_output(tvm.ir.StringImm(json.dumps(meta)))
    return bb.get(), params, meta


def compile_model_library(cfg: ModelConfig, dtype: str, target_name: str, context_window: int, prefill_chunk: int,
                          out_path: Path, isa: CpuIsa | None = None) -> Path:
    """Compile the model of ``cfg`` in ``dtype`` for ``target_name`` and write the library to ``out_path``.

    The library bakes in the context window and prefill chunk (read back by the runtime from its
    ``_metadata`` function). ``out_path`` must end in the target's suffix (``.so`` host, ``.tar``
    cross targets; a ``.tar`` holds aarch64 ELF objects and needs no NDK to produce). ``isa`` is the phone
    CPU of an aarch64 target (mcpu/mattr, usually from the device profile; the default ISA when None).
    Returns ``out_path``.
    """
    from tvm import relax

    from edgedeploy.compile.pipeline import get_pipeline
    from edgedeploy.compile.targets import get_target

    spec = get_target(target_name, isa)
    out_path = Path(out_path)
    if out_path.suffix != spec.library_suffix:
        raise InputError(f"target {target_name!r} produces a {spec.library_suffix} library, not {out_path.name}")
    mod, _params, _meta = build_ir_module(cfg, dtype, target_name, context_window, prefill_chunk, isa)
    target = spec.tvm_target()
    ex = relax.build(mod, target=target, relax_pipeline=get_pipeline(target))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # Write under a temporary name first so an interrupted build never leaves a half library behind.
    tmp = out_path.with_name(f".{out_path.stem}.tmp{os.getpid()}{out_path.suffix}")
    try:
        ex.export_library(str(tmp))
        os.replace(tmp, out_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out_path
