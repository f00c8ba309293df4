"""Our CPU attention kernels against TVM's originals on random inputs: same outputs, same log-sum-exp.

The parity tests check them inside whole models; these pin the kernels' contracts on shapes the tiny
models do not reach (GQA groups, several sequences, chunks against many cached pages, causal and not).
"""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from tvm.relax.frontend.nn.llm._decode_kernels import _attention_decode_cpu  # noqa: E402
from tvm.relax.frontend.nn.llm._prefill_kernels import (  # noqa: E402
    _attention_prefill_cpu,
    _attention_prefill_ragged_cpu,
)

from edgedeploy.compile import attention  # noqa: E402
from edgedeploy.compile.targets import get_target  # noqa: E402

H_Q, H_KV, D, PAGE = 8, 2, 32, 16
RNG = np.random.default_rng(0)


def _build(func, name: str):  # noqa: ANN001, ANN202
    target = tvm.target.Target(get_target("host").target)
    with target:
        lib = tvm.compile(tvm.IRModule({name: func.with_attr("tirx.noalias", True)}), target=target)
    return lib[name]


def _t(a: np.ndarray):  # noqa: ANN202
    return tvm.runtime.tensor(a, tvm.cpu())


def _run_both(name: str, theirs, ours, inputs: list, out_shape: tuple[int, ...], scalars: list):  # noqa: ANN001, ANN202
    results = []
    for func in (theirs, ours):
        out, lse = _t(np.zeros(out_shape, "float16")), _t(np.zeros(out_shape[:2], "float32"))
        _build(func, name)(*inputs, out, lse, *scalars)
        results.append((out.numpy().astype(np.float32), lse.numpy()))
    return results


def _assert_same(results: list) -> None:
    (out_ref, lse_ref), (out, lse) = results
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, out_ref, atol=2e-3)
    np.testing.assert_allclose(lse, lse_ref, atol=1e-4)


def _pages(n_tokens: list[int], n_pages_total: int = 64) -> tuple:
    """A page table for sequences of ``n_tokens`` over shuffled physical pages."""
    counts = [(n + PAGE - 1) // PAGE for n in n_tokens]
    phys = RNG.permutation(n_pages_total)[: sum(counts)].astype("int32")
    indptr = np.cumsum([0, *counts]).astype("int32")
    last = np.array([n - (c - 1) * PAGE for n, c in zip(n_tokens, counts, strict=True)], "int32")
    pages = RNG.standard_normal((n_pages_total, 2, H_KV, PAGE, D)).astype("float16")
    return pages, indptr, phys, last


@pytest.mark.parametrize("causal", [0, 1])
@pytest.mark.parametrize("q_lens, kv_lens", [([37], [37]), ([5, 20], [5, 20]), ([3], [40])])
def test_ragged_prefill_matches_tvm(q_lens: list[int], kv_lens: list[int], causal: int) -> None:
    q = RNG.standard_normal((sum(q_lens), H_Q, D)).astype("float16")
    k = RNG.standard_normal((sum(kv_lens), H_KV, D)).astype("float16")
    v = RNG.standard_normal((sum(kv_lens), H_KV, D)).astype("float16")
    inputs = [_t(q), _t(np.cumsum([0, *q_lens]).astype("int32")), _t(k), _t(v),
              _t(np.cumsum([0, *kv_lens]).astype("int32")), _t(np.zeros(sum(q_lens), "int32")),
              _t(np.zeros(len(q_lens), "int32"))]
    _assert_same(_run_both(attention.PREFILL_RAGGED, _attention_prefill_ragged_cpu(H_KV, H_Q, D, D, "float16", {}),
                           attention.prefill_ragged_attention_cpu(H_Q, H_KV, D, D, "float16"),
                           inputs, q.shape, [causal, 0, 1.0, 1e4, D**-0.5]))


@pytest.mark.parametrize("causal", [0, 1])
@pytest.mark.parametrize("q_lens, kv_lens", [([16], [100]), ([4, 9], [33, 17]), ([20], [20])])
def test_paged_prefill_matches_tvm(q_lens: list[int], kv_lens: list[int], causal: int) -> None:
    q = RNG.standard_normal((sum(q_lens), H_Q, D)).astype("float16")
    pages, indptr, phys, last = _pages(kv_lens)
    inputs = [_t(q), _t(np.cumsum([0, *q_lens]).astype("int32")), _t(pages), _t(indptr), _t(phys), _t(last),
              _t(np.zeros(len(q_lens), "int32")), _t(np.zeros(sum(q_lens), "int32"))]
    _assert_same(_run_both(attention.PREFILL_PAGED, _attention_prefill_cpu(H_KV, H_Q, D, "float16", False, {}, PAGE),
                           attention.prefill_paged_attention_cpu(H_Q, H_KV, D, PAGE, "float16"),
                           inputs, q.shape, [causal, 0, 1.0, 1e4, D**-0.5]))


def test_decode_matches_tvm() -> None:
    kv_lens = [1, 17, 50]
    q = RNG.standard_normal((len(kv_lens), H_Q, D)).astype("float16")
    pages, indptr, phys, last = _pages(kv_lens)
    inputs = [_t(q), _t(pages), _t(indptr), _t(phys), _t(last), _t(np.zeros(len(kv_lens), "int32")),
              _t(np.zeros(len(kv_lens), "int32"))]
    _assert_same(_run_both(attention.DECODE, _attention_decode_cpu(H_KV, H_Q, D, "float16", False, {}, PAGE),
                           attention.decode_attention_cpu(H_Q, H_KV, D, PAGE, "float16"),
                           inputs, q.shape, [0, 1.0, 1e4, D**-0.5]))


def test_kernels_we_do_not_take_stay_tvms() -> None:
    sliding = _attention_prefill_cpu(H_KV, H_Q, D, "float16", True, {}, PAGE)
    assert attention.replacement(attention.PREFILL_PAGED, sliding) is None
    theirs = _attention_prefill_ragged_cpu(H_KV, H_Q, D, D, "float16", {})
    ours = attention.replacement(attention.PREFILL_RAGGED, theirs)
    assert ours is not None and ours.attrs["tirx.is_scheduled"]
