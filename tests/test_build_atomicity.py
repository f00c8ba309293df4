"""A build killed at any step of the bundle swap never leaves the user without a bundle.

Each case kills (SIGKILL) a real process at one step of :func:`edgedeploy.bundle.install.install`, then
checks that the next reader (``read_manifest``) or the next build finds a whole bundle at ``--out`` and
that nothing of the swap is left beside it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edgedeploy.bundle import Manifest, read_manifest, verify_bundle, write_manifest
from edgedeploy.bundle.install import Partial, recover
from edgedeploy.checkpoint.config import load_config

KILLER = textwrap.dedent("""
    import os, shutil, signal, sys
    from pathlib import Path
    from edgedeploy.bundle import install
    src, out, step = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    install.after_step = lambda s: os.kill(os.getpid(), signal.SIGKILL) if s == step else None
    work = install.Partial(out)
    shutil.copytree(src, work.path, dirs_exist_ok=True)
    if step == "building":
        os.kill(os.getpid(), signal.SIGKILL)
    install.install(work, out)
""")


#: A valid model config for the manifests (their contents do not matter here, their validity does).
CONFIG = load_config(Path(__file__).parent / "data" / "reference_configs" / "llama-3-8b")[0].to_dict()


def make_bundle(folder: Path, marker: str) -> Path:
    """A small but valid bundle whose library holds ``marker``."""
    folder.mkdir(parents=True)
    (folder / "model.so").write_text(marker)
    (folder / "params_shard_0.bin").write_bytes(b"\0" * 8)
    (folder / "tensor-cache.json").write_text(json.dumps({"records": [{"dataPath": "params_shard_0.bin", "records": [
        {"name": "w", "shape": [4], "dtype": "float16", "format": "raw", "nbytes": 8, "byteOffset": 0}]}]}))
    write_manifest(folder, Manifest(
        architecture="LlamaForCausalLM", family="llama", config=CONFIG, parameters=4, dtype="float16", target="host",
        target_triple="host", context_window=64, prefill_chunk=16, library="model.so",
        weights_index="tensor-cache.json", weights_bytes=8, tokenizer_files=[], stop_token_ids=[1],
        tvm_version="0.27", edgedeploy_version="test", source="test", created="now"))
    return folder


def leftovers(out: Path) -> list[str]:
    return sorted(n for n in os.listdir(out.parent) if n.startswith(f".{out.name}."))


def kill_at(step: str, new: Path, out: Path) -> None:
    r = subprocess.run([sys.executable, "-c", KILLER, str(new), str(out), step], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == -signal.SIGKILL, r.stderr  # it really died at that step


@pytest.mark.parametrize("step, survivor", [("building", "old"), ("ready", "new"), ("moved-old", "new"),
                                            ("swapped", "new"), ("cleaned", "new")])
def test_kill_at_each_step_then_read_recovers(tmp_path: Path, step: str, survivor: str) -> None:
    new = make_bundle(tmp_path / "src-new", "new")
    out = make_bundle(tmp_path / "models" / "out", "old")
    kill_at(step, new, out)
    if step in ("building", "ready", "moved-old"):
        assert leftovers(out), "the kill should have left the swap unfinished"
    m = read_manifest(out)  # any reader repairs first
    verify_bundle(out, m)
    assert (out / "model.so").read_text() == survivor
    assert leftovers(out) == []


@pytest.mark.parametrize("step, installed", [("building", False), ("ready", True)])
def test_kill_with_no_previous_bundle_then_build_path_recovers(tmp_path: Path, step: str, installed: bool) -> None:
    new = make_bundle(tmp_path / "src-new", "new")
    out = tmp_path / "models" / "fresh"
    kill_at(step, new, out)
    assert recover(out)  # what build_bundle runs first
    assert leftovers(out) == []
    assert (out / "model.so").read_text() == "new" if installed else not out.exists()


def test_half_deleted_old_bundle_is_cleaned(tmp_path: Path) -> None:
    out = make_bundle(tmp_path / "out", "new")
    old = make_bundle(tmp_path / ".out.old", "old")
    (old / "model.so").unlink()  # killed while deleting it
    read_manifest(out)
    assert not old.exists() and (out / "model.so").read_text() == "new"


def test_old_bundle_restored_when_nothing_else_is_there(tmp_path: Path) -> None:
    make_bundle(tmp_path / ".out.old", "old")
    m = read_manifest(tmp_path / "out")
    assert m.library == "model.so" and (tmp_path / "out" / "model.so").read_text() == "old"


def test_live_build_partial_is_kept_stale_one_removed(tmp_path: Path) -> None:
    out = make_bundle(tmp_path / "out", "old")
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from edgedeploy.bundle.install import Partial
        p = Partial(Path({str(out)!r}))
        print(p.path, flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        live = Path(holder.stdout.readline().strip())  # type: ignore[union-attr]
        assert live.is_dir()
        recover(out)
        assert live.is_dir(), "a build still running must keep its folder"
    finally:
        holder.kill()
        holder.wait()
    assert any("interrupted build" in a for a in recover(out))
    assert not live.exists() and leftovers(out) == []


def test_failed_build_removes_its_partial(tmp_path: Path) -> None:
    out = tmp_path / "out"
    work = Partial(out)
    (work.path / "x").write_text("half")
    work.discard()
    assert leftovers(out) == [] and not out.exists()
