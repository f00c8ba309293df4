"""The matmul schedules of every vector shape against numpy, whatever this host's ISA.

The parity tests reach only the host's own tile (AVX-512's 6 x 4 on one CPU, AVX2's 6 x 2 on another); the
schedule is plain TIR, so each shape's tile, its row padding and its lane sums compile and must give the
same numbers on any x86 or Arm host (LLVM splits or joins the vectors to the host's width).
"""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from tvm import te, tirx  # noqa: E402

from edgedeploy.compile.schedules import VectorShape, schedule_matmul  # noqa: E402
from edgedeploy.compile.targets import get_target  # noqa: E402

K, N = 256, 96  # N = 3 x 32: panels that are not a power of two
SHAPES = {"avx512": VectorShape(16, 32), "avx2": VectorShape(8, 16), "neon": VectorShape(4, 32)}


def _matmul(rows: tirx.PrimExpr, cast_back: bool) -> tirx.PrimFunc:
    """``D = A @ W.T`` as legalisation leaves a projection: FP32 activations, FP16 ``[out, in]`` weights,
    and (``cast_back``) an FP16 epilogue."""
    a = te.placeholder((1, rows, K), "float32", name="A")
    w = te.placeholder((N, K), "float16", name="W")
    k = te.reduce_axis((0, K), name="k")
    c = te.compute((1, rows, N), lambda b, i, j: te.sum(a[b, i, k] * w[j, k].astype("float32"), axis=k), name="C")
    if not cast_back:
        return te.create_prim_func([a, w, c])
    d = te.compute((1, rows, N), lambda b, i, j: c[b, i, j].astype("float16"), name="D")
    return te.create_prim_func([a, w, d])


def _compiled(func: tirx.PrimFunc, vec: VectorShape):  # noqa: ANN202
    scheduled = schedule_matmul(func, vec)
    assert scheduled is not None, "the projection was not recognised as a matmul"
    target = tvm.target.Target(get_target("host").target)
    return tvm.compile(tvm.IRModule({"main": scheduled.with_attr("tirx.noalias", True)}), target=target)["main"]


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("cast_back", [True, False], ids=["fp16-epilogue", "fp32-out"])
def test_prefill_gemm_matches_numpy_for_any_row_count(shape: str, cast_back: bool) -> None:
    fn = _compiled(_matmul(tirx.Var("n", "int64"), cast_back), SHAPES[shape])
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((N, K)) * 0.1).astype("float16")
    for rows in (1, 2, 3, 5, 7, 37):  # not multiples of the tile's rows: the padded path
        a = rng.standard_normal((1, rows, K)).astype("float32")
        out = tvm.runtime.tensor(np.zeros((1, rows, N), "float16" if cast_back else "float32"), tvm.cpu())
        fn(tvm.runtime.tensor(a, tvm.cpu()), tvm.runtime.tensor(w, tvm.cpu()), out)
        ref = a @ w.astype(np.float32).T
        np.testing.assert_allclose(out.numpy().astype(np.float32), ref, rtol=2e-3, atol=5e-3 if cast_back else 1e-4,
                                   err_msg=f"{shape}, {rows} rows")


@pytest.mark.parametrize("shape", list(SHAPES))
def test_decode_gemv_matches_numpy(shape: str) -> None:
    fn = _compiled(_matmul(1, cast_back=True), SHAPES[shape])
    rng = np.random.default_rng(1)
    a = rng.standard_normal((1, 1, K)).astype("float32")
    w = (rng.standard_normal((N, K)) * 0.1).astype("float16")
    out = tvm.runtime.tensor(np.zeros((1, 1, N), "float16"), tvm.cpu())
    fn(tvm.runtime.tensor(a, tvm.cpu()), tvm.runtime.tensor(w, tvm.cpu()), out)
    np.testing.assert_allclose(out.numpy().astype(np.float32), a @ w.astype(np.float32).T, rtol=2e-3, atol=5e-3)
