"""Host side of a run: tokenize, start the runner process, read its result line, detokenize.

Tokenizing happens here, not in the runner, because a phone's runner carries no tokenizer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from edgedeploy.bundle import Manifest
from edgedeploy.errors import EdgeDeployError, InputError
from edgedeploy.runtime.tokenizer import (  # noqa: F401 - load_tokenizer and tokenizer_errors are re-exported
    TextTokenizer,
    load_tokenizer,
    open_tokenizer,
    tokenizer_errors,
)


class RunFailed(EdgeDeployError):
    """The runner process ended without a usable result (exit code 3)."""

    exit_code = 3


def _bundle_tokenizer(bundle_dir: Path) -> TextTokenizer:
    return open_tokenizer(bundle_dir, "to tokenize text; pass token ids with --prompt-file")


def tokenize(bundle_dir: Path, text: str) -> list[int]:
    """Token ids of ``text`` with the bundle's tokenizer (which adds BOS where the model wants it)."""
    return _bundle_tokenizer(bundle_dir).encode(text)


def detokenize(bundle_dir: Path, ids: list[int]) -> str:
    """The text of ``ids`` with the bundle's tokenizer, special tokens left out."""
    return _bundle_tokenizer(bundle_dir).decode(ids, skip_special_tokens=True)


def fit_prompt(ids: list[int], manifest: Manifest, max_new_tokens: int, truncate: bool) -> list[int]:
    """Refuse (or, when asked, left-truncate) a prompt that leaves no room in the context window."""
    room = manifest.context_window - max_new_tokens
    if len(ids) <= manifest.context_window and (len(ids) <= room or not truncate):
        return ids
    if not truncate:
        raise InputError(f"prompt of {len(ids)} tokens is longer than the bundle's context window "
                         f"({manifest.context_window}); pass --truncate to keep its last tokens")
    return ids[-max(room, 1):]


def runner_args(bundle_dir: Path | str, prompt_file: Path | str, max_new_tokens: int | None = None,
                threads: int | None = None, touch_kv: bool = False, verify: bool = True) -> list[str]:
    """The arguments every runner (Python or native) takes after its program name."""
    args = [str(bundle_dir), "--prompt-file", str(prompt_file)]
    if max_new_tokens is not None:
        args += ["--max-new-tokens", str(max_new_tokens)]
    if threads:
        args += ["--threads", str(threads)]
    if touch_kv:
        args.append("--touch-kv")
    if not verify:
        args.append("--no-verify")
    return args


def runner_command(bundle_dir: Path, prompt_file: Path, max_new_tokens: int | None = None,
                   threads: int | None = None, touch_kv: bool = False, verify: bool = True) -> list[str]:
    """The argv of the Python runner on this host."""
    return [sys.executable, "-m", "edgedeploy.runtime.runner",
            *runner_args(bundle_dir, prompt_file, max_new_tokens, threads, touch_kv, verify)]


def parse_result(stdout: str, returncode: int, stderr: str = "") -> dict[str, Any]:
    """The runner's JSON result line (the last line that parses); RunFailed when there is none."""
    for line in reversed(stdout.strip().splitlines()):
        try:
            data = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict) and "schema_version" in data:
            data["exit_code"] = returncode
            return data
    tail = (stderr.strip().splitlines() or ["no output"])[-1]
    raise RunFailed(f"runner exited with code {returncode} and no result line ({tail})")


def raise_for_error(result: dict[str, Any]) -> dict[str, Any]:
    """``result`` when the runner succeeded; otherwise its error, as the exit code the README gives it.

    The runner sorts its failures itself: bad input (a prompt longer than the window, an altered bundle)
    is an :class:`InputError` (exit 2), anything else means the runner failed (:class:`RunFailed`, exit 3).
    """
    if not result.get("error"):
        return result
    if result.get("error_kind") == "input" or result.get("exit_code") == InputError.exit_code:
        raise InputError(f"runner: {result['error']}")
    raise RunFailed(f"runner failed: {result['error']}")


def run_local(bundle_dir: Path, token_ids: list[int], max_new_tokens: int, threads: int | None = None,
              touch_kv: bool = False, verify: bool = True, timeout: float | None = None,
              stop_token_ids: list[int] | None = None) -> dict[str, Any]:
    """Run the bundle on this host in a fresh runner process; return its result line (plus ``exit_code``).

    ``stop_token_ids`` replaces the bundle's own stop ids (None: the bundle's).
    """
    prompt: dict[str, Any] = {"token_ids": token_ids, "max_new_tokens": max_new_tokens}
    if stop_token_ids is not None:
        prompt["stop_token_ids"] = stop_token_ids
    with tempfile.TemporaryDirectory(prefix="edgedeploy-run-") as tmp:
        prompt_file = Path(tmp) / "prompt.json"
        prompt_file.write_text(json.dumps(prompt))
        env = {**os.environ, "TVM_USE_RUNTIME_LIB": "1"}
        cmd = runner_command(bundle_dir, prompt_file, max_new_tokens, threads, touch_kv, verify)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RunFailed(f"runner did not finish within {timeout:.0f} s") from None
    return parse_result(proc.stdout, proc.returncode, proc.stderr)
