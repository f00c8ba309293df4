"""The command line: JSON output, exit codes, and one-line errors (exit 2, no traceback) for bad input."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from edgedeploy.cli import main

from .conftest import REFERENCE_CONFIGS


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def test_inspect_json(capsys, tiny_models) -> None:
    rc, out, _ = run_cli(capsys, "inspect", str(tiny_models["phi"]), "--json")
    data = json.loads(out)
    assert rc == 0
    assert data["schema_version"] == 1 and data["architecture"] == "PhiForCausalLM"
    assert data["parameters"] == data["parameters_from_config"]
    assert data["rules"]["status"] == "PASS"
    assert data["config"]["rotary_dim"] == 6  # partial rotary 0.4 of head dim 16


def test_estimate_exit_codes_follow_verdict(capsys) -> None:
    rc, out, _ = run_cli(capsys, "estimate", str(REFERENCE_CONFIGS / "phi-2"), "--json")
    assert rc == 0 and json.loads(out)["estimate"]["verdict"] == "FITS"
    rc, out, _ = run_cli(capsys, "estimate", str(REFERENCE_CONFIGS / "llama-3-8b"), "--json")
    assert rc == 1 and json.loads(out)["estimate"]["verdict"] == "DOES NOT FIT"


def test_estimate_table_shows_breakdown(capsys) -> None:
    rc, out, _ = run_cli(capsys, "estimate", str(REFERENCE_CONFIGS / "phi-2"), "--context", "1024")
    assert rc == 0
    for needle in ("weights", "KV cache (1024 tokens)", "predicted peak", "FITS", "decode (roofline)"):
        assert needle in out


def test_profiles_lists_reference(capsys) -> None:
    rc, out, _ = run_cli(capsys, "profiles", "--json")
    assert rc == 0 and "reference-12gb" in {p["name"] for p in json.loads(out)["profiles"]}


def test_quantized_checkpoint_exit_1(capsys, tiny_models, tmp_path) -> None:
    folder = tmp_path / "q"
    shutil.copytree(tiny_models["qwen2"], folder)
    raw = json.loads((folder / "config.json").read_text())
    raw["quantization_config"] = {"quant_method": "awq"}
    (folder / "config.json").write_text(json.dumps(raw))
    rc, out, _ = run_cli(capsys, "inspect", str(folder), "--json")
    assert rc == 1 and json.loads(out)["rules"]["status"] == "FAIL"


# --- bad input: each makes a folder (or not) and names a fragment the one-line error must contain ---

def _missing(tmp: Path, models: dict[str, Path]) -> Path:
    return tmp / "nope"


def _no_config(tmp: Path, models: dict[str, Path]) -> Path:
    (tmp / "m").mkdir()
    (tmp / "m" / "README.md").write_text("hi")
    return tmp / "m"


def _config(tmp: Path, text: str) -> Path:
    (tmp / "m").mkdir()
    (tmp / "m" / "config.json").write_text(text)
    return tmp / "m"


def _malformed(tmp: Path, models: dict[str, Path]) -> Path:
    return _config(tmp, '{"architectures": ["LlamaForCausalLM"], ')


def _lacks_fields(tmp: Path, models: dict[str, Path]) -> Path:
    return _config(tmp, json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 64}))


def _unknown_arch(tmp: Path, models: dict[str, Path]) -> Path:
    return _config(tmp, json.dumps({"architectures": ["MambaForCausalLM"], "hidden_size": 64}))


def _copy(tmp: Path, models: dict[str, Path], family: str) -> Path:
    return Path(shutil.copytree(models[family], tmp / "m"))


def _truncated(tmp: Path, models: dict[str, Path]) -> Path:
    folder = _copy(tmp, models, "qwen2")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    return folder


def _lying_header(tmp: Path, models: dict[str, Path]) -> Path:
    folder = _copy(tmp, models, "qwen2")
    path = folder / "model.safetensors"
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [d * 2 for d in header[name]["shape"]]
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data[8 + n :])
    return folder


def _header_too_long(tmp: Path, models: dict[str, Path]) -> Path:
    folder = _copy(tmp, models, "phi")
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[:8] = struct.pack("<Q", 10 * len(data))
    path.write_bytes(bytes(data))
    return folder


def _missing_shard(tmp: Path, models: dict[str, Path]) -> Path:
    folder = _copy(tmp, models, "llama")
    victim = sorted(folder.glob("model-*.safetensors"))[1]
    victim.unlink()
    return folder


def _empty(tmp: Path, models: dict[str, Path]) -> Path:
    (tmp / "m").mkdir()
    return tmp / "m"


def _a_file(tmp: Path, models: dict[str, Path]) -> Path:
    (tmp / "f.json").write_text("{}")
    return tmp / "f.json"


BAD_INPUTS: dict[str, tuple[Callable[[Path, dict[str, Path]], Path], str]] = {
    "missing folder": (_missing, "no such folder"),
    "no config.json": (_no_config, "no config.json"),
    "malformed JSON": (_malformed, "config.json is not valid JSON"),
    "config lacks fields": (_lacks_fields, "lacks required field 'num_attention_heads'"),
    "unknown architecture": (_unknown_arch, "unsupported architecture 'MambaForCausalLM'"),
    "truncated safetensors": (_truncated, "truncated"),
    "lying header": (_lying_header, "spans"),
    "header longer than file": (_header_too_long, "header claims"),
    "index names missing shard": (_missing_shard, "which is missing"),
    "empty folder": (_empty, "folder is empty"),
    "path is a file": (_a_file, "is a file"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
@pytest.mark.parametrize("command", ["inspect", "estimate"])
def test_bad_input_one_line_exit_2(capsys, tiny_models, tmp_path, case: str, command: str) -> None:
    make, needle = BAD_INPUTS[case]
    path = make(tmp_path, tiny_models)
    rc, out, err = run_cli(capsys, command, str(path))
    assert rc == 2
    assert needle in err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err + out


def test_real_process_exit_code_and_no_traceback(tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-m", "edgedeploy.cli", "inspect", str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "no such folder" in proc.stderr and "Traceback" not in proc.stderr


def test_bad_option_values_exit_2(capsys) -> None:
    rc, _, err = run_cli(capsys, "estimate", str(REFERENCE_CONFIGS / "phi-2"), "--context", "0")
    assert rc == 2 and "--context" in err
    rc, _, err = run_cli(capsys, "estimate", str(REFERENCE_CONFIGS / "phi-2"), "--profile", "nokia")
    assert rc == 2 and "unknown device profile" in err


def test_run_prompt_file_honours_the_file_and_shows_text_and_ids(host_bundle: Path, tmp_path: Path, capsys) -> None:
    """`run --prompt-file`: the file's max_new_tokens and stop_token_ids reach the runner (an option still
    wins), and the normal output shows the generated text and ids (issue #10, item 2)."""
    prompt = [5, 17, 42, 99, 7, 3, 250, 11]
    file = tmp_path / "prompt.json"
    file.write_text(json.dumps({"token_ids": prompt, "max_new_tokens": 6, "stop_token_ids": []}))
    rc, out, _ = run_cli(capsys, "run", str(host_bundle), "--prompt-file", str(file), "--json")
    free = json.loads(out)["result"]["token_ids"]
    assert rc == 0 and len(free) == 6  # the file's 6, not the option's default of 32
    stop = free[3]
    file.write_text(json.dumps({"token_ids": prompt, "max_new_tokens": 6, "stop_token_ids": [stop]}))
    rc, out, _ = run_cli(capsys, "run", str(host_bundle), "--prompt-file", str(file), "--json")
    stopped = json.loads(out)
    assert stopped["result"]["token_ids"] == free[:free.index(stop) + 1]
    assert stopped["result"]["finish_reason"] == "stop" and stopped["text"] is not None
    rc, out, _ = run_cli(capsys, "run", str(host_bundle), "--prompt-file", str(file), "--max-new-tokens", "2",
                         "--json")
    assert json.loads(out)["result"]["token_ids"] == free[:2]
    rc, out, _ = run_cli(capsys, "run", str(host_bundle), "--prompt-file", str(file))
    assert rc == 0
    assert "token ids: " + " ".join(str(t) for t in stopped["result"]["token_ids"]) in out
    assert "output:" in out and "stop" in out
    words = stopped["text"].split()
    assert not words or words[0] in out


@pytest.mark.parametrize("inside", ["original", "."])
def test_meta_original_layout_says_how_to_get_the_hugging_face_one(tmp_path: Path, capsys, inside: str) -> None:
    """Only Meta's files (in original/, as Hugging Face repositories keep them, or at the top as Meta's own
    download): the error says what they are and how to get config.json + safetensors (issue #10, item 4)."""
    folder = tmp_path / "Meta-Llama-3-8B"
    meta = folder / inside
    meta.mkdir(parents=True, exist_ok=True)
    (meta / "params.json").write_text(json.dumps({"dim": 4096, "n_layers": 32, "n_heads": 32, "vocab_size": 128256}))
    (meta / "consolidated.00.pth").write_bytes(b"PK\x03\x04 not read")
    (meta / "tokenizer.model").write_text("not read either")
    for command in ("inspect", "build"):
        rc, out, err = run_cli(capsys, command, str(folder))
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert rc == 2 and len(lines) == 1 and "Traceback" not in err
        line = lines[0]
        assert line.startswith(f"error: {folder}: no config.json: ")
        where = folder if inside == "." else folder / inside
        assert f"{where} holds Meta's original Llama release (params.json, consolidated.*.pth" in line
        assert f"--input_dir {where} " in line
        assert "convert_llama_weights_to_hf.py" in line and "--exclude 'original/*'" in line
    (meta / "params.json").unlink()  # not Meta's layout any more: the plain message
    rc, _, err = run_cli(capsys, "inspect", str(folder))
    assert rc == 2 and "no config.json (is this a Hugging Face model folder?)" in err
