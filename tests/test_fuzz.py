"""Bounded fuzz test of the files users hand edgedeploy (issue #11): config.json, safetensors headers, the
safetensors index, bundle.json, prompt files and results files (issue #12: ``report`` on a mutated
``results.json``).

Fixed seed, fixed number of cases. Each case mutates one file of a private copy (type swaps, deleted
keys, deep nesting, huge and negative numbers, unicode, truncation, flipped bytes), runs one command
in-process through :func:`edgedeploy.cli.main` (a few more through the real entry point), and requires:

- an exit code in {0, 1, 2}: a mutated input is bad input (2), never a crash, and never a "runner
  failed" (3), which is for a sound bundle that breaks while running;
- no traceback; an exit 2 prints exactly one ``error:`` line, and for a checkpoint file it names it;
- no hang (a deadline per case);
- nothing written: inspect, estimate and run have no output folder, so no file under the arena (the
  inputs, TMPDIR and the working directory) may appear, change or vanish, the input included.

All failures of one target are collected and reported together, each with its exact mutation.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edgedeploy.cli import main

from .test_error_shapes import valid_results
from .test_hostile_checkpoint import deadline

#: The fixed seed and case counts (below) are what CI runs; EDGEDEPLOY_FUZZ_SEED and EDGEDEPLOY_FUZZ_SCALE
#: (a multiplier of the case counts) let a developer search further by hand. Seed 1 is kept because its
#: cases reach a defect other seeds missed (rich markup in a tensor name); every seed must pass.
SEED = int(os.environ.get("EDGEDEPLOY_FUZZ_SEED", "1"))
SCALE = int(os.environ.get("EDGEDEPLOY_FUZZ_SCALE", "1"))
#: Per case; a tiny model's inspect takes milliseconds and a run well under a second.
CASE_LIMIT_S = 20.0
FAMILIES = ("llama", "qwen2", "mistral", "gemma", "phi", "qwen")
COMMANDS = (["inspect"], ["estimate"], ["inspect", "--json"])

# --- mutations ------------------------------------------------------------------------------------------

#: Placeholders that the serialised JSON gets in place of text json.dumps cannot make (too deep, too long).
_DEEP, _DIGITS = "@@fuzz-deep@@", "@@fuzz-digits@@"
Mutation = tuple[bytes, str]  # (new file content, what was done, for the failure report)


def _replacements(old: Any) -> list[Any]:
    """Values of other JSON types and extreme values to put where ``old`` was."""
    return [None, True, False, 0, -1, -(2**63), 0.5, 1e308, float("nan"), float("inf"), 10**30, 2**64, [], {},
            [old], {"x": old}, str(old)[:40], "", "ü漢字🙂", "[/]\x1b[31m\nline", "\ud800", "a" * 5000]


def _paths(value: Any) -> list[tuple[Any, ...]]:
    """Every path (keys and indices) into a parsed JSON value, the root included."""
    out: list[tuple[Any, ...]] = []
    stack: list[tuple[tuple[Any, ...], Any]] = [((), value)]
    while stack:
        path, node = stack.pop()
        out.append(path)
        if isinstance(node, dict):
            stack.extend((path + (k,), v) for k, v in node.items())
        elif isinstance(node, list):
            stack.extend((path + (i,), v) for i, v in enumerate(node))
    return sorted(out, key=repr)  # a fixed order, so the seed alone decides the cases


def _get(value: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        value = value[key]
    return value


_OPS = ("swap", "swap", "swap", "transplant", "rename", "delete", "deep", "digits", "negate")
#: Hostile names for renamed keys: empty, non-ASCII, rich markup with a control character and a line
#: break, a lone surrogate, a very long one, and a harmless unknown one.
_NAMES = ("", "ü漢字🙂", "[/]\x1b[31m\nline", "\ud800", "a" * 5000)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _eligible(op: str, value: Any, paths: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """The paths ``op`` can apply to: keys for a rename, numbers for a negation, anything but the root to
    delete or transplant."""
    if op == "rename":
        return [p for p in paths if p and isinstance(p[-1], str)]
    if op == "negate":
        return [p for p in paths if _is_number(_get(value, p))]
    if op in ("delete", "transplant"):
        return [p for p in paths if p]
    return paths


def _new_value(rng: random.Random, op: str, old: Any, value: Any, paths: list[tuple[Any, ...]]) -> Any:
    """The value a swap, transplant, negation, deep nesting or huge number puts where ``old`` was."""
    if op == "deep":
        return _DEEP
    if op == "digits":
        return _DIGITS
    if op == "negate":
        return -old if old else -1
    if op == "transplant":
        # A value of the right shape from elsewhere in the same file (a real shard name as the library,
        # a real offset as a size) gets past type checks that a random value fails.
        others = [p for p in paths if json.dumps(_get(value, p)) != json.dumps(old)]
        return json.loads(json.dumps(_get(value, rng.choice(others)))) if others else None
    return rng.choice([r for r in _replacements(old) if json.dumps(r) != json.dumps(old)])


def mutate_json_tree(rng: random.Random, data: bytes) -> Mutation:
    """Change one node of a JSON document: swap its type or value, rename or delete it, nest it deep, make it
    huge or negative, or copy another node's value over it."""
    value = json.loads(data)
    paths = _paths(value)
    op = rng.choice(_OPS)
    candidates = _eligible(op, value, paths)
    if not candidates:
        op, candidates = "swap", paths
    path = rng.choice(candidates)
    old = _get(value, path)
    if op == "rename":
        new = rng.choice([n for n in _NAMES + (path[-1] + "x",) if n != path[-1]])
        parent = _get(value, path[:-1])
        parent[new] = parent.pop(path[-1])
        return json.dumps(value).encode(), f"rename key {list(path)!r:.120} -> {new!r:.60}"
    if op == "delete":
        del _get(value, path[:-1])[path[-1]]
        return json.dumps(value).encode(), f"delete {list(path)!r:.120} (was {old!r:.40})"
    new = _new_value(rng, op, old, value, paths)
    if path:
        _get(value, path[:-1])[path[-1]] = new
    else:
        value = new
    depth = rng.choice([70, 3000, 100_000])
    text = json.dumps(value).replace(json.dumps(_DEEP), "[" * depth + "]" * depth)
    text = text.replace(json.dumps(_DIGITS), "9" * 5000)
    shown = {_DEEP: f"<{depth} nested lists>", _DIGITS: "<a 5000-digit number>"}.get(new, new) \
        if isinstance(new, str) else new
    return text.encode(), f"{op} at {list(path)!r:.120}: {old!r:.40} -> {shown!r:.60}"


def mutate_bytes(rng: random.Random, data: bytes, region: int | None = None) -> Mutation:
    """Flip bits, insert a byte or truncate, within the first ``region`` bytes (default: all)."""
    region = min(region or len(data), len(data))
    out = bytearray(data)
    op = rng.choice(["flip", "flip", "insert", "truncate"])
    if op == "truncate":
        at = rng.randrange(len(data))
        return bytes(out[:at]), f"truncate to {at} of {len(data)} bytes"
    if op == "insert":
        at, byte = rng.randrange(region), rng.choice([b"\x00", b"\xff", b"{", b"]", b'"', b"\\", b"9"])
        out[at:at] = byte
        return bytes(out), f"insert {byte!r} at byte {at}"
    flips = sorted({(rng.randrange(region), rng.randrange(8)) for _ in range(rng.randint(1, 4))})
    for at, bit in flips:
        out[at] ^= 1 << bit
    return bytes(out), f"flip (byte, bit) {flips}"


def mutate_json_file(rng: random.Random, data: bytes) -> Mutation:
    return mutate_json_tree(rng, data) if rng.random() < 0.75 else mutate_bytes(rng, data)


def mutate_safetensors(rng: random.Random, data: bytes) -> Mutation:
    """Mutate the header as JSON (length prefix kept consistent), or its bytes (prefix included), or truncate."""
    (n,) = struct.unpack("<Q", data[:8])
    if rng.random() < 0.6:
        header, what = mutate_json_tree(rng, data[8 : 8 + n])
        return struct.pack("<Q", len(header)) + header + data[8 + n :], f"header {what}"
    return mutate_bytes(rng, data, region=8 + n)


# --- the arena: private copies of every input, and a snapshot of everything under it -----------------------

@dataclass(frozen=True)
class Arena:
    root: Path

    def model(self, family: str) -> Path:
        return self.root / "models" / family

    @property
    def bundle(self) -> Path:
        return self.root / "bundle"

    @property
    def prompt(self) -> Path:
        return self.root / "prompt.json"

    @property
    def results(self) -> Path:
        return self.root / "results.json"


@pytest.fixture
def arena(tiny_models: dict[str, Path], host_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Arena:
    """Copies of the tiny checkpoints, the host bundle and a prompt; TMPDIR and the working dir inside too."""
    a = Arena(tmp_path / "arena")
    for family in FAMILIES:
        shutil.copytree(tiny_models[family], a.model(family))
    shutil.copytree(host_bundle, a.bundle)
    a.prompt.write_text(json.dumps({"token_ids": [5, 17, 42, 7], "max_new_tokens": 2}))
    a.results.write_text(json.dumps(valid_results(), indent=1))
    for sub in ("tmp", "cwd"):
        (a.root / sub).mkdir()
    monkeypatch.setenv("TMPDIR", str(a.root / "tmp"))
    monkeypatch.setattr(tempfile, "tempdir", str(a.root / "tmp"))
    monkeypatch.chdir(a.root / "cwd")
    return a


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every entry under ``root``, links not followed: relative path -> (mode, size, mtime).

    A folder's size and mtime are left out: a temporary file made and removed again (the run's prompt
    in TMPDIR) changes them without leaving anything behind.
    """
    out: dict[str, tuple[int, int, int]] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            st = os.lstat(path)
            is_dir = stat.S_ISDIR(st.st_mode)
            size, mtime = (0, 0) if is_dir else (st.st_size, st.st_mtime_ns)
            out[os.path.relpath(path, root)] = (st.st_mode, size, mtime)
    return out


# --- targets and cases ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """One kind of input: which file a case mutates, how, and which command then reads it."""

    name: str
    cases: int
    file: Callable[[Arena, int], Path]
    mutate: Callable[[random.Random, bytes], Mutation]
    argv: Callable[[Arena, int], list[str]]
    #: Whether an exit-2 error must name the file's folder (checkpoint files: the error says which file).
    names_folder: bool


def _checkpoint_argv(family: Callable[[int], str]) -> Callable[[Arena, int], list[str]]:
    """Case i runs inspect, estimate or inspect --json in turn on the model ``family(i)``."""

    def argv(a: Arena, i: int) -> list[str]:
        command, *flags = COMMANDS[i % len(COMMANDS)]
        return [command, str(a.model(family(i))), *flags]

    return argv


def _run_argv(a: Arena, i: int) -> list[str]:
    return ["run", str(a.bundle), "--prompt-file", str(a.prompt), "--max-new-tokens", "2", "--json"]


#: ``report`` renders a results file in every format in turn (the typed records check it on load).
REPORT_FORMATS = ("md", "junit", "json", "html", "challenge-csv")


def _report_argv(a: Arena, i: int) -> list[str]:
    return ["report", str(a.results), "--format", REPORT_FORMATS[i % len(REPORT_FORMATS)]]


def _family(i: int) -> str:
    return FAMILIES[(i // len(COMMANDS)) % len(FAMILIES)]


def _header_file(a: Arena, i: int) -> Path:
    """One safetensors file of the family of case i (the Llama's shards in turn)."""
    files = sorted(a.model(_family(i)).glob("*.safetensors"))
    return files[i % len(files)]


TARGETS: dict[str, Target] = {t.name: t for t in [
    Target("config.json", 300, lambda a, i: a.model(_family(i)) / "config.json", mutate_json_file,
           _checkpoint_argv(_family), True),
    Target("safetensors header", 300, _header_file, mutate_safetensors, _checkpoint_argv(_family), True),
    Target("safetensors index", 60, lambda a, i: a.model("llama") / "model.safetensors.index.json",
           mutate_json_file, _checkpoint_argv(lambda i: "llama"), True),
    Target("bundle.json", 24, lambda a, i: a.bundle / "bundle.json", mutate_json_file, _run_argv, False),
    Target("prompt file", 20, lambda a, i: a.prompt, mutate_json_file, _run_argv, False),
    Target("results file", 100, lambda a, i: a.results, mutate_json_file, _report_argv, False),
]}


def _where(e: BaseException) -> str:
    """The exception and the innermost edgedeploy frame it came from, for the report."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if "/edgedeploy/" in f.filename]
    at = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno} in {frames[-1].name}" if frames else ""
    return f"{type(e).__name__}: {str(e)[:160]}{at}"


def _judge(rc: int | None, out: str, err: str, crash: str | None, folder: Path | None) -> str | None:
    """What is wrong with one case's outcome, or None."""
    if crash:
        return crash
    if rc not in (0, 1, 2):
        return f"exit code {rc}: {err.strip()[-300:]}"
    if "Traceback" in out + err:
        return "printed a traceback"
    if rc == 2:
        lines = err.strip().splitlines()
        if len(lines) != 1 or not lines[0].startswith("error:"):
            return f"not one error line: {err[:300]!r}"
        if folder is not None and str(folder) not in err:
            return f"the error does not name the checkpoint: {err.strip()[:300]}"
    return None


def _run_case(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int | None, str, str, str | None]:
    """(exit code, stdout, stderr, crash) of the CLI in-process; a hang past the deadline is a crash."""
    rc, crash = None, None
    try:
        with deadline(CASE_LIMIT_S):
            rc = main(argv)
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 2
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001 - any escape from main is what the fuzz test looks for
        crash = "hang: " + str(e) if isinstance(e, TimeoutError) else _where(e)
    out, err = capsys.readouterr()
    return rc, out, err, crash


def fuzz(target: Target, arena: Arena, run: Callable[[list[str]], tuple[int | None, str, str, str | None]],
         cases: range, seed: str) -> list[str]:
    """Run ``cases`` of ``target``; return one line per failing case (exact mutation, command, problem)."""
    rng = random.Random(seed)
    failures = []
    for i in cases:
        path = target.file(arena, i)
        original = path.read_bytes()
        mutated, what = target.mutate(rng, original)
        path.write_bytes(mutated)
        argv = target.argv(arena, i)
        before = snapshot(arena.root)
        rc, out, err, crash = run(argv)
        problem = _judge(rc, out, err, crash, path.parent if target.names_folder else None)
        after = snapshot(arena.root)
        if problem is None and (before != after or path.read_bytes() != mutated):
            changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
            problem = f"wrote files: {changed[:5]}" if changed else "rewrote its input"
        if problem:
            shown = " ".join(a.replace(str(arena.root), "ARENA") for a in argv)
            failures.append(f"{target.name} case {i} [{path.relative_to(arena.root)}: {what}] "
                            f"`edgedeploy {shown}`: {problem}")
        path.write_bytes(original)
    return failures


@pytest.mark.parametrize("name", list(TARGETS))
def test_fuzz_in_process(capsys: pytest.CaptureFixture[str], arena: Arena, name: str) -> None:
    target = TARGETS[name]
    cases = range(target.cases * SCALE)
    failures = fuzz(target, arena, lambda argv: _run_case(capsys, argv), cases, f"{SEED}-{name}")
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n".join(failures)


def _run_process(arena: Arena, argv: list[str]) -> tuple[int | None, str, str, str | None]:
    """The real entry point (``python -m edgedeploy.cli``) with a timeout."""
    env = {**os.environ, "TMPDIR": str(arena.root / "tmp"), "COLUMNS": "200"}
    try:
        proc = subprocess.run([sys.executable, "-m", "edgedeploy.cli", *argv], capture_output=True, text=True,
                              env=env, timeout=60, cwd=arena.root / "cwd")
    except subprocess.TimeoutExpired:
        return None, "", "", "hang: no exit within 60 s"
    return proc.returncode, proc.stdout, proc.stderr, None


#: (target, case indices) run through the real entry point: a small sample of each kind.
PROCESS_SAMPLE = [("config.json", range(0, 3)), ("safetensors header", range(0, 3)), ("bundle.json", range(0, 2)),
                  ("prompt file", range(0, 2)), ("results file", range(0, 2))]


@pytest.mark.parametrize(("name", "cases"), PROCESS_SAMPLE, ids=[n for n, _ in PROCESS_SAMPLE])
def test_fuzz_real_entry_point(arena: Arena, name: str, cases: range) -> None:
    """The same checks through a real process: exit codes and one-line errors hold outside pytest's capture."""
    target = TARGETS[name]
    failures = fuzz(target, arena, lambda argv: _run_process(arena, argv), cases, f"{SEED}-process-{name}")
    assert not failures, "\n".join(failures)


def test_mutators_change_their_input() -> None:
    """A fuzz case that changed nothing would test nothing: every mutation changes the bytes."""
    rng = random.Random(SEED)
    doc = json.dumps({"a": [1, 2.5, "x"], "b": {"c": True}}).encode()
    for _ in range(200):
        mutated, what = mutate_json_file(rng, doc)
        assert mutated != doc, what
    blob = struct.pack("<Q", len(doc)) + doc + b"\0" * 8
    assert all(mutate_safetensors(rng, blob)[0] != blob for _ in range(50))
