"""The acceptance of a calibrated profile: on a virtual phone with a 1,500 MiB budget, `calibrate`, then
`profile` with the calibrated profile gives FAIL for a model that needs 3% more than the calibrated budget
and PASS for one that needs 3% less.

How the need is sized, honestly: the models are real checkpoints whose memory is real weights. A tiny Llama
(hidden 128, 2 layers) with a very large vocabulary: the embedding table and the untied LM head are
2 x vocab x 128 FP16 values, so the vocabulary sets the weights to the byte while compute stays cheap (a
prompt touches a few embedding rows; decode is one GEMV over the head). The estimate with the calibrated
profile (runtime base from the calibration) gives the slope of peak memory per vocabulary entry; the first
model's need is then *measured* (the runner's own VmHWM on this host, KV cache touched, no budget) and the
second model is placed from that measurement. Both needs are asserted before the phone sees them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from edgedeploy.checkpoint.config import load_config
from edgedeploy.cli import main
from edgedeploy.compile.build import build_bundle
from edgedeploy.devices.profiles import load_profile
from edgedeploy.estimate import estimate
from edgedeploy.models import checkpoint_tensors
from edgedeploy.runtime.launch import run_local

from .test_virtual_phone import Phone

MIB = 2**20
BUDGET_MB = 1500
SIZES = {"hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128}
CONTEXT, CHUNK = 128, 32


def _config(tiny_config: Path, vocab: int, folder: Path) -> Path:
    """``folder`` with the tiny Llama's config.json at :data:`SIZES` and ``vocab``, and its tokenizer."""
    raw = json.loads((tiny_config / "config.json").read_text())
    raw.update(SIZES, vocab_size=vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(raw))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_config / name, folder / name)
    return folder


def _write_weights(folder: Path) -> None:
    """Random FP16 weights for ``folder``'s config.json: one random block repeated, so writing 1.4 GB costs a
    copy, not ~25 s of random numbers per checkpoint (only the bytes matter here, not the values)."""
    cfg, _ = load_config(folder)
    block = (np.random.default_rng(0).standard_normal(1 << 16, dtype=np.float32) * 0.02).astype(np.float16)
    tensors = {name: np.resize(block, shape) for name, shape in checkpoint_tensors(cfg).items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _predicted(tiny_config: Path, vocab: int, profile, folder: Path) -> int:
    """The estimate for the tiny Llama at ``vocab`` on ``profile``, from config.json alone."""
    cfg, _ = load_config(_config(tiny_config, vocab, folder))
    return estimate(cfg, profile, context_window=CONTEXT, prefill_chunk=CHUNK).peak_bytes


def _model(tiny_config: Path, root: Path, vocab: int) -> tuple[Path, int]:
    """Build the bundle for ``vocab`` and measure its need: the runner's VmHWM on this host, KV cache touched."""
    ckpt = _config(tiny_config, vocab, root / f"ckpt-{vocab}")
    _write_weights(ckpt)
    bundle = root / f"model-{vocab}"
    build_bundle(ckpt, bundle, target="host", context_window=CONTEXT, prefill_chunk=CHUNK)
    shutil.rmtree(ckpt)  # 1.4 GB of disk back
    r = run_local(bundle, [0, 5, 9, 17], 4, touch_kv=True)
    assert not r.get("error"), r
    return bundle, int(r["peak_rss_bytes"])


@pytest.fixture
def config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("EDGEDEPLOY_CONFIG", str(tmp_path / "config"))
    monkeypatch.setenv("EDGEDEPLOY_HISTORY", str(tmp_path / "history.sqlite"))  # profile appends its results
    return tmp_path / "config"


def test_calibrated_profile_fails_3pct_over_and_passes_3pct_under(
        tiny_models: dict[str, Path], host_bundle: Path, config_dir: Path, tmp_path: Path, capsys) -> None:
    phone = Phone(tmp_path / "sandbox", "--budget-mb", str(BUDGET_MB))
    try:
        device = f"tcp:127.0.0.1:{phone.port}"
        assert main(["calibrate", "--device", device, "--name", "vp", "--bundle", str(host_bundle),
                     "--no-bandwidth"]) == 0, capsys.readouterr().err
        profile = load_profile("vp")
        budget = int(profile.budget_mb * MIB)
        assert abs(budget / (BUDGET_MB * MIB) - 1) < 0.02

        # The estimate's slope per vocabulary entry (weights, and the logits temporary), from config.json.
        v1, v2 = 2_000_000, 3_000_000
        p1, p2 = (_predicted(tiny_models["llama"], v, profile, tmp_path / f"cfg-{v}") for v in (v1, v2))
        slope = (p2 - p1) / (v2 - v1)
        assert 500 < slope < 530  # 2 x 128 x 2 bytes of weights + 4 bytes of FP32 logits per entry

        def vocab_for(target: float, at: int, need: int) -> int:
            return round(at + (target - need) / slope)

        # Under: sized from the estimate, then corrected once from its measured need.
        under_target = 0.97 * budget
        v_under = vocab_for(under_target, v1, p1)
        under, need_under = _model(tiny_models["llama"], tmp_path, v_under)
        if abs(need_under / budget - 0.97) > 0.005:
            shutil.rmtree(under)
            v_under = vocab_for(under_target, v_under, need_under)
            under, need_under = _model(tiny_models["llama"], tmp_path, v_under)
        # Over: placed from the measured need of the first model.
        v_over = vocab_for(1.03 * budget, v_under, need_under)
        over, need_over = _model(tiny_models["llama"], tmp_path, v_over)
        sizing = (f"calibrated budget {budget / MIB:,.1f} MiB; need under {need_under / MIB:,.1f} MiB "
              f"({100 * (need_under / budget - 1):+.2f}%, vocab {v_under:,}), over {need_over / MIB:,.1f} MiB "
              f"({100 * (need_over / budget - 1):+.2f}%, vocab {v_over:,})")
        with capsys.disabled():
            print(sizing)
        assert 0.965 <= need_under / budget <= 0.975
        assert 1.025 <= need_over / budget <= 1.035

        verdicts = {}
        for name, bundle in (("under", under), ("over", over)):
            out = tmp_path / f"report-{name}"
            rc = main(["profile", str(bundle), "--device", device, "--profile", "vp", "--prompts", "chat-short",
                       "--runs", "1", "--warmup", "0", "--out", str(out), "--json"])
            capsys.readouterr()
            model = json.loads((out / "results.json").read_text())["models"][0]
            verdicts[name] = (rc, model)
            shutil.rmtree(bundle)
    finally:
        phone.stop()

    rc, model = verdicts["under"]
    checks = {c["name"]: c for c in model["checks"]}
    assert rc == 0 and model["verdict"] == "PASS", model["reasons"]
    assert checks["memory-fit"]["status"] == "PASS"
    assert model["budget_bytes"] == budget and model["measured_peak_bytes"] <= budget
    # The estimate from the calibrated profile, and its error, are in the report.
    assert model["estimate"]["base_source"].startswith("calibrated") and "ceiling" in model["estimate"]["budget_source"]
    assert model["peak_error_pct"] is not None and abs(model["peak_error_pct"]) < 5
    assert "error" in checks["memory-fit"]["message"] and "calibrated" in checks["memory-fit"]["message"]
    acc = model["prompts"][0]["runs"][0]["memory"]
    assert acc["peak_bytes"] == model["measured_peak_bytes"] and acc["gpu_source"] == "none seen"
    print(f"under: measured {model['measured_peak_bytes'] / MIB:,.1f} MiB, predicted "
          f"{model['estimate']['peak_bytes'] / MIB:,.1f} MiB, error {model['peak_error_pct']:+.2f}%")

    rc, model = verdicts["over"]
    checks = {c["name"]: c for c in model["checks"]}
    assert rc == 1 and model["verdict"] == "FAIL"
    assert checks["memory-fit"]["status"] == "FAIL" and "killed for memory" in checks["memory-fit"]["message"]
    assert "exit 137" in checks["run"]["message"] and "lowmemorykiller" in checks["run"]["message"]
