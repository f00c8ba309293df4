"""CPU attention kernels that replace TVM's own in the paged KV cache (decode and both prefill kernels).

``nn.llm.kv_cache.TIRPagedKVCache`` builds its CPU attention from kernels that run on one core with
scalar loads; the prefill ones loop over every key of the cache's whole capacity for every query row.
Measured here (32 query / 4 KV heads, head dim 64, 2 threads): the ragged prefill of a 512-token
chunk 137 ms -> 58 ms per layer, the paged prefill of a chunk against 600 cached tokens 570 ms -> 20 ms.
The replacements keep TVM's contracts exactly (arguments, ``output``, ``lse`` as log2-sum-exp with
``-5e4`` for an empty row), so the KV cache calls them unchanged:

* every (query head, query row) is a parallel task with its own scratch, heads outermost so that
  the causal rows' growing cost is shared evenly between threads;
* a tile of keys (one page, or ``TILE`` rows of the ragged chunk) is scored at once, with vectorised
  dot products, and the running max / rescale happens once per tile (online softmax);
* causal rows stop at their last visible key instead of masking the rest.

RoPE must already be in Q and K (``RopeMode.NORMAL``); ``rotary_mode`` 1 is rejected at run time.
No sliding window: the ``*_sliding_window`` kernels stay TVM's.
"""

from __future__ import annotations

import math

from tvm import tirx
from tvm.script import tirx as T

#: The kernels replaced, by the global symbol the KV cache calls.
DECODE = "batch_decode_paged_kv_cpu"
PREFILL_PAGED = "batch_prefill_paged_kv_cpu"
PREFILL_RAGGED = "batch_prefill_ragged_kv"
#: Keys scored per online-softmax step in the ragged prefill (the paged kernels use one page).
TILE = 64
_LOG2E = math.log2(math.e)


@T.macro
def _online_softmax_step(s, st, acc, rows, d_v):  # noqa: ANN001 - TVMScript macro: buffers and expressions
    """Fold ``rows`` log2-scaled scores in ``s`` into the running max ``st[0]`` and sum ``st[1]``.

    ``s`` ends up holding the tile's probabilities (unnormalised) and ``acc`` is rescaled to the new
    max; the caller then adds ``s[r] * V[r]`` to ``acc``.
    """
    st[2] = st[0]
    for r in T.serial(rows):
        st[2] = T.max(st[2], s[r])
    st[3] = T.float32(0)
    for r in T.serial(rows):
        s[r] = T.exp2(s[r] - st[2])
        st[3] = st[3] + s[r]
    st[1] = st[1] * T.exp2(st[0] - st[2]) + st[3]
    for i in T.vectorized(d_v):
        acc[i] = acc[i] * T.exp2(st[0] - st[2])
    st[0] = st[2]


@T.macro
def _start(qv, acc, st, d_qk, d_v, q, row, head, scale):  # noqa: ANN001 - TVMScript macro
    """Load the scaled query row ``q[row, head]`` in FP32 and reset the accumulator and softmax state."""
    for i in T.vectorized(d_qk):
        qv[i] = T.Cast("float32", q[row, head, i]) * scale
    for i in T.vectorized(d_v):
        acc[i] = T.float32(0)
    st[0] = T.float32(-5e4)
    st[1] = T.float32(1)


def decode_attention_cpu(num_qo_heads: int, num_kv_heads: int, head_dim: int, page_size: int,
                         dtype: str) -> tirx.PrimFunc:
    """A drop-in for TVM's ``batch_decode_paged_kv_cpu``: one query row per sequence, heads in parallel."""
    H_qo, H_kv, D, P = num_qo_heads, num_kv_heads, head_dim, page_size
    group = H_qo // H_kv

    @T.prim_func(s_tir=True)
    def batch_decode_paged_kv_cpu(Q_handle: T.handle, pages_handle: T.handle, page_table_indptr_handle: T.handle,
                                  page_table_values_handle: T.handle, var_length_info: T.handle,
                                  k_rope_pos_offset_handle: T.handle, q_rope_position_handle: T.handle,
                                  output_handle: T.handle, lse_handle: T.handle, rotary_mode: T.int32,
                                  rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32):
        T.func_attr({"tirx.is_scheduled": True, "global_symbol": DECODE})
        B = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        page_indptr_elem_offset = T.int32()
        page_values_elem_offset = T.int32()
        k_rope_pos_offset_elem_offset = T.int32()
        q_rope_position_elem_offset = T.int32()
        length_info_elem_offset = T.int32()
        Q = T.match_buffer(Q_handle, (B, H_qo, D), dtype)
        pages = T.match_buffer(pages_handle, (max_num_pages, 2, H_kv, P, D), dtype)
        page_table_indptr = T.match_buffer(page_table_indptr_handle, (B + 1,), "int32",
                                           elem_offset=page_indptr_elem_offset)
        page_table_values = T.match_buffer(page_table_values_handle, (nnz_pages,), "int32",
                                           elem_offset=page_values_elem_offset)
        length_info = T.match_buffer(var_length_info, (B,), "int32", elem_offset=length_info_elem_offset)
        _k_rope_pos = T.match_buffer(k_rope_pos_offset_handle, (B,), "int32", elem_offset=k_rope_pos_offset_elem_offset)
        _q_rope_pos = T.match_buffer(q_rope_position_handle, (B,), "int32", elem_offset=q_rope_position_elem_offset)
        output = T.match_buffer(output_handle, (B, H_qo, D), dtype)
        lse = T.match_buffer(lse_handle, (B, H_qo), "float32")
        T.Assert(rotary_mode == 0, "decode attention: RoPE must be applied on append (RopeMode.NORMAL)")
        for b in T.serial(B):
            for h_qo in T.parallel(H_qo):
                with T.sblock("attn"):
                    T.reads(Q[b, h_qo, 0:D], pages[0:max_num_pages, 0:2, 0:H_kv, 0:P, 0:D],
                            page_table_indptr[b:b + 2], page_table_values[0:nnz_pages], length_info[b])
                    T.writes(output[b, h_qo, 0:D], lse[b, h_qo])
                    q = T.sblock_alloc_buffer((D,), "float32")
                    acc = T.sblock_alloc_buffer((D,), "float32")
                    s = T.sblock_alloc_buffer((P,), "float32")
                    st = T.sblock_alloc_buffer((4,), "float32")
                    begin: T.let[T.int32] = page_table_indptr[b]
                    n_pages: T.let[T.int32] = page_table_indptr[b + 1] - begin
                    h_kv: T.let[T.int32] = h_qo // group
                    _start(q, acc, st, D, D, Q, b, h_qo, sm_scale * _LOG2E)
                    for p in T.serial(n_pages):
                        page_no: T.let[T.int32] = page_table_values[begin + p]
                        rows: T.let[T.int32] = T.if_then_else(p == n_pages - 1, length_info[b], P)
                        for r in T.serial(rows):
                            # A plain reduction: with the targets' fast-math-reassoc LLVM vectorises it
                            # with a shuffle tree at the end (explicit 16-lane partial sums summed
                            # lane by lane measured ~30% slower over the whole kernel).
                            s[r] = T.float32(0)
                            for d in T.serial(D):
                                s[r] = s[r] + q[d] * T.Cast("float32", pages[page_no, 0, h_kv, r, d])
                        _online_softmax_step(s, st, acc, rows, D)
                        for r in T.serial(rows):
                            for d in T.vectorized(D):
                                acc[d] = acc[d] + s[r] * T.Cast("float32", pages[page_no, 1, h_kv, r, d])
                    for d in T.vectorized(D):
                        output[b, h_qo, d] = T.Cast(dtype, acc[d] / st[1])
                    lse[b, h_qo] = st[0] + T.log2(st[1])

    return batch_decode_paged_kv_cpu


def prefill_paged_attention_cpu(num_qo_heads: int, num_kv_heads: int, head_dim: int, page_size: int,
                                dtype: str) -> tirx.PrimFunc:
    """A drop-in for TVM's ``batch_prefill_paged_kv_cpu``: a prefill chunk against the cached pages."""
    H_qo, H_kv, D, P = num_qo_heads, num_kv_heads, head_dim, page_size
    group = H_qo // H_kv

    @T.prim_func(s_tir=True)
    def batch_prefill_paged_kv_cpu(var_q: T.handle, var_q_indptr: T.handle, var_pages: T.handle,
                                   var_page_indptr: T.handle, var_page_values: T.handle,
                                   var_length_info: T.handle, var_k_rope_pos_offset: T.handle,
                                   var_q_rope_position: T.handle, var_output: T.handle, var_lse: T.handle,
                                   causal: T.int32, rotary_mode: T.int32, rope_scale: T.float32,
                                   rope_theta: T.float32, sm_scale: T.float32):
        T.func_attr({"tirx.is_scheduled": True, "global_symbol": PREFILL_PAGED})
        batch_size = T.int32()
        total_len = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        q_indptr_elem_offset = T.int32()
        page_indptr_elem_offset = T.int32()
        page_values_elem_offset = T.int32()
        k_rope_pos_offset_elem_offset = T.int32()
        q_rope_position_elem_offset = T.int32()
        length_info_elem_offset = T.int32()
        q = T.match_buffer(var_q, (total_len, H_qo, D), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=q_indptr_elem_offset)
        pages = T.match_buffer(var_pages, (max_num_pages, 2, H_kv, P, D), dtype)
        page_indptr = T.match_buffer(var_page_indptr, (batch_size + 1,), "int32", elem_offset=page_indptr_elem_offset)
        page_values = T.match_buffer(var_page_values, (nnz_pages,), "int32", elem_offset=page_values_elem_offset)
        _k_rope = T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32",
                                 elem_offset=k_rope_pos_offset_elem_offset)
        _q_rope = T.match_buffer(var_q_rope_position, (total_len,), "int32", elem_offset=q_rope_position_elem_offset)
        output = T.match_buffer(var_output, (total_len, H_qo, D), dtype)
        lse = T.match_buffer(var_lse, (total_len, H_qo), "float32")
        length_info = T.match_buffer(var_length_info, (batch_size,), "int32", elem_offset=length_info_elem_offset)
        T.Assert(rotary_mode == 0, "prefill attention: RoPE must be applied on append (RopeMode.NORMAL)")
        for b in T.serial(batch_size):
            for task in T.parallel((q_indptr[b + 1] - q_indptr[b]) * H_qo):
                with T.sblock("attn"):
                    T.reads(q[0:total_len, 0:H_qo, 0:D], pages[0:max_num_pages, 0:2, 0:H_kv, 0:P, 0:D],
                            q_indptr[b:b + 2], page_indptr[b:b + 2], page_values[0:nnz_pages], length_info[b])
                    T.writes(output[0:total_len, 0:H_qo, 0:D], lse[0:total_len, 0:H_qo])
                    qv = T.sblock_alloc_buffer((D,), "float32")
                    acc = T.sblock_alloc_buffer((D,), "float32")
                    s = T.sblock_alloc_buffer((P,), "float32")
                    st = T.sblock_alloc_buffer((4,), "float32")
                    n_q: T.let[T.int32] = q_indptr[b + 1] - q_indptr[b]
                    begin: T.let[T.int32] = page_indptr[b]
                    n_pages: T.let[T.int32] = page_indptr[b + 1] - begin
                    n_kv: T.let[T.int32] = T.if_then_else(n_pages > 0, (n_pages - 1) * P + length_info[b], 0)
                    h: T.let[T.int32] = task // n_q  # heads outermost: causal rows balance over threads
                    row: T.let[T.int32] = task % n_q
                    h_kv: T.let[T.int32] = h // group
                    q_at: T.let[T.int32] = q_indptr[b] + row
                    # The last key this row may see: causal rows end on the diagonal of the new tokens.
                    n_k: T.let[T.int32] = T.if_then_else(causal > 0, T.max(T.min(n_kv - n_q + row + 1, n_kv), 0),
                                                         n_kv)
                    _start(qv, acc, st, D, D, q, q_at, h, sm_scale * _LOG2E)
                    for p in T.serial((n_k + P - 1) // P):
                        page_no: T.let[T.int32] = page_values[begin + p]
                        rows: T.let[T.int32] = T.min(P, n_k - p * P)
                        for r in T.serial(rows):
                            s[r] = T.float32(0)
                            for i in T.serial(D):
                                s[r] = s[r] + qv[i] * T.Cast("float32", pages[page_no, 0, h_kv, r, i])
                        _online_softmax_step(s, st, acc, rows, D)
                        for r in T.serial(rows):
                            for i in T.vectorized(D):
                                acc[i] = acc[i] + s[r] * T.Cast("float32", pages[page_no, 1, h_kv, r, i])
                    for i in T.vectorized(D):
                        output[q_at, h, i] = T.Cast(dtype, acc[i] / st[1])
                    lse[q_at, h] = st[0] + T.log2(st[1])

    return batch_prefill_paged_kv_cpu


def prefill_ragged_attention_cpu(num_qo_heads: int, num_kv_heads: int, qk_head_dim: int, v_head_dim: int,
                                 dtype: str) -> tirx.PrimFunc:
    """A drop-in for TVM's ``batch_prefill_ragged_kv`` (CPU): a prefill chunk's tokens among themselves."""
    H_qo, H_kv, D_qk, D_v = num_qo_heads, num_kv_heads, qk_head_dim, v_head_dim
    group = H_qo // H_kv

    @T.prim_func(s_tir=True)
    def batch_prefill_ragged_kv(var_q: T.handle, var_q_indptr: T.handle, var_k: T.handle, var_v: T.handle,
                                var_kv_indptr: T.handle, var_q_rope_position: T.handle,
                                var_k_rope_pos_offset: T.handle, var_output: T.handle, var_lse: T.handle,
                                causal: T.int32, rotary_mode: T.int32, rope_scale: T.float32,
                                rope_theta: T.float32, sm_scale: T.float32):
        T.func_attr({"tirx.is_scheduled": True, "global_symbol": PREFILL_RAGGED})
        batch_size = T.int32()
        qo_len = T.int32()
        kv_len = T.int32()
        q_indptr_elem_offset = T.int32()
        kv_indptr_elem_offset = T.int32()
        q_rope_position_elem_offset = T.int32()
        k_rope_pos_offset_elem_offset = T.int32()
        q = T.match_buffer(var_q, (qo_len, H_qo, D_qk), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=q_indptr_elem_offset)
        k = T.match_buffer(var_k, (kv_len, H_kv, D_qk), dtype)
        v = T.match_buffer(var_v, (kv_len, H_kv, D_v), dtype)
        kv_indptr = T.match_buffer(var_kv_indptr, (batch_size + 1,), "int32", elem_offset=kv_indptr_elem_offset)
        _q_rope = T.match_buffer(var_q_rope_position, (qo_len,), "int32", elem_offset=q_rope_position_elem_offset)
        _k_rope = T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32",
                                 elem_offset=k_rope_pos_offset_elem_offset)
        output = T.match_buffer(var_output, (qo_len, H_qo, D_v), dtype)
        lse = T.match_buffer(var_lse, (qo_len, H_qo), "float32")
        T.Assert(rotary_mode == 0, "prefill attention: RoPE must be applied before (RopeMode.NORMAL)")
        for b in T.serial(batch_size):
            for task in T.parallel((q_indptr[b + 1] - q_indptr[b]) * H_qo):
                with T.sblock("attn"):
                    T.reads(q[0:qo_len, 0:H_qo, 0:D_qk], k[0:kv_len, 0:H_kv, 0:D_qk], v[0:kv_len, 0:H_kv, 0:D_v],
                            q_indptr[b:b + 2], kv_indptr[b:b + 2])
                    T.writes(output[0:qo_len, 0:H_qo, 0:D_v], lse[0:qo_len, 0:H_qo])
                    qv = T.sblock_alloc_buffer((D_qk,), "float32")
                    acc = T.sblock_alloc_buffer((D_v,), "float32")
                    s = T.sblock_alloc_buffer((TILE,), "float32")
                    st = T.sblock_alloc_buffer((4,), "float32")
                    n_q: T.let[T.int32] = q_indptr[b + 1] - q_indptr[b]
                    n_kv: T.let[T.int32] = kv_indptr[b + 1] - kv_indptr[b]
                    h: T.let[T.int32] = task // n_q  # heads outermost: causal rows balance over threads
                    row: T.let[T.int32] = task % n_q
                    h_kv: T.let[T.int32] = h // group
                    q_at: T.let[T.int32] = q_indptr[b] + row
                    k_at: T.let[T.int32] = kv_indptr[b]
                    n_k: T.let[T.int32] = T.if_then_else(causal > 0, T.max(T.min(n_kv - n_q + row + 1, n_kv), 0),
                                                         n_kv)
                    _start(qv, acc, st, D_qk, D_v, q, q_at, h, sm_scale * _LOG2E)
                    for t in T.serial((n_k + TILE - 1) // TILE):
                        rows: T.let[T.int32] = T.min(TILE, n_k - t * TILE)
                        for r in T.serial(rows):
                            s[r] = T.float32(0)
                            for i in T.serial(D_qk):
                                s[r] = s[r] + qv[i] * T.Cast("float32", k[k_at + t * TILE + r, h_kv, i])
                        _online_softmax_step(s, st, acc, rows, D_v)
                        for r in T.serial(rows):
                            for i in T.vectorized(D_v):
                                acc[i] = acc[i] + s[r] * T.Cast("float32", v[k_at + t * TILE + r, h_kv, i])
                    for i in T.vectorized(D_v):
                        output[q_at, h, i] = T.Cast(dtype, acc[i] / st[1])
                    lse[q_at, h] = st[0] + T.log2(st[1])

    return batch_prefill_ragged_kv


def _static(extent: tirx.PrimExpr) -> int | None:
    return int(extent) if isinstance(extent, tirx.IntImm) else None


def replacement(name: str, func: tirx.PrimFunc) -> tirx.PrimFunc | None:
    """Our kernel for TVM's kernel ``name`` with ``func``'s shapes; None when it is not one we replace.

    TVM 0.27 binds buffer parameters directly (no buffer_map), so the shapes come from the params.
    """
    params = list(func.params)
    shapes = [getattr(p, "shape", None) for p in params]
    if name == DECODE and len(params) == 13 and all(s is not None for s in shapes[:9]):
        q, pages = shapes[0], shapes[1]
        dims = [_static(e) for e in (q[1], pages[2], pages[4], pages[3])]
        if None not in dims and dims[0] % dims[1] == 0:
            return decode_attention_cpu(dims[0], dims[1], dims[2], dims[3], str(params[0].dtype))
    if name == PREFILL_PAGED and len(params) == 15 and all(s is not None for s in shapes[:10]):
        q, pages, length_info = shapes[0], shapes[2], shapes[5]
        dims = [_static(e) for e in (q[1], pages[2], pages[4], pages[3])]
        if None not in dims and dims[0] % dims[1] == 0 and len(length_info) == 1:  # 2-D: sliding window
            return prefill_paged_attention_cpu(dims[0], dims[1], dims[2], dims[3], str(params[0].dtype))
    if name == PREFILL_RAGGED and len(params) == 14 and all(s is not None for s in shapes[:9]):
        q, k, v = shapes[0], shapes[2], shapes[3]
        dims = [_static(e) for e in (q[1], k[1], q[2], v[2])]
        if None not in dims and dims[0] % dims[1] == 0:
            return prefill_ragged_attention_cpu(dims[0], dims[1], dims[2], dims[3], str(params[0].dtype))
    return None
