"""`edgedeploy convert`: LLM-Pruner's pickled whole model -> a Hugging Face folder (issue #10, item 1).

The pickles are made here from a tiny transformers Llama pruned non-uniformly in memory, as LLM-Pruner does:
layer 0's MLP keeps 96 of its 128 channels (gate/up rows and down columns sliced), layer 1 keeps all 128.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from edgedeploy.cli import main  # noqa: E402
from edgedeploy.tiny import make_tokenizer  # noqa: E402

KEEP = 96


def _pruned_llama() -> object:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=384, max_position_embeddings=128, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    mlp = model.model.layers[0].mlp
    keep = torch.randperm(128)[:KEEP].sort().values  # channels chosen by importance, here at random
    with torch.no_grad():
        for name in ("gate_proj", "up_proj"):
            old = getattr(mlp, name)
            new = torch.nn.Linear(64, KEEP, bias=False)
            new.weight.copy_(old.weight[keep])
            setattr(mlp, name, new)
        new = torch.nn.Linear(KEEP, 64, bias=False)
        new.weight.copy_(mlp.down_proj.weight[:, keep])
        mlp.down_proj = new
    return model


@pytest.fixture(scope="module")
def pickles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """LLM-Pruner's {'model', 'tokenizer'} file, a bare-model file, a tokenizer folder, and the model itself."""
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("pickles")
    tok_dir = root / "tok"
    tok_dir.mkdir()
    make_tokenizer(tok_dir)
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json"), eos_token="</s>")
    model = _pruned_llama()
    torch.save({"model": model, "tokenizer": tokenizer}, root / "pytorch_model.bin")
    torch.save(model, root / "bare.bin")
    torch.save({"state_dict": model.state_dict()}, root / "weights-only.bin")
    return {"dict": root / "pytorch_model.bin", "bare": root / "bare.bin", "weights-only": root / "weights-only.bin",
            "tok": tok_dir, "model": model}  # type: ignore[dict-item]


def test_convert_writes_the_pruned_shapes_and_values(pickles: dict, tmp_path: Path, capsys) -> None:
    from safetensors.torch import load_file

    out = tmp_path / "hf"
    rc = main(["convert", str(pickles["dict"]), "--out", str(out), "--trust-pickle"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "runs code from the file" in captured.err and "converted" in captured.out
    files = sorted(p.name for p in out.iterdir())
    assert "config.json" in files and "tokenizer.json" in files and "tokenizer_config.json" in files
    assert [f for f in files if f.endswith(".safetensors")] == ["model.safetensors"]
    tensors = load_file(str(out / "model.safetensors"))
    assert tensors["model.layers.0.mlp.gate_proj.weight"].shape == (KEEP, 64)
    assert tensors["model.layers.0.mlp.up_proj.weight"].shape == (KEEP, 64)
    assert tensors["model.layers.0.mlp.down_proj.weight"].shape == (64, KEEP)
    assert tensors["model.layers.1.mlp.gate_proj.weight"].shape == (128, 64)
    assert tensors["model.layers.1.mlp.down_proj.weight"].shape == (64, 128)
    state = pickles["model"].state_dict()
    assert set(tensors) == set(state)
    for name, value in state.items():
        assert torch.equal(tensors[name], value), name
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert not [p for p in tmp_path.iterdir() if p.name != "hf"]  # no temporary folder left beside it


def test_bare_model_with_tokenizer_from_a_folder(pickles: dict, tmp_path: Path, capsys) -> None:
    from safetensors.torch import load_file

    out = tmp_path / "hf"
    out.mkdir()  # an empty folder may be the destination
    rc = main(["convert", str(pickles["bare"]), "--out", str(out), "--trust-pickle", "--tokenizer-from",
               str(pickles["tok"]), "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "convert" and report["tokenizer_from"] == str(pickles["tok"])
    assert report["parameters"] == sum(p.numel() for p in pickles["model"].parameters())
    assert (out / "tokenizer.json").read_bytes() == (pickles["tok"] / "tokenizer.json").read_bytes()
    assert load_file(str(out / "model.safetensors"))["model.layers.0.mlp.down_proj.weight"].shape == (64, KEEP)


def test_refuses_without_trust_pickle_and_loads_nothing(pickles: dict, tmp_path: Path, capsys) -> None:
    out = tmp_path / "hf"
    rc = main(["convert", str(pickles["dict"]), "--out", str(out)])
    out_text, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ")
    assert "runs code from the file" in err and "--trust-pickle" in err and str(pickles["dict"]) in err
    assert not out.exists() and os.listdir(tmp_path) == []


@pytest.mark.parametrize("case, needle", [
    ("non-empty out", "--out is not empty"),
    ("not a model", "holds a collections.OrderedDict, not a transformers model"),
    ("missing file", "no such file"),
    ("not a pickle", "cannot load the pickled model"),
    ("tokenizer folder without tokenizer", "no tokenizer files"),
])
def test_bad_input_is_one_line_and_leaves_nothing(pickles: dict, tmp_path: Path, capsys, case: str,
                                                  needle: str) -> None:
    out = tmp_path / "hf"
    src, extra = pickles["dict"], []
    if case == "non-empty out":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "not a model":
        # A dict with a 'model' entry that is not a model (its state dict) is refused, not saved.
        src = tmp_path / "sd.bin"
        torch.save({"model": pickles["model"].state_dict()}, src)
    elif case == "missing file":
        src = tmp_path / "none.bin"
    elif case == "not a pickle":
        src = tmp_path / "junk.bin"
        src.write_bytes(b"\x00not a pickle at all")
    else:
        (tmp_path / "empty").mkdir()
        extra = ["--tokenizer-from", str(tmp_path / "empty")]
    before = sorted(os.listdir(tmp_path))
    rc = main(["convert", str(src), "--out", str(out), "--trust-pickle", *extra])
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and needle in errors[0], err
    assert "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == before  # no temporary folder, no half-written --out
    if case == "non-empty out":
        assert os.listdir(out) == ["keep.txt"]


def test_dict_without_model_names_its_keys(pickles: dict, tmp_path: Path, capsys) -> None:
    rc = main(["convert", str(pickles["weights-only"]), "--out", str(tmp_path / "hf"), "--trust-pickle"])
    err = capsys.readouterr().err
    assert rc == 2 and "a dict without a 'model' entry (keys: 'state_dict')" in err
