"""``build --out`` replaces only a folder that is provably an edgedeploy bundle, and never loses a file."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from edgedeploy.bundle import read_manifest
from edgedeploy.cli import main

SMALL = ["--context", "64", "--prefill-chunk", "16"]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` with the sha256 of its bytes (links by their target)."""
    return {str(p.relative_to(folder)): (f"link:{p.readlink()}" if p.is_symlink()
                                         else hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file() or p.is_symlink()}


def build(model: Path, out: Path) -> int:
    return main(["build", str(model), "--out", str(out), *SMALL])


def web_project(folder: Path) -> Path:
    folder.mkdir()
    (folder / "bundle.json").write_text(json.dumps({"name": "my-site", "entry": "index.js"}))
    (folder / "index.js").write_text("console.log('hi')\n")
    (folder / "src").mkdir()
    (folder / "src" / "app.css").write_text("body {}\n")
    return folder


def test_folder_with_foreign_bundle_json_is_left_alone(tiny_models: dict[str, Path], tmp_path: Path, capsys) -> None:
    site = web_project(tmp_path / "site")
    before = snapshot(site)
    assert build(tiny_models["llama"], site) == 2
    err = capsys.readouterr().err
    assert "not an edgedeploy bundle" in err and "Traceback" not in err
    assert snapshot(site) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site"]  # no partial left beside it


def test_bundle_with_a_user_file_added_is_left_alone(host_bundle: Path, tiny_models: dict[str, Path],
                                                     tmp_path: Path, capsys) -> None:
    out = Path(shutil.copytree(host_bundle, tmp_path / "b"))
    (out / "notes.txt").write_text("my measurements")
    before = snapshot(out)
    assert build(tiny_models["llama"], out) == 2
    assert "notes.txt" in capsys.readouterr().err
    assert snapshot(out) == before


@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_out_that_is_not_a_folder_is_refused(host_bundle: Path, tiny_models: dict[str, Path], tmp_path: Path,
                                             kind: str, capsys) -> None:
    out = tmp_path / "out"
    if kind == "file":
        out.write_text("precious")
    else:
        out.symlink_to(Path(shutil.copytree(host_bundle, tmp_path / "real")))
    before = snapshot(tmp_path)
    assert build(tiny_models["llama"], out) == 2
    assert snapshot(tmp_path) == before
    assert "Traceback" not in capsys.readouterr().err


def test_a_real_bundle_is_replaced_and_an_empty_folder_filled(host_bundle: Path, tiny_models: dict[str, Path],
                                                              tmp_path: Path) -> None:
    out = Path(shutil.copytree(host_bundle, tmp_path / "b"))
    assert read_manifest(out).context_window == 128
    assert build(tiny_models["llama"], out) == 0
    assert read_manifest(out).context_window == 64
    empty = tmp_path / "empty"
    empty.mkdir()
    assert build(tiny_models["qwen2"], empty) == 0 and read_manifest(empty).family == "qwen2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "empty"]


def test_tokenizer_link_out_of_the_model_folder_is_not_copied(tiny_models: dict[str, Path], tmp_path: Path,
                                                               capsys) -> None:
    model = Path(shutil.copytree(tiny_models["llama"], tmp_path / "model"))
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret")
    (model / "tokenizer.model").symlink_to(secret)
    assert build(model, tmp_path / "out") == 2
    assert "tokenizer.model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert not any("top secret" in p.read_text(errors="ignore") for p in tmp_path.rglob("*")
                   if p.is_file() and not p.is_symlink() and p != secret and p.stat().st_size < 2**20)
