"""Bundle build and host run through the same functions the CLI calls: manifest, hashes, runner process."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgedeploy.bundle import MANIFEST, read_manifest, sha256_file, verify_bundle
from edgedeploy.cli import main
from edgedeploy.compile.build import RuleFailure, build_bundle
from edgedeploy.errors import InputError
from edgedeploy.runtime.launch import run_local, tokenize


@pytest.fixture(scope="module")
def bundle(host_bundle: Path) -> Path:
    return host_bundle


def test_build_reports_each_stage(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    stages: list[str] = []
    build_bundle(tiny_models["phi"], tmp_path / "phi", context_window=64, prefill_chunk=16,
                 progress=lambda stage, done, total: stages.append(stage))
    assert {"compile", "weights", "manifest"} <= set(stages)


def test_manifest_records_sizes_and_every_file(bundle: Path, tiny_models: dict[str, Path]) -> None:
    m = read_manifest(bundle)
    assert (m.architecture, m.dtype, m.target) == ("LlamaForCausalLM", "float16", "host")
    assert (m.context_window, m.prefill_chunk) == (128, 32)
    assert m.config["num_layers"] == 2 and m.tvm_version.startswith("0.27")
    on_disk = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()} - {MANIFEST}
    assert set(m.files) == on_disk
    assert {"model.so", "tensor-cache.json", "tokenizer.json"} <= on_disk
    for rel, meta in m.files.items():
        assert sha256_file(bundle / rel) == meta["sha256"]
    assert 1 in m.stop_token_ids  # eos of the tiny tokenizer and config
    assert m.rules["status"] == "PASS"


def test_fp16_weights_are_written_bit_for_bit(bundle: Path, tiny_models: dict[str, Path]) -> None:
    """The embedding table is not fused, so its bytes in the shards equal the checkpoint's bytes."""
    from safetensors import safe_open

    index = json.loads((bundle / "tensor-cache.json").read_text())
    entry, shard = next((r, s) for s in index["records"] for r in s["records"] if "embed_tokens" in r["name"])
    data = (bundle / shard["dataPath"]).read_bytes()[entry["byteOffset"] : entry["byteOffset"] + entry["nbytes"]]
    src = tiny_models["llama"]
    files = sorted(src.glob("*.safetensors"))
    for f in files:
        with safe_open(str(f), framework="numpy") as h:
            if "model.embed_tokens.weight" in h.keys():
                assert h.get_tensor("model.embed_tokens.weight").tobytes() == data
                return
    raise AssertionError("embedding not found in checkpoint")


def test_altered_and_missing_files_are_named(bundle: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(bundle, tmp_path / "b"))
    shard = sorted(copy.glob("params_shard_*.bin"))[0]
    with shard.open("r+b") as f:
        f.seek(10)
        f.write(b"\xff\xfe")
    with pytest.raises(InputError, match=f"{shard.name} was altered"):
        verify_bundle(copy)
    shard.unlink()
    with pytest.raises(InputError, match=f"{shard.name} is missing"):
        verify_bundle(copy)


def test_run_in_runner_process_reports_metrics(bundle: Path) -> None:
    ids = tokenize(bundle, "hello world")
    r = run_local(bundle, ids, max_new_tokens=8)
    assert r["error"] is None and r["exit_code"] == 0
    assert len(r["token_ids"]) == 8 and r["prompt_tokens"] == len(ids)
    assert r["load_s"] > 0 and r["ttft_s"] > 0 and r["decode_tok_s"] > 0
    assert r["peak_rss_bytes"] >= r["rss_bytes"] > 10 * 2**20
    # The runner's own process imports no torch: its peak is far below torch's ~240 MB import alone.
    assert r["peak_rss_bytes"] < 200 * 2**20


def test_runner_imports_neither_torch_nor_compiler(bundle: Path, tmp_path: Path) -> None:
    code = ("import os, sys; os.environ['TVM_USE_RUNTIME_LIB']='1';"
            "from edgedeploy.runtime import runner; "
            f"runner.main([{str(bundle)!r}, '--prompt-file', {str(tmp_path / 'p.json')!r}, '--max-new-tokens', '2']);"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')"
            " or m.startswith('tvm.relax')))")
    (tmp_path / "p.json").write_text("[5, 6, 7]")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    lines = out.strip().splitlines()
    assert json.loads(lines[0])["error"] is None
    assert lines[-1] == "[]"


def test_cli_build_and_run_json(tiny_models: dict[str, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "qwen2-bundle"
    assert main(["build", str(tiny_models["qwen2"]), "--out", str(out), "--context", "64",
                 "--prefill-chunk", "16", "--json"]) == 0
    built = json.loads(capsys.readouterr().out)
    assert built["manifest"]["architecture"] == "Qwen2ForCausalLM"
    assert main(["run", str(out), "--prompt", "the quick brown fox", "--max-new-tokens", "5", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["result"]["token_ids"]) <= 5 and isinstance(data["text"], str)


def test_prompt_longer_than_context_is_refused_or_truncated(bundle: Path, capsys) -> None:
    long_prompt = "the quick brown fox jumps over the lazy dog " * 40
    assert len(tokenize(bundle, long_prompt)) > 128
    assert main(["run", str(bundle), "--prompt", long_prompt]) == 2
    assert "longer than the bundle's context window (128)" in capsys.readouterr().err
    assert main(["run", str(bundle), "--prompt", long_prompt, "--truncate", "--max-new-tokens", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)["result"]
    assert result["prompt_tokens"] == 124 and len(result["token_ids"]) == 4


def test_runner_refuses_overlong_ids_itself(bundle: Path, tmp_path: Path) -> None:
    """The runner guards the context window too: a device run gets no host-side check."""
    r = run_local(bundle, list(range(5, 5 + 200)), max_new_tokens=4)
    assert r["exit_code"] == 2 and "longer than the context window" in r["error"]


def test_android_bundle_refused_on_host(tiny_models: dict[str, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "android"
    build_bundle(tiny_models["llama"], out, target="android", context_window=64, prefill_chunk=16)
    assert read_manifest(out).library == "model.tar"
    assert main(["run", str(out), "--prompt", "hello"]) == 2
    assert "built for target 'android'" in capsys.readouterr().err


def test_quantized_checkpoint_is_not_built(tiny_models: dict[str, Path], tmp_path: Path, capsys) -> None:
    folder = Path(shutil.copytree(tiny_models["llama"], tmp_path / "q"))
    raw = json.loads((folder / "config.json").read_text())
    raw["quantization_config"] = {"quant_method": "gptq"}
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(RuleFailure):
        build_bundle(folder, tmp_path / "out")
    assert main(["build", str(folder), "--out", str(tmp_path / "out")]) == 1
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.*"))  # no half-written bundle left behind


def test_unsupported_architecture_build_error(tmp_path: Path, capsys) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    assert main(["build", str(tmp_path / "m")]) == 2
    assert "unsupported architecture 'GPT2LMHeadModel'" in capsys.readouterr().err


def test_failed_build_leaves_old_bundle_intact(bundle: Path, tiny_models: dict[str, Path], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    copy = Path(shutil.copytree(bundle, tmp_path / "b"))
    before = read_manifest(copy).files
    with pytest.raises(InputError, match="larger than --context"):
        build_bundle(tiny_models["llama"], copy, context_window=64, prefill_chunk=128)

    def broken_writer(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    # A failure half-way (after the library is compiled) must not touch the old bundle either.
    import edgedeploy.compile.weights as weights

    monkeypatch.setattr(weights, "write_tensor_cache", broken_writer)
    with pytest.raises(OSError, match="No space left"):
        build_bundle(tiny_models["llama"], copy, context_window=64, prefill_chunk=16)
    assert read_manifest(copy).files == before
    verify_bundle(copy)
    assert not list(tmp_path.glob(".b.*"))


def test_bad_prompt_file_for_run_and_runner(bundle: Path, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "ids.json"
    bad.write_text("[1, 2,")
    assert main(["run", str(bundle), "--prompt-file", str(bad)]) == 2
    assert "prompt file is not valid JSON" in capsys.readouterr().err
    bad.write_text('{"token_ids": [1, -2]}')
    out = subprocess.run([sys.executable, "-m", "edgedeploy.runtime.runner", str(bundle), "--prompt-file", str(bad)],
                         capture_output=True, text=True, timeout=120)
    line = json.loads(out.stdout.strip().splitlines()[-1])
    assert out.returncode == 2 and line["error_kind"] == "input" and "non-negative integers" in line["error"]


def test_light_stack_matches_inspect_where_tvmscript_reads_it() -> None:
    """The build's cheap ``inspect.stack`` (see ``compile/library.py``) gives TVMScript the same frames, and the
    same source lines for the frames it reads."""
    import inspect

    from edgedeploy.compile.library import _FRAMES_WITH_SOURCE, _light_stack

    def nested(depth: int) -> tuple[list[inspect.FrameInfo], list[inspect.FrameInfo]]:
        return nested(depth - 1) if depth else (inspect.stack(), _light_stack())

    full, light = nested(3)
    assert len(light) == len(full) > _FRAMES_WITH_SOURCE
    for i, (f, g) in enumerate(zip(full, light, strict=True)):
        assert (g.frame, g.lineno, g.function) == (f.frame, f.lineno, f.function), i
        assert g.filename == f.frame.f_code.co_filename
        if i < _FRAMES_WITH_SOURCE:
            assert (g.code_context, g.index) == (f.code_context, f.index), i
    assert light[0].code_context[0].strip().startswith("return nested(depth - 1)")
