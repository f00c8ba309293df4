"""The family registry: one declaration per family, and every config field handled or refused.

Each family declares its checkpoint tensors once (``Family.params``); these tests check that the graph
has exactly those parameters with those shapes (uniform and pruned per layer), that every field of the
family's transformers config class is read, ignored for a stated reason, or refused, and that options
the graphs do not build are refused with exit 2 instead of giving wrong tokens.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from edgedeploy.checkpoint.config import LayerSizes, load_config, parse_config
from edgedeploy.errors import InputError
from edgedeploy.models import FAMILIES, checkpoint_tensors, get_family, with_layer_sizes
from edgedeploy.models.family import IGNORED, READ
from edgedeploy.tiny import TINY_SIZES

REFERENCE_CONFIGS = Path(__file__).parent / "data" / "reference_configs"


def _tiny_cfg(family: str, **overrides: object):  # noqa: ANN202
    fam = get_family(family)
    hf = fam.tiny_config({**TINY_SIZES, **overrides}, "float16")
    raw = fam.config_from_twin(hf, "float16") if fam.twin else {**hf.to_dict(), "architectures": [fam.architectures[0]]}
    return parse_config(raw, f"tiny {family}")


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("pruned", [False, True])
def test_graph_parameters_equal_the_declared_ones(family: str, pruned: bool) -> None:
    pytest.importorskip("tvm")
    from tvm.target import Target

    cfg = _tiny_cfg(family)
    if pruned:
        group = cfg.num_heads // cfg.num_kv_heads
        layers = (LayerSizes(group, 1, 96), LayerSizes(cfg.num_heads, cfg.num_kv_heads, 128))
        cfg = replace(cfg, layers=layers)
    fam = get_family(family)
    declared = {p.name: p.shape for p in fam.params(cfg)}
    model = fam.model_class()(cfg, "float16", Target({"kind": "llvm"}))
    graph = {n: tuple(int(d) for d in p.shape) for n, p in model.named_parameters()}
    assert graph == declared
    # Every checkpoint tensor feeds exactly one parameter.
    sources = [name for p in fam.params(cfg) for name, _ in p.sources]
    assert len(sources) == len(set(sources)) == len(checkpoint_tensors(cfg))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_layer_sizes_round_trip_through_tensor_shapes(family: str) -> None:
    cfg = _tiny_cfg(family)
    group = cfg.num_heads // cfg.num_kv_heads
    layers = (LayerSizes(group, 1, 96), LayerSizes(cfg.num_heads, cfg.num_kv_heads, 128))
    shapes = checkpoint_tensors(replace(cfg, layers=layers))
    got = with_layer_sizes(cfg, shapes)
    assert got.layers == layers
    assert with_layer_sizes(cfg, checkpoint_tensors(cfg)) == cfg  # uniform stays uniform


def _config_keys(family: str) -> set[str]:
    fam = get_family(family)
    if fam.twin:  # no transformers class: the real checkpoint's config.json is the reference
        return set(json.loads((REFERENCE_CONFIGS / "qwen-7b" / "config.json").read_text()))
    return set(fam.tiny_config(dict(TINY_SIZES), "float16").to_dict())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_config_field_is_read_ignored_or_refused(family: str) -> None:
    table = get_family(family).config_fields
    missing = sorted(_config_keys(family) - set(table))
    assert not missing, f"{family}: config fields with no decision: {missing}"
    for field, decision in table.items():
        assert decision.startswith((READ, f"{IGNORED}:", "refused")), (field, decision)


@pytest.mark.parametrize("name", sorted(p.name for p in REFERENCE_CONFIGS.iterdir()))
def test_reference_configs_have_no_unaudited_field(name: str) -> None:
    raw = json.loads((REFERENCE_CONFIGS / name / "config.json").read_text())
    cfg = parse_config(raw, name)
    assert not set(raw) - set(get_family(cfg.family).config_fields)


def test_sliding_window_caps_the_context() -> None:
    mistral = _tiny_cfg("mistral", sliding_window=64)
    assert mistral.sliding_window == 64 and mistral.usable_context == 64
    on = _tiny_cfg("qwen2", use_sliding_window=True, sliding_window=48, max_window_layers=1)
    assert on.usable_context == 48
    off = _tiny_cfg("qwen2", use_sliding_window=False, sliding_window=48)
    assert off.sliding_window is None and off.usable_context == TINY_SIZES["max_position_embeddings"]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgedeploy.cli", *args], capture_output=True, text=True, timeout=300)


def test_build_past_the_sliding_window_is_refused(tmp_path: Path) -> None:
    from edgedeploy.tiny import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path / "q", "qwen2", use_sliding_window=True, sliding_window=32,
                                max_window_layers=1)
    out = _cli("build", str(ckpt), "--out", str(tmp_path / "b"), "--context", "64")
    assert out.returncode == 2, out.stderr
    assert "sliding attention window (32)" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "b").exists()


def test_bundle_of_a_windowed_model_stops_at_the_window(tmp_path: Path) -> None:
    """Generation ends with reason 'context' at the window instead of attending past it."""
    pytest.importorskip("tvm")
    from edgedeploy.compile.build import build_bundle
    from edgedeploy.runtime.engine import Engine
    from edgedeploy.tiny import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path / "m", "mistral", sliding_window=24)
    manifest = build_bundle(ckpt, tmp_path / "b", prefill_chunk=8)
    assert manifest.context_window == 24
    engine = Engine(tmp_path / "b", "model.so", threads=2)
    engine.load()
    res = engine.generate(list(range(2, 22)), 50, stop_ids=[])
    assert res.finish_reason == "context" and len(res.token_ids) == 24 - 20 + 1


@pytest.mark.parametrize(("family", "raw_extra", "flag"), [
    ("gemma", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
])
def test_unbuilt_options_are_refused(tmp_path: Path, family: str, raw_extra: dict, flag: str) -> None:
    from edgedeploy.tiny import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path / "c", family)
    raw = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**raw, **raw_extra}))
    with pytest.raises(InputError, match=flag):
        load_config(ckpt)
    out = _cli("inspect", str(ckpt))
    assert out.returncode == 2 and flag in out.stderr and "Traceback" not in out.stderr
