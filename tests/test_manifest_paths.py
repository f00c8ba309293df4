"""Names in a manifest or weights index never reach outside the bundle, and a malformed manifest is one line.

A ``bundle.json`` naming ``../../secret.txt`` or an absolute host path once made ``profile`` push that
host file to the device. Every command that reads a bundle must refuse such names before it opens,
hashes or pushes anything.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edgedeploy.bundle import MANIFEST, read_manifest, safe_relative_name
from edgedeploy.cli import main
from edgedeploy.errors import InputError

from .test_virtual_phone import Phone

SECRET = b"host secret: never leaves this machine\n"


@pytest.fixture
def bundle(host_bundle: Path, tmp_path: Path) -> Path:
    (tmp_path / "secret.txt").write_bytes(SECRET)
    return Path(shutil.copytree(host_bundle, tmp_path / "models" / "bundle"))


@pytest.fixture
def phone(tmp_path: Path) -> Iterator[Phone]:
    p = Phone(tmp_path / "sandbox")
    yield p
    p.stop()


def edit_manifest(bundle: Path, change: Callable[[dict], None]) -> None:
    m = json.loads((bundle / MANIFEST).read_text())
    change(m)
    (bundle / MANIFEST).write_text(json.dumps(m))


def secret_entry(name: str) -> Callable[[dict], None]:
    def change(m: dict) -> None:
        m["files"][name] = {"sha256": sha256_file_bytes(SECRET), "bytes": len(SECRET)}
    return change


def sha256_file_bytes(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


ESCAPES = {
    "parent": secret_entry("../../secret.txt"),
    "absolute": lambda m: secret_entry(str(Path(m["source"]).parent / "secret.txt"))(m),
    "absolute-etc": secret_entry("/etc/hostname"),
    "library": lambda m: m.update(library="../../secret.txt"),
    "weights-index": lambda m: m.update(weights_index="/etc/passwd"),
    "dot-segment": secret_entry("sub/../../../secret.txt"),
    "tokenizer": lambda m: m.update(tokenizer_files=["../../secret.txt"]),
    "control-char": secret_entry("evil\nname"),
}


@pytest.mark.parametrize("case", sorted(ESCAPES))
def test_escaping_names_are_refused_before_anything_is_read(case: str, bundle: Path) -> None:
    edit_manifest(bundle, ESCAPES[case])
    with pytest.raises(InputError, match="not a plain relative name|not among the files"):
        read_manifest(bundle)


@pytest.mark.parametrize("case", ["parent", "absolute", "library"])
def test_profile_pushes_nothing_outside_the_bundle(case: str, bundle: Path, phone: Phone, tmp_path: Path,
                                                   capsys) -> None:
    edit_manifest(bundle, ESCAPES[case])
    rc = main(["profile", str(bundle), "--device", f"tcp:127.0.0.1:{phone.port}", "--out", str(tmp_path / "r"),
               "--prompts", "chat-short", "--runs", "1", "--warmup", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "not a plain relative name" in err or "not among the files" in err
    pushed = [p for p in (tmp_path / "sandbox").rglob("*") if p.is_file() and p.read_bytes() == SECRET]
    assert pushed == []


@pytest.mark.parametrize("field, value, needle", [
    ("context_window", "256", "'context_window' must be a positive integer"),
    ("context_window", True, "'context_window' must be a positive integer"),
    ("prefill_chunk", 10**6, "prefill_chunk 1000000 exceeds context_window"),
    ("files", ["model.so"], "'files' must be an object"),
    ("files", {"model.so": "abc"}, "files['model.so'] must be"),
    ("stop_token_ids", [1, True], "'stop_token_ids' must be a list of non-negative integers"),
    ("dtype", "int4", "dtype 'int4' is not float16 or float32"),
    ("library", 7, "'library' must be a string"),
    ("bogus", 1, "unknown field 'bogus'"),
])
def test_malformed_manifest_is_one_line_exit_2(field: str, value: object, needle: str, bundle: Path,
                                               capsys) -> None:
    edit_manifest(bundle, lambda m: m.update({field: value}))
    assert main(["run", str(bundle), "--prompt", "hello"]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_missing_field_and_deep_nesting(bundle: Path, capsys) -> None:
    edit_manifest(bundle, lambda m: m.pop("weights_index"))
    assert main(["run", str(bundle), "--prompt", "hello"]) == 2
    assert "bundle.json: lacks field 'weights_index'" in capsys.readouterr().err
    (bundle / MANIFEST).write_text("[" * 100_000 + "]" * 100_000)
    assert main(["run", str(bundle), "--prompt", "hello"]) == 2
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("name", ["a.bin", "sub/a.bin", "tokenizer.json"])
def test_plain_names_pass(name: str) -> None:
    assert safe_relative_name(name, "x") == name
