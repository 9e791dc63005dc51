"""The exact path of the Triton attention: the tiles whose fast result came out non-finite,
recomputed in IEEE arithmetic over the visible pairs only (docs/nan_semantics.md).

The fast kernels (:mod:`~transfusion_fast.kernels.attention_kernels`) are exact while everything
is finite. Where a NaN or an infinity enters, three things differ from the reference: the hardware
row max drops a NaN score, a row whose visible scores are all -inf gets weight 0 (o = 0 instead of
0/0 = NaN), and inside a partial tile ``tl.dot`` adds ``0 · NaN`` from the hidden pairs, so a NaN
reaches rows of the tile that do not see it (short documents sharing the tile included). Each
fast program writes a flag when its result is non-finite or a row that sees keys got no weight;
each kernel here runs on the same grid after its fast kernel, and its programs whose flag is clear
stop at once. A flagged program recomputes its whole tile in steps of ``STEP`` rows, keys and
output columns:

* scores and ``dO·Vᵀ`` with ``tl.dot`` (each entry belongs to one pair), the row max keeping a NaN;
* the sums over pairs (``P·V``, ``dS·K``, ``Pᵀ·dO``, ``dSᵀ·Q``) as masked sums of the products of
  a (STEP, STEP, STEP) block (:func:`_visible_sum`), never touching a hidden pair.

Small blocks keep every kernel free of register spills at every shipped block size; the weights
are recomputed for each block of output columns. The tile tables and block sizes are the fast
kernels', so a flag and the tile it names match.
"""
from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["attn_fwd_exact", "attn_bwd_dq_exact", "attn_bwd_dkdv_exact", "EXACT_WARPS",
           "EXACT_MAXNREG"]

#: warps of every exact kernel (launched unpipelined), and its register cap: without one, ptxas
#: keeps these kernels at 128 or 168 registers (an occupancy the rare path does not need) and spills
EXACT_WARPS = 8
EXACT_MAXNREG = 255
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
#: rows, keys and output columns per step of the exact path (the tl.dot minimum)
STEP: tl.constexpr = tl.constexpr(16)


@triton.jit
def _visible_sum(a, visible, b):
    """``Σ_y a[x, y] · b[y, z]`` over the visible pairs ``(x, y)`` only, each product in IEEE
    arithmetic: ``a`` (STEP, STEP) fp32, ``visible`` (STEP, STEP), ``b`` (STEP, STEP)."""
    terms = a[:, :, None] * b.to(tl.float32)[None, :, :]
    return tl.sum(tl.where(visible[:, :, None], terms, 0.0), 1)


@triton.jit
def _scores(q, k_head, stride_kt, key, kv_start, kv_end, offs_s, offs_d, n_keys, qk_scale_log2,
            HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Scores (log2 domain) of STEP rows against the STEP keys from ``key``, which pairs are
    visible, and the keys' columns."""
    cols = key + offs_s
    kt = tl.load(k_head + (cols.to(tl.int64)[None, :] * stride_kt + offs_d[:, None]),
                 mask=(offs_d < HEAD_DIM)[:, None] & (cols < n_keys)[None, :], other=0.0)
    qk = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale_log2
    visible = (cols[None, :] >= kv_start[:, None]) & (cols[None, :] < kv_end[:, None])
    return qk, visible, cols


@triton.jit
def attn_fwd_exact(Q, K, V, O, LSE, KV_START, KV_END, KV_LO, KV_HI, FLAGS,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                   stride_ot, stride_oh, n_queries, n_keys, qk_scale_log2,
                   GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """o, lse of a flagged (row tile, query head), as the reference computes them: the row max
    keeps a NaN score, a row whose visible scores are all -inf gets o = 0/0 = NaN, lse = -inf."""
    pid_m = tl.program_id(0)
    head = tl.program_id(1)
    if tl.load(FLAGS + head * tl.num_programs(0) + pid_m) != 0:
        offs_s = tl.arange(0, STEP)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        k_head = K + (head // GROUP) * stride_kh
        v_head = V + (head // GROUP) * stride_vh
        key_lo = tl.load(KV_LO + pid_m) * BLOCK_N
        key_hi = tl.minimum(tl.load(KV_HI + pid_m) * BLOCK_N, n_keys)
        for first in range(pid_m * BLOCK_M, tl.minimum(pid_m * BLOCK_M + BLOCK_M, n_queries), STEP):
            rows = first + offs_s
            row_ok = rows < n_queries
            q = tl.load(Q + head * stride_qh + (rows.to(tl.int64)[:, None] * stride_qt + offs_d[None, :]),
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            kv_start = tl.load(KV_START + rows, mask=row_ok, other=0)
            kv_end = tl.load(KV_END + rows, mask=row_ok, other=0)
            # -- pass 1: the row max over the visible scores; the hardware max drops a NaN
            m = tl.full([STEP], float("-inf"), dtype=tl.float32)
            sees_nan = tl.zeros([STEP], dtype=tl.int32)
            for key in range(key_lo, key_hi, STEP):
                qk, visible, cols = _scores(q, k_head, stride_kt, key, kv_start, kv_end, offs_s,
                                            offs_d, n_keys, qk_scale_log2, HEAD_DIM, DOT_PRECISION)
                sees_nan |= tl.max(((qk != qk) & visible).to(tl.int32), 1)
                m = tl.maximum(m, tl.max(tl.where(visible, qk, float("-inf")), 1))
            m = tl.where(sees_nan > 0, float("nan"), m)
            m = tl.where(m == float("-inf"), 0.0, m)    # nothing visible, or only -inf: shift by 0
            # -- pass 2, STEP output columns at a time: o = Σ p·v / Σ p over the visible pairs
            l_i = tl.zeros([STEP], dtype=tl.float32)
            for c in range(0, HEAD_DIM, STEP):
                offs_c = c + offs_s
                c_ok = offs_c < HEAD_DIM
                acc = tl.zeros([STEP, STEP], dtype=tl.float32)
                l_i = tl.zeros([STEP], dtype=tl.float32)
                for key in range(key_lo, key_hi, STEP):
                    qk, visible, cols = _scores(q, k_head, stride_kt, key, kv_start, kv_end, offs_s,
                                                offs_d, n_keys, qk_scale_log2, HEAD_DIM,
                                                DOT_PRECISION)
                    p = tl.where(visible, tl.math.exp2(qk - m[:, None]), 0.0)
                    l_i += tl.sum(p, 1)
                    v = tl.load(v_head + (cols.to(tl.int64)[:, None] * stride_vt + offs_c[None, :]),
                                mask=(cols < n_keys)[:, None] & c_ok[None, :], other=0.0)
                    acc += _visible_sum(p, visible, v)
                o = acc / tl.where(kv_end > kv_start, l_i, 1.0)[:, None]   # a row that sees nothing: 0
                tl.store(O + head * stride_oh + (rows.to(tl.int64)[:, None] * stride_ot + offs_c[None, :]),
                         o.to(O.dtype.element_ty), mask=row_ok[:, None] & c_ok[None, :])
            tl.store(LSE + head * n_queries + rows, (m + tl.math.log2(l_i)) / LOG2E, mask=row_ok)


@triton.jit
def attn_bwd_dq_exact(Q, K, V, DO, LSE, DELTA, DQ, KV_START, KV_END, KV_LO, KV_HI, FLAGS,
                      stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                      stride_dot, stride_doh, stride_dqt, stride_dqh,
                      n_queries, n_keys, qk_scale_log2, scale,
                      GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dQ of a flagged (row tile, query head) over the visible pairs; reads the delta that the
    fast dQ kernel wrote."""
    pid_m = tl.program_id(0)
    head = tl.program_id(1)
    if tl.load(FLAGS + head * tl.num_programs(0) + pid_m) != 0:
        offs_s = tl.arange(0, STEP)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        k_head = K + (head // GROUP) * stride_kh
        v_head = V + (head // GROUP) * stride_vh
        key_lo = tl.load(KV_LO + pid_m) * BLOCK_N
        key_hi = tl.minimum(tl.load(KV_HI + pid_m) * BLOCK_N, n_keys)
        for first in range(pid_m * BLOCK_M, tl.minimum(pid_m * BLOCK_M + BLOCK_M, n_queries), STEP):
            rows = first + offs_s
            row_ok = rows < n_queries
            row_offs = rows.to(tl.int64)[:, None]
            q_mask = row_ok[:, None] & d_ok[None, :]
            q = tl.load(Q + head * stride_qh + (row_offs * stride_qt + offs_d[None, :]), mask=q_mask,
                        other=0.0)
            do = tl.load(DO + head * stride_doh + (row_offs * stride_dot + offs_d[None, :]),
                         mask=q_mask, other=0.0)
            lse = tl.load(LSE + head * n_queries + rows, mask=row_ok, other=0.0) * LOG2E
            delta = tl.load(DELTA + head * n_queries + rows, mask=row_ok, other=0.0)
            kv_start = tl.load(KV_START + rows, mask=row_ok, other=0)
            kv_end = tl.load(KV_END + rows, mask=row_ok, other=0)
            for c in range(0, HEAD_DIM, STEP):
                offs_c = c + offs_s
                c_ok = offs_c < HEAD_DIM
                dq = tl.zeros([STEP, STEP], dtype=tl.float32)
                for key in range(key_lo, key_hi, STEP):
                    # K and V of the step loaded together, not through _scores: that order
                    # spills at D = 256 on sm_90a
                    cols = key + offs_s
                    col_ok = cols < n_keys
                    col_offs = cols.to(tl.int64)[None, :]
                    kt = tl.load(k_head + (col_offs * stride_kt + offs_d[:, None]),
                                 mask=d_ok[:, None] & col_ok[None, :], other=0.0)
                    vt = tl.load(v_head + (col_offs * stride_vt + offs_d[:, None]),
                                 mask=d_ok[:, None] & col_ok[None, :], other=0.0)
                    qk = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale_log2
                    visible = (cols[None, :] >= kv_start[:, None]) & (cols[None, :] < kv_end[:, None])
                    p = tl.where(visible, tl.math.exp2(qk - lse[:, None]), 0.0)
                    dp = tl.dot(do, vt, input_precision=DOT_PRECISION)
                    ds = tl.where(visible, p * (dp - delta[:, None]), 0.0)
                    k = tl.load(k_head + (cols.to(tl.int64)[:, None] * stride_kt + offs_c[None, :]),
                                mask=col_ok[:, None] & c_ok[None, :], other=0.0)
                    dq += _visible_sum(ds, visible, k)
                tl.store(DQ + head * stride_dqh + (row_offs * stride_dqt + offs_c[None, :]),
                         (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & c_ok[None, :])


@triton.jit
def attn_bwd_dkdv_exact(Q, K, V, DO, LSE, DELTA, DK, DV, KV_START, KV_END, Q_LO, Q_HI, FLAGS,
                        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                        stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
                        n_queries, n_keys, qk_scale_log2, scale,
                        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dK, dV of a flagged (key tile, kv head) over the visible pairs, summed over the query heads
    of its GQA group."""
    pid_n = tl.program_id(0)
    kv_head = tl.program_id(1)
    if tl.load(FLAGS + kv_head * tl.num_programs(0) + pid_n) != 0:
        offs_s = tl.arange(0, STEP)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        row_lo = tl.load(Q_LO + pid_n) * BLOCK_M
        row_hi = tl.minimum(tl.load(Q_HI + pid_n) * BLOCK_M, n_queries)
        for first in range(pid_n * BLOCK_N, tl.minimum(pid_n * BLOCK_N + BLOCK_N, n_keys), STEP):
            cols = first + offs_s
            col_ok = cols < n_keys
            col_offs = cols.to(tl.int64)[:, None]
            kv_mask = col_ok[:, None] & d_ok[None, :]
            k = tl.load(K + kv_head * stride_kh + (col_offs * stride_kt + offs_d[None, :]),
                        mask=kv_mask, other=0.0)
            v = tl.load(V + kv_head * stride_vh + (col_offs * stride_vt + offs_d[None, :]),
                        mask=kv_mask, other=0.0)
            for c in range(0, HEAD_DIM, STEP):
                offs_c = c + offs_s
                c_ok = offs_c < HEAD_DIM
                dk = tl.zeros([STEP, STEP], dtype=tl.float32)
                dv = tl.zeros([STEP, STEP], dtype=tl.float32)
                for g in range(GROUP):
                    head = kv_head * GROUP + g
                    for row in range(row_lo, row_hi, STEP):
                        rows = row + offs_s
                        row_ok = rows < n_queries
                        row_offs = rows.to(tl.int64)[:, None]
                        q_ptrs = Q + head * stride_qh + row_offs * stride_qt
                        do_ptrs = DO + head * stride_doh + row_offs * stride_dot
                        q_mask = row_ok[:, None] & d_ok[None, :]
                        q = tl.load(q_ptrs + offs_d[None, :], mask=q_mask, other=0.0)
                        do = tl.load(do_ptrs + offs_d[None, :], mask=q_mask, other=0.0)
                        lse = tl.load(LSE + head * n_queries + rows, mask=row_ok, other=0.0) * LOG2E
                        delta = tl.load(DELTA + head * n_queries + rows, mask=row_ok, other=0.0)
                        kv_start = tl.load(KV_START + rows, mask=row_ok, other=0)
                        kv_end = tl.load(KV_END + rows, mask=row_ok, other=0)
                        visible = ((cols[:, None] >= kv_start[None, :])
                                   & (cols[:, None] < kv_end[None, :]))           # (keys, rows)
                        qkt = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale_log2
                        pt = tl.where(visible, tl.math.exp2(qkt - lse[None, :]), 0.0)
                        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
                        dst = tl.where(visible, pt * (dpt - delta[None, :]), 0.0)
                        c_mask = row_ok[:, None] & c_ok[None, :]
                        dv += _visible_sum(pt, visible, tl.load(do_ptrs + offs_c[None, :], mask=c_mask,
                                                                other=0.0))
                        dk += _visible_sum(dst, visible, tl.load(q_ptrs + offs_c[None, :], mask=c_mask,
                                                                 other=0.0))
                out_mask = col_ok[:, None] & c_ok[None, :]
                tl.store(DK + kv_head * stride_dkh + (col_offs * stride_dkt + offs_c[None, :]),
                         (dk * scale).to(DK.dtype.element_ty), mask=out_mask)
                tl.store(DV + kv_head * stride_dvh + (col_offs * stride_dvt + offs_c[None, :]),
                         dv.to(DV.dtype.element_ty), mask=out_mask)
