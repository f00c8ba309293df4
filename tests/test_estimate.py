"""Estimator: breakdown arithmetic and verdicts for the reference models on the 12 GB profile."""

from __future__ import annotations

import dataclasses

import pytest

from edgedeploy.checkpoint.config import load_config
from edgedeploy.devices.profiles import load_profile
from edgedeploy.estimate import MB, estimate

from .conftest import REFERENCE_CONFIGS


@pytest.fixture(scope="module")
def reference():
    return load_profile("reference-12gb")


def test_phi2_fits_and_8b_models_do_not(reference) -> None:
    verdicts = {}
    for name in ("phi-2", "llama-3-8b", "qwen2-7b", "qwen-7b"):
        cfg, _ = load_config(REFERENCE_CONFIGS / name)
        verdicts[name] = estimate(cfg, reference).fits
    assert verdicts == {"phi-2": True, "llama-3-8b": False, "qwen2-7b": False, "qwen-7b": False}


def test_breakdown_adds_up_and_uses_kv_per_token(reference) -> None:
    cfg, _ = load_config(REFERENCE_CONFIGS / "phi-2")
    est = estimate(cfg, reference, context_window=2048, prefill_chunk=256)
    assert est.weights_bytes == 2 * 2_779_683_840
    assert est.kv_cache_bytes == 327_680 * 2048
    assert est.peak_bytes == est.weights_bytes + est.kv_cache_bytes + est.temp_bytes + est.runtime_base_bytes
    assert est.budget_bytes == 8192 * MB
    assert est.headroom_bytes == est.budget_bytes - est.peak_bytes
    # FP32 doubles weights and the KV cache.
    est32 = estimate(cfg, reference, context_window=2048, prefill_chunk=256, dtype="float32")
    assert est32.weights_bytes == 2 * est.weights_bytes and est32.kv_cache_bytes == 2 * est.kv_cache_bytes


def test_roofline_decode_scales_with_bandwidth(reference) -> None:
    cfg, _ = load_config(REFERENCE_CONFIGS / "phi-2")
    fast = dataclasses.replace(reference, memory_bandwidth_gbps=2 * reference.memory_bandwidth_gbps)
    a, b = estimate(cfg, reference), estimate(cfg, fast)
    assert b.decode_tok_s == pytest.approx(2 * a.decode_tok_s)
    # 5.2 GiB of FP16 weights at 55% of 76.8 GB/s: a handful of tokens per second, not hundreds.
    assert 4 < a.decode_tok_s < 12


def test_longer_context_grows_kv_and_can_flip_verdict(reference) -> None:
    cfg, _ = load_config(REFERENCE_CONFIGS / "phi-2")
    short = estimate(cfg, reference, context_window=2048)
    huge = estimate(cfg, reference, context_window=16384)
    assert huge.kv_cache_bytes == 8 * short.kv_cache_bytes
    assert short.fits and not huge.fits


def test_hard_limit_caps_budget(reference) -> None:
    roomy = dataclasses.replace(reference, usable_budget_mb=20_000)
    cfg, _ = load_config(REFERENCE_CONFIGS / "phi-2")
    assert estimate(cfg, roomy).budget_bytes == 12288 * MB
