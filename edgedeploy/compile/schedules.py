"""Hand-written TIR schedules for the CPU matmuls (decode GEMV, prefill GEMM); the pass that applies them.

After legalisation and fusion every projection is a PrimFunc with one matmul block
``C[b, i, j] += A[b, i, k] * W[j, k]`` (``W`` in ``[out, in]`` layout, as the checkpoint stores it)
followed by injective epilogues (bias, residual add, cast back to FP16). Unscheduled, such a block
runs on one core with the init inside the reduction loop. The schedules here:

* decode (one activation row, memory-bound): each parallel task streams its own contiguous slice of
  ``W``, ``GEMV_ROWS`` rows at a time, into four vectors of FP32 partial sums per row (rfactor);
* prefill (compute-bound): a register-tiled GEMM. MR activation rows x NR weight
  rows of FP32 vector accumulators over ``k`` stay in registers while ``k`` advances, each parallel
  task owning a panel of weight rows that stays in L2. No layout change: both operands are read in
  their ``[rows, k]`` layout, vectorised at the target's own width: the tile and the vector lengths
  follow the target's registers (:func:`vector_shape`: AVX-512, AVX2 or NEON), so that the
  accumulators never spill. Each accumulator's lanes are then summed by halves, one vector add per
  step (:func:`_halve_lanes`);
* the accumulator init is hoisted out of the reduction and the epilogue is computed right after each
  tile, so the FP32 intermediate shrinks to a tile per thread instead of an ``[S, N]`` buffer.

Functions that do not match the pattern are left as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import s_tir, tirx

from edgedeploy.compile import attention

#: Weight rows per parallel task: decode (one activation row) and prefill (several).
GEMV_ROWS = 2
GEMM_ROWS = 8
#: Weight rows per parallel task in prefill (a panel that stays in L2 while every activation row
#: passes over it), lowered for narrow projections so that each has several tasks to share out.
GEMM_PANEL, GEMM_MIN_TASKS = 256, 8


@dataclass(frozen=True)
class VectorShape:
    """The register budget the micro-kernels are sized for: FP32 lanes per vector, vector registers."""

    lanes: int
    registers: int

    @property
    def gemm_tile(self) -> tuple[int, int]:
        """Prefill tile (MR activation rows, NR weight rows): MR x NR accumulators and the NR weight vectors
        of a step must fit the registers, or the tile spills every step; the activations (FP32) can be FMA
        memory operands. NR stays a power of two, which divides every projection width. On AVX-512, 6 x 4
        measured 5-10% faster than 4 x 4 on a quiet Zen 5 (fewer loads and conversions per FMA, the lane
        sums spread over more work). On AVX2's 16 registers (AVX2 code on a Zen 5, 1.1B Llama shape,
        512-token prefill, 2 threads, 9 interleaved runs each), 6 x 2 (12 accumulators, 2 weight vectors)
        gave a median 88.1 tok/s against 2 x 4's 79.1; on an 8-layer cut, 3 x 4 and 4 x 4 spilled and fell
        ~35% below 2 x 4. NEON keeps 4 x 4, not measured on a phone yet."""
        if self.registers >= 32:
            return (6, 4) if self.lanes >= 16 else (4, 4)
        return (6, 2)

    @property
    def gemv_lanes(self) -> int:
        """Decode partial sums per weight row: four vectors (the FMA latency hidden, two rows in registers)."""
        return 4 * self.lanes


def vector_shape(target: tvm.target.Target | None) -> VectorShape:
    """The vector registers of ``target``: AVX-512 (16 lanes, 32), AVX2 (8, 16), NEON (4, 32)."""
    from tvm.target.codegen import target_has_features

    if target is None or target.kind.name != "llvm":
        return VectorShape(16, 32)
    if "aarch64" in str(target.attrs.get("mtriple", "")):
        return VectorShape(4, 32)  # NEON: 128-bit; SVE is kept off for phones (see targets.py)
    if target_has_features("avx512f", target):
        return VectorShape(16, 32)
    if target_has_features("avx2", target):
        return VectorShape(8, 16)
    return VectorShape(4, 16)


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


def schedule_matmul(func: tirx.PrimFunc, vec: VectorShape = VectorShape(16, 32)) -> tirx.PrimFunc | None:
    """``func`` with its matmul scheduled for a CPU with ``vec``'s registers; None when it is not a matmul."""
    sch = s_tir.Schedule(func)
    m = _find_matmul(sch)
    if m is None:
        return None
    epilogues = _epilogues(sch, m.block)
    if epilogues is None:
        return None
    if m.single_row:
        _schedule_gemv(sch, m, epilogues, vec)
    else:
        _schedule_gemm(sch, m, epilogues, vec)
    return sch.mod["main"]


def _schedule_gemv(sch: s_tir.Schedule, m: MatmulBlock, epilogues: list, vec: VectorShape) -> None:
    """Decode: memory-bound, so stream ``W`` once, row after row, with explicit vector partial sums.

    ``k`` is split into chunks of ``vec.gemv_lanes`` and rfactored: each weight row accumulates into
    that many FP32 partial sums (several independent vector registers at any SIMD width, which
    hides the FMA latency), reduced once at the end of the row. Each thread streams a contiguous half
    of ``W``; LLVM's own reduction vectoriser, left alone, kept one accumulator and half the bandwidth.
    """
    rows = _divisor(m.n_cols, GEMV_ROWS)
    lanes = _divisor(m.n_red, vec.gemv_lanes)
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


def _schedule_gemm(sch: s_tir.Schedule, m: MatmulBlock, epilogues: list, vec: VectorShape) -> None:
    """Prefill: register-blocked GEMM when the shapes allow it, else weight-row blocks (:func:`_schedule_gemm_rows`)."""
    mr, nr = vec.gemm_tile
    lanes = _divisor(m.n_red, vec.lanes)
    nr = _divisor(m.n_cols, nr)
    if lanes < 4 or nr < 2 or len(m.row_loops) < 1:
        _schedule_gemm_rows(sch, m, epilogues)
        return
    _schedule_gemm_tiled(sch, m, epilogues, lanes, mr, nr)


def _panel(n_cols: int, nr: int) -> int:
    """Weight rows per task: a multiple of ``nr`` dividing ``n_cols``, at most GEMM_PANEL, if it can
    with at least GEMM_MIN_TASKS tasks."""
    target = max(nr, min(GEMM_PANEL, n_cols // GEMM_MIN_TASKS))
    return next(nc for nc in range(target - target % nr, 0, -nr) if n_cols % nc == 0)


def _schedule_gemm_tiled(sch: s_tir.Schedule, m: MatmulBlock, epilogues: list, lanes: int, mr: int,
                         nr: int) -> None:
    """Prefill as a register-tiled GEMM: ``mr`` activation rows x ``nr`` weight rows per micro-kernel.

    ``k`` is split into vectors of ``lanes`` and rfactored, so the micro-kernel keeps MR x NR vector
    accumulators in registers and, per step, loads MR + NR vectors for MR x NR FMAs (the row-block
    schedule needs NR + 1 loads for NR FMAs). Both operands stay in their ``[rows, k]`` layout. The
    activation rows are padded to a multiple of MR (``pad_einsum``: one small copy) so that the
    micro-kernel has no bounds predicate, which otherwise kept LLVM from holding the tile in
    registers. Each parallel task owns a panel of weight rows that stays in L2 while every
    activation row passes over it; the epilogue runs right after each tile.
    """
    n_rows = len(m.row_loops)
    row_extent = _static(sch.get(m.row_loops[-1]).extent)
    if row_extent is None or row_extent % mr:
        sch.pad_einsum(m.block, [1] * (n_rows - 1) + [mr, 1, 1])
        for pad in sch.get_producers(m.block):
            loops = sch.get_loops(pad)
            sch.parallel(sch.fuse(*loops[:-1]))
        copy = sch.get_consumers(m.block)[0]
        if epilogues:
            sch.compute_inline(copy)  # the epilogue reads the padded result, inside the real rows
        else:
            epilogues = [copy]
    elif not epilogues:
        epilogues = [sch.cache_write(m.block, 0, "global")]
    loops = sch.get_loops(m.block)
    ko, ki = sch.split(loops[-1], [None, lanes])
    rf = sch.rfactor(ki, factor_axis=n_rows + 1)
    # NEON's 4 lanes are summed by pairwise adds (faddp) without help; wider x86 vectors need the halving.
    halves = _halve_lanes(sch, m.block, lanes, n_rows) if lanes >= 8 else []
    loops = sch.get_loops(m.block)
    io, ii = sch.split(loops[n_rows - 1], [None, mr])
    nc = _panel(m.n_cols, nr)
    jo, jm, ji = sch.split(loops[n_rows], [None, nc // nr, nr])
    sch.reorder(jo, *loops[: n_rows - 1], io, jm, ii, ji, loops[-1])
    for step in reversed(halves):
        sch.compute_at(step, jm)
    sch.compute_at(rf, jm)
    for step in halves:
        # one loop per non-trivial iter var: lanes (spatial), rows, cols, the two halves (reduction)
        sl, srow, scol, sred = sch.get_loops(step)[-4:]
        sch.reorder(srow, scol, sred, sl)
        sch.unroll(srow)
        sch.unroll(scol)
        sch.unroll(sred)
        sch.vectorize(sl)
    # compute_at made one loop per non-trivial iter var of the rf block: k-lanes, rows, cols, k-steps.
    rk, rii, rji, rko = sch.get_loops(rf)[-4:]
    sch.reorder(rko, rii, rji, rk)
    sch.unroll(rii)
    sch.unroll(rji)
    sch.vectorize(rk)
    for blk in epilogues:
        sch.reverse_compute_at(blk, jm)
    sch.parallel(jo)
    sch.decompose_reduction(rf, rko)


def _halve_lanes(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, lanes: int, n_rows: int) -> list:
    """Sum the ``lanes`` partial sums of each output by halves (16 -> 8 -> 4 -> 2), each step a vector add
    of two halves, so that ``block`` is left a sum of two. Left to LLVM, the lane sum became gathers across
    outputs (a vgatherqps per lane), which cost a third of a K=2048 tile on Zen 5."""
    steps = []
    while lanes > 2:
        lanes //= 2
        _ro, ri = sch.split(sch.get_loops(block)[-1], [2, lanes])
        steps.append(sch.rfactor(ri, factor_axis=n_rows + 1))
    return steps


def _schedule_gemm_rows(sch: s_tir.Schedule, m: MatmulBlock, epilogues: list) -> None:
    """Prefill for shapes the tiled GEMM does not take: ``GEMM_ROWS`` weight rows per task.

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
    """Apply :func:`schedule_matmul` to every matmul PrimFunc and swap in our attention kernels
    (:mod:`edgedeploy.compile.attention`)."""
    vec = vector_shape(tvm.target.Target.current(allow_none=True))
    updates = {}
    for gv, func in mod.functions.items():
        if not isinstance(func, tirx.PrimFunc) or func.attrs is None:
            continue
        if gv.name_hint in (attention.DECODE, attention.PREFILL_PAGED, attention.PREFILL_RAGGED):
            new = attention.replacement(gv.name_hint, func)
            if new is not None:
                updates[gv] = new
            continue
        if "tirx.is_scheduled" in func.attrs and func.attrs["tirx.is_scheduled"]:
            continue
        new = schedule_matmul(func, vec)
        if new is not None:
            updates[gv] = new.with_attr("tirx.is_scheduled", True)
            continue
        new = parallel_rows(func)
        if new is not None:
            updates[gv] = new
    for gv, func in updates.items():
        mod[gv] = func
    return mod


def parallel_rows(func: tirx.PrimFunc) -> tirx.PrimFunc | None:
    """``func`` with the outer loop of each top-level loop nest run in parallel, when that loop (after
    fusing leading loops of extent 1) spans the prefill's symbolic rows; None when nothing qualifies.

    Legalised element-wise and row-wise ops (RoPE, SiLU x up, RMSNorm) come unscheduled and ran on one
    core while the other waited, about 5% of a 1.1B prefill. Decode's copies have static extents and are
    left alone: a parallel launch there costs more than it saves.
    """
    sch = s_tir.Schedule(func)
    if not _has_root(sch):
        return None
    _inline_elementwise(sch)
    changed = False
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        loops = sch.get_loops(block)
        if not loops:
            continue
        lead = 0
        while lead < len(loops) - 1 and _static(sch.get(loops[lead]).extent) == 1:
            lead += 1
        if _static(sch.get(loops[lead]).extent) is not None:
            continue
        try:
            outer = sch.fuse(*loops[: lead + 1]) if lead else loops[0]
            sch.parallel(outer)
            changed = True
        except Exception:  # noqa: BLE001 - TIR refuses loops bound to a reduction: the nest stays serial
            continue
    return sch.mod["main"] if changed else None


def _inline_elementwise(sch: s_tir.Schedule) -> None:
    """Fold element-wise blocks into their consumers (SiLU's split, sigmoid and product become one loop),
    so that the intermediate arrays are neither written nor read back."""
    progress = True
    while progress:
        progress = False
        blocks = list(sch.get_child_blocks(sch.get_sblock("root")))
        for block in blocks[:-1]:
            if any(iv.iter_type != tirx.IterVar.DataPar for iv in sch.get(block).iter_vars):
                continue
            try:
                sch.compute_inline(block)
            except Exception:  # noqa: BLE001 - not inlinable (e.g. read through an opaque access)
                continue
            progress = True
            break


@tvm.transform.module_pass(opt_level=0, name="MarkNoAlias")
def mark_noalias(mod: tvm.ir.IRModule, _ctx: tvm.transform.PassContext) -> tvm.ir.IRModule:
    """Give every PrimFunc the ``tirx.noalias`` attribute (no two buffer arguments overlap).

    TVM 0.27's LLVM codegen lets the function it emits last (by name) decide the alias information
    of the whole module: when that is one of the KV-cache kernels, which lack the attribute, every
    GEMV loses it too, LLVM reloads and reconverts the activation for every weight row, and the
    decode GEMVs ran at ~10 GB/s instead of ~22 GB/s (measured on the same TIR compiled alone and
    in the model library). The KV cache and the VM call these kernels with distinct arrays for the
    arguments they write, which is all the attribute promises.
    """
    updates = {}
    for gv, func in mod.functions.items():
        if isinstance(func, tirx.PrimFunc) and not (func.attrs is not None and "tirx.noalias" in func.attrs):
            updates[gv] = func.with_attr("tirx.noalias", True)
    for gv, func in updates.items():
        mod[gv] = func
    return mod
