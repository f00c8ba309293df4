"""``edgedeploy build``: checkpoint -> bundle folder (library, tensor-cache weights, tokenizer, manifest).

The bundle is assembled in a sibling ``.NAME.partial-*`` folder and renamed into place only when complete
(:mod:`edgedeploy.bundle.install`), so a failed or killed build never leaves a half-written bundle where a
runner would find it, and only a folder that is provably a bundle is ever replaced.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgedeploy.bundle import Manifest, is_int, write_manifest
from edgedeploy.bundle.install import Partial, check_replaceable, install, recover
from edgedeploy.checkpoint.folder import model_file, require_regular
from edgedeploy.checkpoint.intake import Checkpoint, open_checkpoint
from edgedeploy.errors import EdgeDeployError, InputError
from edgedeploy.fileio import read_json_object

#: Files copied from the checkpoint when present; the runner on a phone needs none of them, the host does.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "qwen.tiktoken")
WEIGHTS_INDEX = "tensor-cache.json"
DEFAULT_CONTEXT = 4096
DEFAULT_PREFILL_CHUNK = 512


class RuleFailure(EdgeDeployError):
    """The checkpoint breaks the challenge's rules: nothing is built (exit code 1)."""

    exit_code = 1


#: Reports progress as (stage, done, total); the CLI draws bars from it, tests pass nothing.
Progress = Callable[[str, float, float], None]


def _no_progress(stage: str, done: float, total: float) -> None:
    pass


def stop_token_ids(model_dir: Path, cfg_eos: tuple[int, ...]) -> list[int]:
    """End-of-sequence ids from config.json, generation_config.json and the tokenizer's eos token.

    The eos token is the one tokenizer_config.json names, else the one the tokenizer itself defines
    (Qwen v1's ``<|endoftext|>``, whose checkpoints name none).
    """
    from edgedeploy.runtime.tokenizer import find_tokenizer_file, load_tokenizer

    ids = list(cfg_eos)
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        gen = model_file(model_dir, gen.name, str(model_dir))
        eos = read_json_object(gen, "generation_config.json").get("eos_token_id")
        ids += [e for e in (eos if isinstance(eos, list) else [eos]) if is_int(e) and e >= 0]
    eos_tok = None
    tok_cfg = model_dir / "tokenizer_config.json"
    if tok_cfg.is_file():
        tok_cfg = model_file(model_dir, tok_cfg.name, str(model_dir))
        eos_tok = read_json_object(tok_cfg, "tokenizer_config.json").get("eos_token")
        if isinstance(eos_tok, dict):
            eos_tok = eos_tok.get("content")
    tok_file = find_tokenizer_file(model_dir)
    # A tokenizer.json defines no eos of its own: without a configured one there is nothing to look up.
    if tok_file is not None and (isinstance(eos_tok, str) or tok_file.name != "tokenizer.json"):
        tokenizer = load_tokenizer(model_file(model_dir, tok_file.name, str(model_dir)))
        eos_tok = eos_tok if isinstance(eos_tok, str) else tokenizer.default_eos
        tid = tokenizer.token_to_id(eos_tok) if eos_tok else None
        if tid is not None:
            ids.append(tid)
    return sorted(set(ids))


def _check_sizes(ck: Checkpoint, context: int, chunk: int) -> None:
    if context <= 0 or chunk <= 0:
        raise InputError("--context and --prefill-chunk must be positive")
    if chunk > context:
        raise InputError(f"--prefill-chunk ({chunk}) is larger than --context ({context})")
    cfg = ck.config
    if context > cfg.usable_context and cfg.sliding_window is not None:
        # Within the window sliding and full attention agree; past it the graph would attend too far back.
        raise InputError(f"--context {context} exceeds the model's sliding attention window ({cfg.sliding_window}); "
                         "edgedeploy builds bundles whose context fits in the window")
    if context > cfg.context_length:
        raise InputError(f"--context {context} exceeds the model's context length ({cfg.context_length})")


def build_bundle(model_dir: Path | str, out_dir: Path | str, target: str = "host", dtype: str = "float16",
                 context_window: int | None = None, prefill_chunk: int | None = None,
                 progress: Progress = _no_progress, profile: Any = None) -> Manifest:
    """Compile the checkpoint in ``model_dir`` for ``target`` and write a verified bundle to ``out_dir``.

    ``profile`` (a device profile, its name or .toml path) chooses the CPU (``mcpu``/``mattr``) that
    phone targets compile for; without one they use a baseline ARMv8.2-A with FP16 and dot product.
    Raises :class:`RuleFailure` when the rule check fails and :class:`InputError` for bad input.
    """
    from edgedeploy.compile.library import compile_model_library
    from edgedeploy.compile.targets import get_target, isa_from_profile
    from edgedeploy.compile.weights import write_tensor_cache

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if dtype not in ("float16", "float32"):
        raise InputError(f"--dtype must be float16 or float32, not {dtype!r}")
    spec = get_target(target, isa_from_profile(profile) if profile is not None else None)
    ck = open_checkpoint(model_dir)
    if not ck.rules.passed:
        bad = "; ".join(f.message for f in ck.rules.findings if f.status == "FAIL")
        raise RuleFailure(f"{model_dir}: rule check failed, nothing built: {bad}")
    if not ck.has_weights:
        raise InputError(f"{model_dir}: no weights (*.safetensors) to build")
    cfg = ck.config
    context = context_window or min(cfg.usable_context, DEFAULT_CONTEXT)
    chunk = prefill_chunk or min(DEFAULT_PREFILL_CHUNK, context)
    _check_sizes(ck, context, chunk)

    # Refuse a folder we may not replace before spending minutes on the build (install checks again).
    recover(out_dir)
    check_replaceable(out_dir)
    work = Partial(out_dir)
    partial = work.path
    try:
        progress("compile", 0, 1)
        library = f"model{spec.library_suffix}"
        compile_model_library(cfg, dtype, target, context, chunk, partial / library, isa=spec.isa)
        progress("compile", 1, 1)
        write_tensor_cache(model_dir, cfg, dtype, partial,
                           progress=lambda done, total, _name: progress("weights", done, total))
        copied = [name for name in TOKENIZER_FILES if (model_dir / name).is_file()]
        for name in copied:
            # A link out of the model folder would copy a host file into a bundle that gets shared.
            src = model_file(model_dir, name, str(model_dir))
            require_regular(src, name)
            shutil.copy2(src, partial / name)
        import tvm

        import edgedeploy

        manifest = Manifest(
            architecture=cfg.architecture, family=cfg.family, config=cfg.to_dict(), parameters=ck.parameters,
            dtype=dtype, target=target, target_triple=str(spec.target.get("mtriple") or
                                                          spec.target.get("host", {}).get("mtriple") or "host"),
            context_window=context, prefill_chunk=chunk, library=library,
            weights_index=WEIGHTS_INDEX,
            weights_bytes=sum(p.stat().st_size for p in partial.glob("params_shard_*.bin")),
            tokenizer_files=copied, stop_token_ids=stop_token_ids(model_dir, cfg.eos_token_ids),
            tvm_version=tvm.__version__, edgedeploy_version=edgedeploy.__version__,
            source=str(model_dir.resolve()), created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            rules=ck.rules.to_dict(), target_cpu=spec.isa.to_dict() if spec.isa else {},
        )
        progress("manifest", 0, 1)
        write_manifest(partial, manifest)
        progress("manifest", 1, 1)
        install(work, out_dir)
        return manifest
    except BaseException:
        work.discard()
        raise


def describe(manifest: Manifest) -> dict[str, Any]:
    """The manifest without the per-file hashes, for console output."""
    d = manifest.to_dict()
    d["files"] = {k: v["bytes"] for k, v in manifest.files.items()}
    return d
