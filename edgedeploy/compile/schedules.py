"""Hand-written TIR schedules for the CPU matmuls (decode GEMV, prefill GEMM).

After legalisation and fusion every projection is a PrimFunc with one matmul block
``C[b, i, j] += A[b, i, k] * W[j, k]`` (``W`` in ``[out, in]`` layout, as the checkpoint stores it)
followed by injective epilogues (bias, residual add, cast back to FP16). Unscheduled, such a block
runs on one core with the init inside the reduction loop. The schedule here:

* splits the output columns ``j`` into blocks of ``rows`` weight rows and runs the blocks in parallel:
  for decode each thread streams its own contiguous slice of ``W``, for prefill a block of ``W``
  stays in L1 while every row of ``A`` passes over it;
* unrolls the ``rows`` weight rows so the innermost loop is a single contiguous reduction over ``k``
  with ``rows`` independent accumulators, which LLVM vectorises at the target's own width (AVX2,
  AVX-512 or NEON: the schedule names no vector length, so it is valid for every llvm target);
* hoists the accumulator init out of the reduction and computes the epilogue right after each block,
  so the FP32 intermediate shrinks to ``rows`` values per thread instead of a ``[S, N]`` buffer.

Functions that do not match the pattern are left as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import s_tir, tirx

#: Weight rows per parallel task: decode (one activation row) and prefill (several).
GEMV_ROWS = 2
GEMM_ROWS = 8
#: FP32 partial sums per weight row in decode: four AVX-512 / eight AVX2 / sixteen NEON registers.
GEMV_LANES = 64


@dataclass(frozen=True)
class MatmulBlock:
    """A matched ``C[..., j] += A[..., k] * W[j, k]`` block and the loops around it."""

    block: s_tir.schedule.SBlockRV
    row_loops: list  # the batch/sequence loops: extent 1 for decode, symbolic for prefill
    col_loop: s_tir.schedule.LoopRV
    red_loop: s_tir.schedule.LoopRV
    n_cols: int
    n_red: int
    single_row: bool


def _static(extent: tirx.PrimExpr) -> int | None:
    return int(extent) if isinstance(extent, tirx.IntImm) else None


def _find_matmul(sch: s_tir.Schedule) -> MatmulBlock | None:
    """The function's matmul block when it is the first top-level block; None for anything else."""
    root = sch.get_sblock("root") if _has_root(sch) else None
    blocks = sch.get_child_blocks(root) if root is not None else []
    if not blocks:
        return None
    first = blocks[0]
    stmt = sch.get(first)
    kinds = [iv.iter_type for iv in stmt.iter_vars]
    if len(kinds) < 2 or kinds[-1] != tirx.IterVar.CommReduce or any(k != tirx.IterVar.DataPar for k in kinds[:-1]):
        return None
    if len(stmt.reads) != 2 or len(stmt.writes) != 1 or stmt.init is None:
        return None
    w = stmt.reads[1]
    if len(w.region) != 2:
        return None
    k_var, j_var = stmt.iter_vars[-1].var, stmt.iter_vars[-2].var
    # W must be read as W[j, k] and A along k: the reduction runs over the innermost, contiguous axis.
    if not (_is_var(w.region[0].min, j_var) and _is_var(w.region[1].min, k_var)):
        return None
    a = stmt.reads[0]
    if not _is_var(a.region[-1].min, k_var):
        return None
    loops = sch.get_loops(first)
    if len(loops) != len(kinds):
        return None
    n_cols, n_red = _static(sch.get(loops[-2]).extent), _static(sch.get(loops[-1]).extent)
    if n_cols is None or n_red is None:
        return None
    row_extents = [_static(sch.get(lp).extent) for lp in loops[:-2]]
    single_row = all(e == 1 for e in row_extents)
    return MatmulBlock(first, list(loops[:-2]), loops[-2], loops[-1], n_cols, n_red, single_row)


def _has_root(sch: s_tir.Schedule) -> bool:
    try:
        sch.get_sblock("root")
        return True
    except Exception:  # noqa: BLE001 - TVM raises its own error type for a missing block
        return False


def _is_var(expr: tirx.PrimExpr, var: tirx.Var) -> bool:
    return isinstance(expr, tirx.Var) and expr.same_as(var)


def _divisor(n: int, preferred: int) -> int:
    """The largest power of two <= ``preferred`` dividing ``n``: a split without a tail predicate."""
    f = preferred
    while f > 1 and n % f:
        f //= 2
    return f


def _epilogues(sch: s_tir.Schedule, matmul: s_tir.schedule.SBlockRV) -> list | None:
    """The blocks after the matmul, chained injective ops merged into one where TIR allows it."""
    blocks = list(sch.get_child_blocks(sch.get_sblock("root")))[1:]
    for blk in blocks[:-1]:
        try:
            sch.compute_inline(blk)
        except Exception:  # noqa: BLE001 - not inlinable: it stays a separate epilogue
            pass
    rest = list(sch.get_child_blocks(sch.get_sblock("root")))[1:]
    if len(rest) > 1:
        # A chain that did not merge stays after the matmul as it was, over the whole intermediate.
        return []
    for blk in rest:
        if any(iv.iter_type != tirx.IterVar.DataPar for iv in sch.get(blk).iter_vars):
            return None
    return rest


def schedule_matmul(func: tirx.PrimFunc) -> tirx.PrimFunc | None:
    """``func`` with its matmul scheduled for the CPU, or None when it is not a matmul function."""
    sch = s_tir.Schedule(func)
    m = _find_matmul(sch)
    if m is None:
        return None
    epilogues = _epilogues(sch, m.block)
    if epilogues is None:
        return None
    if m.single_row:
        _schedule_gemv(sch, m, epilogues)
    else:
        _schedule_gemm(sch, m, epilogues)
    return sch.mod["main"]


def _schedule_gemv(sch: s_tir.Schedule, m: MatmulBlock, epilogues: list) -> None:
    """Decode: memory-bound, so stream ``W`` once, row after row, with explicit vector partial sums.

    ``k`` is split into chunks of ``GEMV_LANES`` and rfactored: each weight row accumulates into
    ``GEMV_LANES`` FP32 partial sums (several independent vector registers at any SIMD width, which
    hides the FMA latency), reduced once at the end of the row. Each thread streams a contiguous half
    of ``W``; LLVM's own reduction vectoriser, left alone, kept one accumulator and half the bandwidth.
    """
    rows = _divisor(m.n_cols, GEMV_ROWS)
    lanes = _divisor(m.n_red, GEMV_LANES)
    jo, ji = sch.split(m.col_loop, [None, rows])
    ko, ki = sch.split(m.red_loop, [None, lanes])
    sch.reorder(jo, ji, ko, ki)
    rf = sch.rfactor(ki, factor_axis=len(m.row_loops) + 1)
    loops = sch.get_loops(rf)
    outer = loops[len(m.row_loops)]
    sch.reverse_compute_at(m.block, outer)
    for blk in epilogues:
        sch.reverse_compute_at(blk, outer)
    sch.parallel(outer)
    sch.vectorize(loops[-1])
    sch.decompose_reduction(rf, loops[-2])


def _schedule_gemm(sch: s_tir.Schedule, m: MatmulBlock, epilogues: list) -> None:
    """Prefill: a block of ``GEMM_ROWS`` weight rows per task, every activation row passing over it.

    The ``GEMM_ROWS`` rows are unrolled inside the ``k`` loop, so LLVM vectorises ``k`` with that
    many independent accumulators and each activation vector is loaded once for all of them.
    """
    if not epilogues:
        # Accumulating straight into the output parameter kept every partial sum in memory (~13x
        # slower, measured on FP32 gate_up); a write-back block gives the lowering a small local buffer.
        epilogues = [sch.cache_write(m.block, 0, "global")]
    rows = _divisor(m.n_cols, GEMM_ROWS)
    jo, ji = sch.split(m.col_loop, [None, rows])
    sch.reorder(jo, *m.row_loops, m.red_loop, ji)
    sch.parallel(jo)
    sch.decompose_reduction(m.block, m.red_loop)
    sch.unroll(ji)
    for blk in epilogues:
        sch.reverse_compute_at(blk, m.row_loops[-1])


@tvm.transform.module_pass(opt_level=0, name="ScheduleCPUMatmuls")
def schedule_cpu_matmuls(mod: tvm.ir.IRModule, _ctx: tvm.transform.PassContext) -> tvm.ir.IRModule:
    """Apply :func:`schedule_matmul` to every PrimFunc of ``mod`` that holds a matmul."""
    updates = {}
    for gv, func in mod.functions.items():
        if not isinstance(func, tirx.PrimFunc) or func.attrs is None:
            continue
        if "tirx.is_scheduled" in func.attrs and func.attrs["tirx.is_scheduled"]:
            continue
        new = schedule_matmul(func)
        if new is not None:
            updates[gv] = new.with_attr("tirx.is_scheduled", True)
    for gv, func in updates.items():
        mod[gv] = func
    return mod
