"""The Triton kernels of block-sparse Transfusion attention: forward, dQ (with delta), dK/dV.

The mask is a key interval ``[kv_start[i], kv_end[i])`` per query row (see
:mod:`transfusion_fast.layout`). Every kernel walks the tile tables of the Layout:

* :func:`attn_fwd` (FlashAttention-2 style, online softmax in fp32), grid ``(num_m_tiles, Hq)``:
  row tile ``m`` walks key tiles ``[kv_lo, kv_full_lo)`` with the element mask,
  ``[kv_full_lo, kv_full_hi)`` with no mask arithmetic at all, ``[kv_full_hi, kv_hi)`` with the
  element mask. Skip tiles are never loaded.
* :func:`attn_bwd_dq`, grid ``(num_m_tiles, Hq)``, walks the same key tiles as the forward and also
  writes ``delta = rowsum(dO * O) - dLSE`` of its rows; then :func:`attn_bwd_dkdv`, grid
  ``(num_n_tiles, Hkv)``, walks the query tiles of its key tile (same three ranges from the column
  side) for every query head of its GQA group inside the program (deterministic, no atomics).

Programs take their tiles from the tile table's longest-first order (``m_order`` / ``n_order``),
one head after another: the long walks start first and short ones fill the last wave.

The one exception to "no mask arithmetic on full tiles" is a ragged last tile (the sequence length
is not a multiple of the block): it is full by the table but its loads need a bound, so it goes
through the masked path, where the element mask is also correct for it. Decode / prefix layouts
(query rows = the last rows of each document) need nothing special: the intervals encode them.

Non-finite values (docs/nan_semantics.md): these walks are exact while everything stays finite.
Each program writes to ``FLAGS`` whether its result came out non-finite (or with a row that sees
keys but got no weight: all its scores -inf); the kernels of
:mod:`~transfusion_fast.kernels.attention_exact`, launched after each of these, recompute exactly
those tiles in IEEE arithmetic over the visible pairs. Finite inputs pay one reduction over the
result per program here, and a launch whose programs read their flag and stop.

A ``COUNT_WORK`` constexpr makes each program record the tiles it computed (see
:func:`transfusion_fast.kernels.attention_diagnostics.count_computed_tiles`). The host side (tile
sizes, launches, autograd) is in :mod:`transfusion_fast.kernels.attention`.
"""
from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["attn_fwd", "attn_bwd_dq", "attn_bwd_dkdv"]


@triton.jit
def _store_work(WORK, slot, masked_tiles, unmasked_tiles):
    """Work counter, WORK of shape (2, grid heads, grid tiles): [0] tiles computed, [1] of which
    without mask arithmetic."""
    tl.store(WORK + slot, masked_tiles + unmasked_tiles)
    tl.store(WORK + tl.num_programs(0) * tl.num_programs(1) + slot, unmasked_tiles)


@triton.jit
def _non_finite(x):
    """1 when some element of the 2-D ``x`` is NaN or infinite, else 0."""
    return 1 - tl.min(tl.min((tl.abs(x) < float("inf")).to(tl.int32), 1), 0)


@triton.jit
def _fwd_tile_walk(acc, l_i, m_i, count, q, k_base, v_base, stride_kt, stride_vt,
                   kv_start, kv_end, offs_n, offs_d, tile_lo, tile_hi, n_keys, qk_scale_log2,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                   MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr, COUNT_WORK: tl.constexpr):
    """Online-softmax update of one row tile over key tiles [tile_lo, tile_hi)."""
    d_ok = offs_d < HEAD_DIM
    # int32 offsets inside a tile, an int64 scalar offset per tile: few 64-bit registers
    kt_offs = offs_n[None, :] * stride_kt + offs_d[:, None]
    v_offs = offs_n[:, None] * stride_vt + offs_d[None, :]
    k_tile = k_base + tile_lo.to(tl.int64) * BLOCK_N * stride_kt
    v_tile = v_base + tile_lo.to(tl.int64) * BLOCK_N * stride_vt
    for tile in range(tile_lo, tile_hi):
        cols = tile * BLOCK_N + offs_n
        # -- load K^T (D, N) and V (N, D); full tiles need a bound only on a padded head_dim
        kt_ptrs = k_tile + kt_offs
        v_ptrs = v_tile + v_offs
        k_tile += BLOCK_N * stride_kt
        v_tile += BLOCK_N * stride_vt
        if MASKED:
            col_ok = cols < n_keys
            kt = tl.load(kt_ptrs, mask=d_ok[:, None] & col_ok[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        elif BLOCK_D != HEAD_DIM:
            kt = tl.load(kt_ptrs, mask=d_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        else:
            kt = tl.load(kt_ptrs)
            v = tl.load(v_ptrs)
        # -- scores in the log2 domain (the softmax scale and log2(e) folded into one multiply)
        qk = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale_log2
        if MASKED:
            visible = (cols[None, :] >= kv_start[:, None]) & (cols[None, :] < kv_end[:, None])
            qk = tl.where(visible, qk, float("-inf"))
        # -- online softmax: a row with nothing visible yet keeps m = -inf; shift it by 0 instead
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        if MASKED:
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_shift = m_new
        p = tl.math.exp2(qk - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        # -- P (rounded to the input dtype, as in FlashAttention) times V
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
        if COUNT_WORK:
            count += 1
    return acc, l_i, m_i, count


@triton.jit
def attn_fwd(Q, K, V, O, LSE, KV_START, KV_END, KV_LO, KV_HI, KV_FULL_LO, KV_FULL_HI, M_ORDER,
              FLAGS, WORK,
              stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
              stride_ot, stride_oh,
              n_queries, n_keys, qk_scale_log2,
              GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
              COUNT_WORK: tl.constexpr):
    """o, lse of one (row tile, query head); the row tiles of a head go longest walk first."""
    pid_m = tl.load(M_ORDER + tl.program_id(0))
    head = tl.program_id(1)
    kv_head = head // GROUP
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < n_queries
    d_ok = offs_d < HEAD_DIM
    first_row = (pid_m * BLOCK_M).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)

    # -- this tile's rows: queries and their key intervals (padding rows see nothing)
    q = tl.load(Q + first_row * stride_qt + head * stride_qh
                + (offs_m[:, None] * stride_qt + offs_d[None, :]),
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    kv_start = tl.load(KV_START + rows, mask=row_ok, other=0)
    kv_end = tl.load(KV_END + rows, mask=row_ok, other=0)

    # -- the walk: partial, full, partial (a ragged last key tile goes through the masked path)
    kv_lo = tl.load(KV_LO + pid_m)
    kv_hi = tl.load(KV_HI + pid_m)
    full_lo = tl.load(KV_FULL_LO + pid_m)
    full_hi = tl.maximum(full_lo, tl.minimum(tl.load(KV_FULL_HI + pid_m), n_keys // BLOCK_N))

    k_base = K + kv_head * stride_kh
    v_base = V + kv_head * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    count = 0       # tiles computed with the element mask (COUNT_WORK only)
    unmasked = 0    # tiles computed without any mask arithmetic
    acc, l_i, m_i, count = _fwd_tile_walk(
        acc, l_i, m_i, count, q, k_base, v_base, stride_kt, stride_vt, kv_start, kv_end, offs_n,
        offs_d, kv_lo, full_lo, n_keys, qk_scale_log2, HEAD_DIM, BLOCK_D, BLOCK_N, True,
        DOT_PRECISION, COUNT_WORK)
    acc, l_i, m_i, unmasked = _fwd_tile_walk(
        acc, l_i, m_i, unmasked, q, k_base, v_base, stride_kt, stride_vt, kv_start, kv_end,
        offs_n, offs_d, full_lo, full_hi, n_keys, qk_scale_log2, HEAD_DIM, BLOCK_D, BLOCK_N, False,
        DOT_PRECISION, COUNT_WORK)
    acc, l_i, m_i, count = _fwd_tile_walk(
        acc, l_i, m_i, count, q, k_base, v_base, stride_kt, stride_vt, kv_start, kv_end, offs_n,
        offs_d, full_hi, kv_hi, n_keys, qk_scale_log2, HEAD_DIM, BLOCK_D, BLOCK_N, True,
        DOT_PRECISION, COUNT_WORK)

    # -- normalise; lse back to the natural-log domain
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse = (m_i + tl.math.log2(l_safe)) / 1.4426950408889634
    # -- exact unless something is non-finite: a row that sees keys has l >= 1 (its max scores 1)
    sees_keys = kv_end > kv_start
    tl.store(FLAGS + head * tl.num_programs(0) + pid_m,
             _non_finite(o) | tl.max(((l_i > 0.0) == 0) & sees_keys, 0).to(tl.int32))
    tl.store(O + first_row * stride_ot + head * stride_oh
             + (offs_m[:, None] * stride_ot + offs_d[None, :]),
             o.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + head * n_queries + rows, lse, mask=row_ok)
    if COUNT_WORK:
        _store_work(WORK, head * tl.num_programs(0) + pid_m, count, unmasked)


@triton.jit
def _dkdv_tile_walk(dk, dv, count, k, v, q_base, do_base, lse_base, delta_base, stride_qt,
                    stride_dot, KV_START, KV_END, cols, offs_m, offs_d, tile_lo, tile_hi, n_queries,
                    qk_scale_log2, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_M: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    COUNT_WORK: tl.constexpr):
    """Accumulate dK, dV of one key tile over query tiles [tile_lo, tile_hi) of one query head."""
    d_ok = offs_d < HEAD_DIM
    q_offs = offs_m[:, None] * stride_qt + offs_d[None, :]
    do_offs = offs_m[:, None] * stride_dot + offs_d[None, :]
    q_tile = q_base + tile_lo.to(tl.int64) * BLOCK_M * stride_qt
    do_tile = do_base + tile_lo.to(tl.int64) * BLOCK_M * stride_dot
    for tile in range(tile_lo, tile_hi):
        rows = tile * BLOCK_M + offs_m
        q_ptrs = q_tile + q_offs
        do_ptrs = do_tile + do_offs
        q_tile += BLOCK_M * stride_qt
        do_tile += BLOCK_M * stride_dot
        # -- load Q, dO (M, D) and the per-row softmax statistics
        if MASKED:
            row_ok = rows < n_queries
            q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            do = tl.load(do_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            lse = tl.load(lse_base + rows, mask=row_ok, other=0.0)
            delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
        else:
            if BLOCK_D != HEAD_DIM:
                q = tl.load(q_ptrs, mask=d_ok[None, :], other=0.0)
                do = tl.load(do_ptrs, mask=d_ok[None, :], other=0.0)
            else:
                q = tl.load(q_ptrs)
                do = tl.load(do_ptrs)
            lse = tl.load(lse_base + rows)
            delta = tl.load(delta_base + rows)
        # -- P^T (N, M) recomputed from the saved lse
        qkt = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale_log2
        pt = tl.math.exp2(qkt - (lse * 1.4426950408889634)[None, :])
        if MASKED:
            kv_start = tl.load(KV_START + rows, mask=row_ok, other=0)
            kv_end = tl.load(KV_END + rows, mask=row_ok, other=0)
            visible = (cols[:, None] >= kv_start[None, :]) & (cols[:, None] < kv_end[None, :])
            pt = tl.where(visible, pt, 0.0)
        # -- dV += P^T dO ; dS^T = P^T * (dP^T - delta) ; dK += dS^T Q (scale applied at the end)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=DOT_PRECISION)
        if COUNT_WORK:
            count += 1
    return dk, dv, count


@triton.jit
def attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, KV_START, KV_END,
                   Q_LO, Q_HI, Q_FULL_LO, Q_FULL_HI, N_ORDER, FLAGS, WORK,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                   stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
                   n_queries, n_keys, qk_scale_log2, scale,
                   GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   COUNT_WORK: tl.constexpr):
    """dK, dV of one (key tile, kv head), summed over the query heads of its GQA group; the key
    tiles of a head go longest walk first."""
    pid_n = tl.load(N_ORDER + tl.program_id(0))
    kv_head = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = cols < n_keys
    kv_mask = col_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    first_col = (pid_n * BLOCK_N).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)

    # -- this key tile stays in registers for the whole walk
    k = tl.load(K + first_col * stride_kt + kv_head * stride_kh
                + (offs_n[:, None] * stride_kt + offs_d[None, :]), mask=kv_mask, other=0.0)
    v = tl.load(V + first_col * stride_vt + kv_head * stride_vh
                + (offs_n[:, None] * stride_vt + offs_d[None, :]), mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # -- the query tiles that see this key tile (a ragged last query tile goes masked)
    q_lo = tl.load(Q_LO + pid_n)
    q_hi = tl.load(Q_HI + pid_n)
    full_lo = tl.load(Q_FULL_LO + pid_n)
    full_hi = tl.maximum(full_lo, tl.minimum(tl.load(Q_FULL_HI + pid_n), n_queries // BLOCK_M))
    count = 0
    unmasked = 0
    # -- the GQA group inside the program: a fixed summation order, no atomics
    for g in range(GROUP):
        head = kv_head * GROUP + g
        q_base = Q + head * stride_qh
        do_base = DO + head * stride_doh
        lse_base = LSE + head * n_queries
        delta_base = DELTA + head * n_queries
        dk, dv, count = _dkdv_tile_walk(
            dk, dv, count, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
            KV_START, KV_END, cols, offs_m, offs_d, q_lo, full_lo, n_queries, qk_scale_log2,
            HEAD_DIM, BLOCK_D, BLOCK_M, True, DOT_PRECISION, COUNT_WORK)
        dk, dv, unmasked = _dkdv_tile_walk(
            dk, dv, unmasked, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
            KV_START, KV_END, cols, offs_m, offs_d, full_lo, full_hi, n_queries, qk_scale_log2,
            HEAD_DIM, BLOCK_D, BLOCK_M, False, DOT_PRECISION, COUNT_WORK)
        dk, dv, count = _dkdv_tile_walk(
            dk, dv, count, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
            KV_START, KV_END, cols, offs_m, offs_d, full_hi, q_hi, n_queries, qk_scale_log2,
            HEAD_DIM, BLOCK_D, BLOCK_M, True, DOT_PRECISION, COUNT_WORK)

    dk *= scale
    tl.store(FLAGS + kv_head * tl.num_programs(0) + pid_n, _non_finite(dk + dv))   # either one
    tl.store(DK + first_col * stride_dkt + kv_head * stride_dkh
             + (offs_n[:, None] * stride_dkt + offs_d[None, :]),
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + first_col * stride_dvt + kv_head * stride_dvh
             + (offs_n[:, None] * stride_dvt + offs_d[None, :]),
             dv.to(DV.dtype.element_ty), mask=kv_mask)
    if COUNT_WORK:
        _store_work(WORK, kv_head * tl.num_programs(0) + pid_n, count, unmasked)


@triton.jit
def _dq_tile_walk(dq, count, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, kv_start,
                  kv_end, offs_n, offs_d, tile_lo, tile_hi, n_keys, qk_scale_log2,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                  MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr, COUNT_WORK: tl.constexpr):
    """Accumulate dQ of one row tile over key tiles [tile_lo, tile_hi)."""
    d_ok = offs_d < HEAD_DIM
    kt_offs = offs_n[None, :] * stride_kt + offs_d[:, None]
    vt_offs = offs_n[None, :] * stride_vt + offs_d[:, None]
    k_tile = k_base + tile_lo.to(tl.int64) * BLOCK_N * stride_kt
    v_tile = v_base + tile_lo.to(tl.int64) * BLOCK_N * stride_vt
    for tile in range(tile_lo, tile_hi):
        cols = tile * BLOCK_N + offs_n
        # -- load K^T and V^T (D, N)
        kt_ptrs = k_tile + kt_offs
        vt_ptrs = v_tile + vt_offs
        k_tile += BLOCK_N * stride_kt
        v_tile += BLOCK_N * stride_vt
        if MASKED:
            mask = d_ok[:, None] & (cols < n_keys)[None, :]
            kt = tl.load(kt_ptrs, mask=mask, other=0.0)
            vt = tl.load(vt_ptrs, mask=mask, other=0.0)
        elif BLOCK_D != HEAD_DIM:
            kt = tl.load(kt_ptrs, mask=d_ok[:, None], other=0.0)
            vt = tl.load(vt_ptrs, mask=d_ok[:, None], other=0.0)
        else:
            kt = tl.load(kt_ptrs)
            vt = tl.load(vt_ptrs)
        # -- P recomputed from the saved lse
        qk = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale_log2
        p = tl.math.exp2(qk - lse[:, None])
        if MASKED:
            visible = (cols[None, :] >= kv_start[:, None]) & (cols[None, :] < kv_end[:, None])
            p = tl.where(visible, p, 0.0)
        # -- dS = P * (dP - delta) ; dQ += dS K (scale applied at the end)
        dp = tl.dot(do, vt, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=DOT_PRECISION)
        if COUNT_WORK:
            count += 1
    return dq, count


@triton.jit
def attn_bwd_dq(Q, K, V, O, DO, LSE, DLSE, DELTA, DQ, KV_START, KV_END,
                 KV_LO, KV_HI, KV_FULL_LO, KV_FULL_HI, M_ORDER, FLAGS, WORK,
                 stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                 stride_ot, stride_oh, stride_dot, stride_doh, stride_dqt, stride_dqh,
                 n_queries, n_keys, qk_scale_log2, scale,
                 GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_DLSE: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, COUNT_WORK: tl.constexpr):
    """dQ of one (row tile, query head): one writer per element, deterministic. It also writes
    delta = rowsum(dO * O) - dLSE of its rows, which the dK/dV kernel, launched after it, reads:
    the backward needs no separate pass over O and dO. The row tiles go longest walk first."""
    pid_m = tl.load(M_ORDER + tl.program_id(0))
    head = tl.program_id(1)
    kv_head = head // GROUP
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < n_queries
    q_mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    first_row = (pid_m * BLOCK_M).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)

    # -- delta = rowsum(dO * O) - dLSE of these rows (d lse_i / d s_ij = p_ij: an lse gradient
    #    enters dS exactly like a shift of delta); O is dead before Q is loaded
    do = tl.load(DO + first_row * stride_dot + head * stride_doh
                 + (offs_m[:, None] * stride_dot + offs_d[None, :]), mask=q_mask, other=0.0)
    o = tl.load(O + first_row * stride_ot + head * stride_oh
                + (offs_m[:, None] * stride_ot + offs_d[None, :]), mask=q_mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + head * n_queries + rows, mask=row_ok, other=0.0)
    tl.store(DELTA + head * n_queries + rows, delta, mask=row_ok)
    # -- this tile's rows: Q, statistics and key intervals
    q = tl.load(Q + first_row * stride_qt + head * stride_qh
                + (offs_m[:, None] * stride_qt + offs_d[None, :]), mask=q_mask, other=0.0)
    lse = tl.load(LSE + head * n_queries + rows, mask=row_ok, other=0.0) * 1.4426950408889634
    kv_start = tl.load(KV_START + rows, mask=row_ok, other=0)
    kv_end = tl.load(KV_END + rows, mask=row_ok, other=0)

    # -- the same walk as the forward
    kv_lo = tl.load(KV_LO + pid_m)
    kv_hi = tl.load(KV_HI + pid_m)
    full_lo = tl.load(KV_FULL_LO + pid_m)
    full_hi = tl.maximum(full_lo, tl.minimum(tl.load(KV_FULL_HI + pid_m), n_keys // BLOCK_N))
    k_base = K + kv_head * stride_kh
    v_base = V + kv_head * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    count = 0
    unmasked = 0
    dq, count = _dq_tile_walk(dq, count, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt,
                              kv_start, kv_end, offs_n, offs_d, kv_lo, full_lo, n_keys,
                              qk_scale_log2, HEAD_DIM, BLOCK_D, BLOCK_N, True, DOT_PRECISION,
                              COUNT_WORK)
    dq, unmasked = _dq_tile_walk(dq, unmasked, q, do, lse, delta, k_base, v_base, stride_kt,
                                 stride_vt, kv_start, kv_end, offs_n, offs_d, full_lo, full_hi,
                                 n_keys, qk_scale_log2, HEAD_DIM, BLOCK_D, BLOCK_N, False,
                                 DOT_PRECISION, COUNT_WORK)
    dq, count = _dq_tile_walk(dq, count, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt,
                              kv_start, kv_end, offs_n, offs_d, full_hi, kv_hi, n_keys,
                              qk_scale_log2, HEAD_DIM, BLOCK_D, BLOCK_N, True, DOT_PRECISION,
                              COUNT_WORK)
    dq *= scale
    tl.store(FLAGS + head * tl.num_programs(0) + pid_m, _non_finite(dq))
    tl.store(DQ + first_row * stride_dqt + head * stride_dqh
             + (offs_m[:, None] * stride_dqt + offs_d[None, :]),
             dq.to(DQ.dtype.element_ty), mask=q_mask)
    if COUNT_WORK:
        _store_work(WORK, head * tl.num_programs(0) + pid_m, count, unmasked)
