"""Block-sparse Transfusion attention in Triton: forward, backward, autograd, AOT specs.

The mask is a key interval ``[kv_start[i], kv_end[i])`` per query row (see
:mod:`transfusion_fast.layout`). Every kernel walks the tile tables of the Layout:

* forward (FlashAttention-2 style, online softmax in fp32), grid ``(num_m_tiles, Hq)``: row tile
  ``m`` walks key tiles ``[kv_lo, kv_full_lo)`` with the element mask, ``[kv_full_lo, kv_full_hi)``
  with no mask arithmetic at all, ``[kv_full_hi, kv_hi)`` with the element mask. Skip tiles are
  never loaded.
* backward: a dQ kernel, grid ``(num_m_tiles, Hq)``, walks the same key tiles as the forward and
  also writes ``delta = rowsum(dO * O) - dLSE`` of its rows; then a dK/dV kernel, grid
  ``(num_n_tiles, Hkv)``, walks the query tiles of its key tile (same three ranges from the column
  side) for every query head of its GQA group inside the program (deterministic, no atomics).

Programs take their tiles from the tile table's longest-first order (``m_order`` / ``n_order``),
one head after another: the long walks start first and short ones fill the last wave.

The one exception to "no mask arithmetic on full tiles" is a ragged last tile (the sequence length
is not a multiple of the block): it is full by the table but its loads need a bound, so it goes
through the masked path, where the element mask is also correct for it. Decode / prefix layouts
(query rows = the last rows of each document) need nothing special: the intervals encode them.

``triton_attention`` is registered as the custom ops ``transfusion_fast::triton_attention_fwd`` /
``_bwd`` with a fake implementation, so ``torch.compile`` traces it without a graph break; eager
calls launch the kernels directly, through :class:`_Launcher`, which keeps the host time of a call
small (at a few thousand tokens the GPU otherwise waits for the host).

Tile sizes come from :func:`tile_config` (per head_dim, dtype and sm_80 / sm_90), overridable with
:func:`forced_tile_sizes`; the tile tables are cached on the Layout per block size, so every layer
reuses them. A ``COUNT_WORK`` constexpr makes each program record the tiles it computed
(:func:`count_computed_tiles`); :func:`aot_specs` lists every shipped kernel config for
:mod:`transfusion_fast.aot`.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.compiler import CompiledKernel

from transfusion_fast.layout import Layout, TileTable

__all__ = ["triton_attention", "TileConfig", "tile_config", "forced_tile_sizes",
           "count_computed_tiles", "aot_specs", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634


# ================================================================================== kernels
@triton.jit
def _store_work(WORK, slot, masked_tiles, unmasked_tiles):
    """Work counter, WORK of shape (2, grid heads, grid tiles): [0] tiles computed, [1] of which
    without mask arithmetic."""
    tl.store(WORK + slot, masked_tiles + unmasked_tiles)
    tl.store(WORK + tl.num_programs(0) * tl.num_programs(1) + slot, unmasked_tiles)


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
def _attn_fwd(Q, K, V, O, LSE, KV_START, KV_END, KV_LO, KV_HI, KV_FULL_LO, KV_FULL_HI, M_ORDER,
              WORK,
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
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, KV_START, KV_END,
                   Q_LO, Q_HI, Q_FULL_LO, Q_FULL_HI, N_ORDER, WORK,
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
def _attn_bwd_dq(Q, K, V, O, DO, LSE, DLSE, DELTA, DQ, KV_START, KV_END,
                 KV_LO, KV_HI, KV_FULL_LO, KV_FULL_HI, M_ORDER, WORK,
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
    tl.store(DQ + first_row * stride_dqt + head * stride_dqh
             + (offs_m[:, None] * stride_dqt + offs_d[None, :]),
             dq.to(DQ.dtype.element_ty), mask=q_mask)
    if COUNT_WORK:
        _store_work(WORK, head * tl.num_programs(0) + pid_m, count, unmasked)


# ================================================================================== tile sizes
@dataclass(frozen=True)
class TileConfig:
    """Block sizes, warps and pipeline stages of the forward and of the two backward kernels."""

    fwd_block_m: int
    fwd_block_n: int
    fwd_warps: int
    fwd_stages: int
    dkdv_block_m: int
    dkdv_block_n: int
    dkdv_warps: int
    dkdv_stages: int
    dq_block_m: int
    dq_block_n: int
    dq_warps: int
    dq_stages: int

    def as_list(self) -> list[int]:
        return [self.fwd_block_m, self.fwd_block_n, self.fwd_warps, self.fwd_stages,
                self.dkdv_block_m, self.dkdv_block_n, self.dkdv_warps, self.dkdv_stages,
                self.dq_block_m, self.dq_block_n, self.dq_warps, self.dq_stages]

    @classmethod
    def from_list(cls, values) -> "TileConfig":
        return cls(*[int(v) for v in values])


# (arch, head_dim) -> config for 16-bit inputs. The register budget decides: the forward holds an
# fp32 (BLOCK_M, D) accumulator with Q; dK/dV two fp32 (BLOCK_N, D) accumulators with K and V,
# so it takes few query rows per step (BLOCK_M = 32); dQ one (BLOCK_M, D) accumulator with Q and
# dO, so few keys per step (BLOCK_N = 32), as in FlashAttention-2. Every entry compiles with zero
# spills on sm_80 and sm_90a (tests/test_attention_triton_aot.py, figures in the bench report);
# large head dims take smaller tiles, more warps and no software pipelining to stay spill-free.
_SMALL_D = dict(fwd_block_m=128, fwd_block_n=64, fwd_warps=8, fwd_stages=2, dkdv_block_m=32,
                dkdv_block_n=64, dkdv_warps=4, dkdv_stages=2, dq_block_m=64, dq_block_n=32,
                dq_warps=4, dq_stages=2)
_MEDIUM_D = dict(_SMALL_D, fwd_stages=1, dkdv_warps=8, dq_warps=8)
_LARGE_D = dict(fwd_block_m=64, fwd_block_n=32, fwd_warps=8, fwd_stages=1, dkdv_block_m=32,
                dkdv_block_n=32, dkdv_warps=8, dkdv_stages=1, dq_block_m=16, dq_block_n=32,
                dq_warps=4, dq_stages=1)
# sm_90: measured on an H100 (scripts/tune_attention_gpu.py, bf16, the 16k-token Transfusion layout
# of the attention bench, one kernel varied at a time): 64-row forward tiles with 4 warps and a
# 3-stage pipeline beat 128-row ones at D = 64 (fewer partial tiles per row, more programs);
# square 64 x 64 backward tiles at D = 64. At D >= 96 the 64-row forward spills in fp16, so it takes
# 128 x 64 with 8 warps (0.416 against 0.410 ms at D = 128, bf16); dK/dV keeps 32 query rows per
# step (64 spills). Since dQ also computes delta, its 64 x 64 / 4-warp tile spills at D = 128: it
# takes 128 x 64 with 8 warps and 3 stages, the fastest in a whole-backward sweep at 4k tokens
# (0.329 ms, against 0.362 for 64 x 64 / 4 warps and 0.527 for 64 x 64 / 8 warps). D = 96 (padded
# to 128) keeps a 64 x 32 dQ.
_SM90_D64 = dict(fwd_block_m=64, fwd_block_n=64, fwd_warps=4, fwd_stages=3, dkdv_block_m=64,
                 dkdv_block_n=64, dkdv_warps=4, dkdv_stages=2, dq_block_m=64, dq_block_n=64,
                 dq_warps=4, dq_stages=2)
_SM90_D128 = dict(_SM90_D64, fwd_block_m=128, fwd_warps=8, dkdv_block_m=32, dq_block_m=128,
                  dq_warps=8, dq_stages=3)
_SM90 = {
    "small": _SM90_D64,
    "medium": dict(_SM90_D128, dq_block_m=64, dq_block_n=32, dq_warps=4, dq_stages=2),
    "d128": _SM90_D128,
    "large": dict(_LARGE_D, fwd_block_m=32, dkdv_warps=8, dq_warps=8),
}
_SM80 = {"small": _SMALL_D, "medium": _MEDIUM_D, "d128": _MEDIUM_D, "large": _LARGE_D}
_HALF_CONFIGS = {
    (arch, dim): TileConfig(**table[size])
    for arch, table in ((80, _SM80), (90, _SM90))
    for dim, size in ((16, "small"), (32, "small"), (64, "small"), (96, "medium"),
                      (128, "d128"), (256, "large"))
}
# fp32 inputs use IEEE fp32 dots (no tensor cores, no TF32 rounding): the exact-math path. Its
# FMA-based dot needs far more registers per tile than mma, hence small tiles (spill-free on
# sm_80 and sm_90a, checked with the same AOT compile, not part of aot_specs()).
_FP32_CONFIGS = {
    "small": TileConfig(32, 32, 8, 1, 16, 32, 4, 1, 32, 16, 4, 1),
    "medium": TileConfig(32, 16, 8, 1, 16, 16, 4, 1, 32, 16, 8, 1),
    "large": TileConfig(16, 16, 8, 1, 16, 16, 8, 1, 16, 16, 8, 1),
}

_forced_config: TileConfig | None = None


# torch.compile: the answer is a trace-time constant (dynamo would otherwise put the query in the
# graph or break it); the device of a traced tensor cannot change without a recompile.
@torch._dynamo.assume_constant_result
def _gpu_arch(device: torch.device) -> int:
    """80 (Ampere-class) or 90 (Hopper and newer); the interpreter plans as for sm_80."""
    if device.type != "cuda":
        return 80
    major, _ = torch.cuda.get_device_capability(device)
    return 90 if major >= 9 else 80


def tile_config(head_dim: int, dtype: torch.dtype, arch: int = 80) -> TileConfig:
    """The shipped tile sizes for ``head_dim``, ``dtype`` and GPU generation ``arch`` (80 or 90).

    :func:`forced_tile_sizes` overrides it (tests use tiny tiles to exercise many tiles).
    """
    if _forced_config is not None:
        return _forced_config
    if dtype == torch.float32:
        return _FP32_CONFIGS["small" if head_dim <= 64 else "medium" if head_dim <= 128 else "large"]
    key = (90 if arch >= 90 else 80, int(head_dim))
    if key not in _HALF_CONFIGS or dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"no Triton attention config for head_dim={head_dim}, dtype={dtype}, "
                         f"arch=sm_{arch}")
    return _HALF_CONFIGS[key]


@contextlib.contextmanager
def forced_tile_sizes(block_m: int, block_n: int, num_warps: int = 4, num_stages: int = 1):
    """Every kernel uses ``block_m`` × ``block_n`` tiles inside the block (for tests)."""
    global _forced_config
    for name, value in (("block_m", block_m), ("block_n", block_n)):
        if not isinstance(value, int) or value < 16 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two >= 16 (tl.dot minimum), got {value!r}")
    previous = _forced_config
    _forced_config = TileConfig(*[block_m, block_n, num_warps, num_stages] * 3)
    try:
        yield _forced_config
    finally:
        _forced_config = previous


# ================================================================================== launchers
# Host arithmetic in plain Python: triton.cdiv / next_power_of_2 are constexpr functions whose host
# calls cost ~2 µs each, and these launchers are on the critical path of every small layer.
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _specialization(arg) -> tuple:
    """What Triton specializes a kernel on, for one argument, or finer: a tensor's dtype and
    16-byte alignment; an int's being 1, a multiple of 16, and its width (i32 / i64 / u64)."""
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() % 16 == 0
    if isinstance(arg, int):
        width = 32 if -2**31 <= arg < 2**31 else 64 if arg < 2**63 else 65
        return arg == 1, arg % 16 == 0, width
    return (type(arg),)


class _Launcher:
    """``kernel[grid](*args, **constexprs)`` without Triton's argument binding on every call.

    ``JITFunction.run`` binds and specializes every argument (about 30 here) and rebuilds the cache
    key before each launch: ~50 µs of host time per launch on an H100 machine's CPU, longer than
    the kernels of a 2k-token layer. The CompiledKernel it returns launches directly
    (``compiled[grid](*args)``); one is kept per specialization key, a key at least as fine as
    Triton's own (:func:`_specialization`, the constexprs, warps, stages and the current device),
    so no call runs a binary compiled for other argument properties. The first call of each key,
    and every call under TRITON_INTERPRET (nothing compiled), goes through the JIT.
    """

    def __init__(self, kernel):
        self.kernel = kernel
        self.compiled: dict[tuple, tuple] = {}

    def __call__(self, grid: tuple, *args, num_warps: int, num_stages: int, **constexprs):
        key = (torch.cuda.current_device() if torch.cuda.is_initialized() else -1, num_warps,
               num_stages, *constexprs.items(), *map(_specialization, args))
        hit = self.compiled.get(key)
        if hit is not None:
            compiled, constexpr_values = hit
            compiled[(*grid, 1, 1)[:3]](*args, *constexpr_values)    # it takes a 3-D grid
            return
        compiled = self.kernel[grid](*args, num_warps=num_warps, num_stages=num_stages,
                                     **constexprs)
        if isinstance(compiled, CompiledKernel):
            # the launcher takes every parameter in order; the constexprs come last in our kernels
            names = self.kernel.arg_names[len(args):]
            if sorted(names) != sorted(constexprs):
                raise RuntimeError(f"{self.kernel.fn.__name__}: constexprs {sorted(constexprs)} "
                                   f"are not its trailing parameters {names}")
            self.compiled[key] = compiled, tuple(constexprs[name] for name in names)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get IEEE products: the fp32 path must match the reference to fp32 accuracy.
    return "ieee" if dtype == torch.float32 else "tf32"


def _row_walk(table: TileTable) -> tuple[torch.Tensor, ...]:
    """What a kernel over row tiles reads: key-tile ranges and the longest-first tile order."""
    return table.kv_lo, table.kv_hi, table.kv_full_lo, table.kv_full_hi, table.m_order


def _column_walk(table: TileTable) -> tuple[torch.Tensor, ...]:
    """What a kernel over key tiles reads: query-tile ranges and the longest-first tile order."""
    return table.q_lo, table.q_hi, table.q_full_lo, table.q_full_hi, table.n_order


_launch_fwd, _launch_dq, _launch_dkdv = map(_Launcher, (_attn_fwd, _attn_bwd_dq, _attn_bwd_dkdv))


def _launch_forward(q, k, v, kv_start, kv_end, kv_lo, kv_hi, kv_full_lo, kv_full_hi, m_order,
                    scale: float, config: TileConfig, work: torch.Tensor | None = None):
    n_queries, hq, head_dim = q.shape
    n_keys, hkv = k.shape[0], k.shape[1]
    o = torch.empty((n_queries, hq, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((hq, n_queries), dtype=torch.float32, device=q.device)
    grid = (_cdiv(n_queries, config.fwd_block_m), hq)
    _launch_fwd(
        grid, q, k, v, o, lse, kv_start, kv_end, kv_lo, kv_hi, kv_full_lo, kv_full_hi, m_order,
        kv_start if work is None else work,   # never written unless COUNT_WORK
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        o.stride(0), o.stride(1), n_queries, n_keys, scale * _LOG2E,
        GROUP=hq // hkv, HEAD_DIM=head_dim, BLOCK_D=_next_power_of_2(head_dim),
        BLOCK_M=config.fwd_block_m, BLOCK_N=config.fwd_block_n,
        DOT_PRECISION=_dot_precision(q.dtype), COUNT_WORK=work is not None,
        num_warps=config.fwd_warps, num_stages=config.fwd_stages)
    return o, lse


def _launch_backward(do, dlse, q, k, v, o, lse, kv_start, kv_end, q_lo, q_hi, q_full_lo,
                     q_full_hi, n_order, kv_lo, kv_hi, kv_full_lo, kv_full_hi, m_order,
                     scale: float, config: TileConfig, work_dkdv: torch.Tensor | None = None,
                     work_dq: torch.Tensor | None = None):
    n_queries, hq, head_dim = q.shape
    n_keys, hkv = k.shape[0], k.shape[1]
    if do.stride(-1) != 1:       # e.g. the expanded gradient of a .sum()
        do = do.contiguous()
    if dlse is not None:
        dlse = dlse.contiguous()
    common = dict(GROUP=hq // hkv, HEAD_DIM=head_dim, BLOCK_D=_next_power_of_2(head_dim),
                  DOT_PRECISION=_dot_precision(q.dtype))

    # -- dQ and delta = rowsum(dO * O) - dLSE: one program per (row tile, query head)
    delta = torch.empty((hq, n_queries), dtype=torch.float32, device=q.device)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    _launch_dq(
        (_cdiv(n_queries, config.dq_block_m), hq), q, k, v, o, do, lse,
        delta if dlse is None else dlse, delta, dq, kv_start, kv_end, kv_lo, kv_hi, kv_full_lo,
        kv_full_hi, m_order, kv_start if work_dq is None else work_dq,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        o.stride(0), o.stride(1), do.stride(0), do.stride(1), dq.stride(0), dq.stride(1),
        n_queries, n_keys, scale * _LOG2E, scale,
        BLOCK_M=config.dq_block_m, BLOCK_N=config.dq_block_n, HAS_DLSE=dlse is not None,
        COUNT_WORK=work_dq is not None, num_warps=config.dq_warps, num_stages=config.dq_stages,
        **common)
    # -- dK, dV (reads the delta written above): one program per (key tile, kv head)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    _launch_dkdv(
        (_cdiv(n_keys, config.dkdv_block_n), hkv), q, k, v, do, lse, delta, dk, dv, kv_start,
        kv_end, q_lo, q_hi, q_full_lo, q_full_hi, n_order,
        kv_start if work_dkdv is None else work_dkdv,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        do.stride(0), do.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        n_queries, n_keys, scale * _LOG2E, scale,
        BLOCK_M=config.dkdv_block_m, BLOCK_N=config.dkdv_block_n,
        COUNT_WORK=work_dkdv is not None, num_warps=config.dkdv_warps,
        num_stages=config.dkdv_stages, **common)
    return dq, dk, dv


# ================================================================================== custom ops
# The forward and the backward, each registered as an opaque op so that torch.compile traces
# around the kernels, joined by an autograd.Function. Eager calls run the plain functions: going
# through the op (the dispatcher, the library's Python kernel wrapper) costs ~30 µs of host time
# per op here, and at small sizes the GPU waits for the host. The Function rather than
# ``register_autograd`` for the same reason: the library's autograd wrapper re-reads the op schema
# for every argument on each call.
def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_start: torch.Tensor,
                   kv_end: torch.Tensor, kv_lo: torch.Tensor, kv_hi: torch.Tensor,
                   kv_full_lo: torch.Tensor, kv_full_hi: torch.Tensor, m_order: torch.Tensor,
                   scale: float, tiles: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward: (o, lse)."""
    return _launch_forward(q, k, v, kv_start, kv_end, kv_lo, kv_hi, kv_full_lo, kv_full_hi,
                           m_order, scale, _config_of(tiles))


_attention_fwd_op = torch.library.custom_op("transfusion_fast::triton_attention_fwd",
                                            mutates_args=())(_attention_fwd)


@_attention_fwd_op.register_fake
def _(q, k, v, kv_start, kv_end, kv_lo, kv_hi, kv_full_lo, kv_full_hi, m_order, scale, tiles):
    return (q.new_empty(q.shape),
            q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32))


def _attention_bwd(do: torch.Tensor, dlse: torch.Tensor | None, q: torch.Tensor,
                   k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                   kv_start: torch.Tensor, kv_end: torch.Tensor, q_lo: torch.Tensor,
                   q_hi: torch.Tensor, q_full_lo: torch.Tensor, q_full_hi: torch.Tensor,
                   n_order: torch.Tensor, kv_lo: torch.Tensor, kv_hi: torch.Tensor,
                   kv_full_lo: torch.Tensor, kv_full_hi: torch.Tensor, m_order: torch.Tensor,
                   scale: float, tiles: list[int]
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: (dq, dk, dv) from dO and, when the lse is used, dLSE."""
    return _launch_backward(do, dlse, q, k, v, o, lse, kv_start, kv_end, q_lo, q_hi, q_full_lo,
                            q_full_hi, n_order, kv_lo, kv_hi, kv_full_lo, kv_full_hi, m_order,
                            scale, _config_of(tiles))


_attention_bwd_op = torch.library.custom_op("transfusion_fast::triton_attention_bwd",
                                            mutates_args=())(_attention_bwd)


@_attention_bwd_op.register_fake
def _(do, dlse, q, k, v, o, lse, kv_start, kv_end, q_lo, q_hi, q_full_lo, q_full_hi, n_order,
      kv_lo, kv_hi, kv_full_lo, kv_full_hi, m_order, scale, tiles):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@functools.lru_cache(maxsize=None)
def _config_from_tuple(values: tuple) -> TileConfig:
    return TileConfig.from_list(values)


def _config_of(tiles: list[int]) -> TileConfig:
    return _config_from_tuple(tuple(tiles))


class _TritonAttention(torch.autograd.Function):
    """o, lse = attention(q, k, v); the dK/dV and dQ tile tables ride along for the backward."""

    @staticmethod
    def forward(ctx, q, k, v, kv_start, kv_end, fwd: TileTable, dkdv: TileTable, dq: TileTable,
                scale: float, tiles: list[int]):
        forward = _attention_fwd_op if torch.compiler.is_compiling() else _attention_fwd
        o, lse = forward(q, k, v, kv_start, kv_end, *_row_walk(fwd), scale, tiles)
        ctx.save_for_backward(q, k, v, o, lse, kv_start, kv_end, *_column_walk(dkdv),
                              *_row_walk(dq))
        ctx.scale, ctx.tiles = scale, tiles
        # an unused output's gradient stays None: no zero-filled dLSE is read by the kernels
        ctx.set_materialize_grads(False)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse, *tables = ctx.saved_tensors
        if do is None:
            do = torch.zeros_like(o)
        backward = _attention_bwd_op if torch.compiler.is_compiling() else _attention_bwd
        dq, dk, dv = backward(do, dlse, q, k, v, o, lse, *tables, ctx.scale, ctx.tiles)
        return dq, dk, dv, None, None, None, None, None, None, None


# ================================================================================== public
def _check_kernel_inputs(q: torch.Tensor, k: torch.Tensor, layout: Layout) -> None:
    """What the Triton path needs beyond :func:`transfusion_fast.ops.check_attention_inputs`."""
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"triton attention supports dtypes {SUPPORTED_DTYPES}, got {q.dtype} "
                         f"(use the reference backend for float64)")
    for name, t in (("q", q), ("k", k)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have unit stride on head_dim, got strides {t.stride()}")
    if layout.device != q.device:
        raise ValueError(f"layout is on {layout.device} but q is on {q.device}: the kernels read "
                         f"the tile tables in place (call layout.to(q.device))")


def _tables(layout: Layout, config: TileConfig) -> tuple[TileTable, TileTable, TileTable]:
    return (layout.tile_table(config.fwd_block_m, config.fwd_block_n),
            layout.tile_table(config.dkdv_block_m, config.dkdv_block_n),
            layout.tile_table(config.dq_block_m, config.dq_block_n))


def triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention with the Triton kernels; differentiable w.r.t. q, k, v.

    Inputs are validated by :func:`transfusion_fast.ops.attention.check_attention_inputs` (call
    :func:`transfusion_fast.ops.attention` for the validated entry point). Returns ``o``
    ``(Tq, Hq, D)`` in q's dtype and ``lse`` ``(Hq, Tq)`` float32; both have gradients.
    """
    _check_kernel_inputs(q, k, layout)
    config = tile_config(q.shape[2], q.dtype, _gpu_arch(q.device))
    fwd, dkdv, dq = _tables(layout, config)
    return _TritonAttention.apply(q, k, v, layout.kv_start, layout.kv_end, fwd, dkdv, dq,
                                  float(scale), config.as_list())


def count_computed_tiles(layout: Layout, head_dim: int = 16, num_q_heads: int = 2,
                         num_kv_heads: int = 1, dtype: torch.dtype = torch.float16,
                         device=None) -> dict:
    """Run the forward, dK/dV and dQ kernels in work-counting mode on random inputs.

    Each program writes how many tiles it computed (per query head) and how many of them took
    the path without mask arithmetic. Returns, per kernel, ``{"computed": tiles computed,
    "unmasked": of which without mask arithmetic, "minimal": layout.tile_counts(...)["computed"]
    × num_q_heads, "block": (block_m, block_n)}``: a block-sparse schedule without waste has
    ``computed == minimal``; ``unmasked`` is every full tile except those cut by the end of the
    sequence (the ragged last tile needs load bounds).
    """
    device = layout.device if device is None else torch.device(device)
    layout = layout if layout.device == device else layout.to(device)
    config = tile_config(head_dim, dtype, _gpu_arch(device))
    fwd, dkdv, dq = _tables(layout, config)
    gen = torch.Generator().manual_seed(0)
    make = lambda t, h: torch.randn(t, h, head_dim, generator=gen).to(device, dtype)  # noqa: E731
    q = make(layout.num_queries, num_q_heads)
    k, v = make(layout.num_keys, num_kv_heads), make(layout.num_keys, num_kv_heads)
    scale = head_dim ** -0.5
    # (all tiles | unmasked tiles, heads of the grid, tiles of the grid): one slot per program
    work = {"fwd": torch.zeros(2, num_q_heads, fwd.num_m_tiles, dtype=torch.int32, device=device),
            "dkdv": torch.zeros(2, num_kv_heads, dkdv.num_n_tiles, dtype=torch.int32,
                                device=device),
            "dq": torch.zeros(2, num_q_heads, dq.num_m_tiles, dtype=torch.int32, device=device)}
    o, lse = _launch_forward(q, k, v, layout.kv_start, layout.kv_end, *_row_walk(fwd), scale,
                             config, work["fwd"])
    _launch_backward(torch.randn(o.shape, generator=gen).to(device, dtype), None, q, k, v, o, lse,
                     layout.kv_start, layout.kv_end, *_column_walk(dkdv), *_row_walk(dq), scale,
                     config, work["dkdv"], work["dq"])
    return {name: {"computed": int(work[name][0].sum()), "unmasked": int(work[name][1].sum()),
                   "minimal": table.counts()["computed"] * num_q_heads,
                   "block": (table.block_m, table.block_n)}
            for name, table in (("fwd", fwd), ("dkdv", dkdv), ("dq", dq))}


# ================================================================================== AOT specs
_KERNELS = {"fwd": _attn_fwd, "dkdv": _attn_bwd_dkdv, "dq": _attn_bwd_dq}
_AOT_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16"}


def _signature(kernel, data_type: str, constexprs: dict) -> dict:
    """Triton signature of ``kernel``: tensors of the input dtype, fp32 statistics, int32 tables."""
    import inspect
    signature = {}
    for name in inspect.signature(kernel.fn).parameters:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV"):
            signature[name] = f"*{data_type}"
        elif name in ("LSE", "DELTA", "DLSE"):
            signature[name] = "*fp32"
        elif name.isupper():
            signature[name] = "*i32"
        elif name in ("qk_scale_log2", "scale"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature


def _divisible_by_16(signature: dict) -> tuple:
    """What the JIT specializes as multiples of 16 for packed inputs: every tensor pointer (torch
    allocations are 16-byte aligned) and every stride (each supported head_dim is a multiple of
    16, hence so are the token and head strides of packed and fused-qkv tensors)."""
    return tuple(name for name, kind in signature.items()
                 if kind.startswith("*") or name.startswith("stride_"))


def aot_specs(arch: int | None = None) -> list:
    """Every shipped kernel config as a :class:`transfusion_fast.aot.KernelSpec`, labelled.

    One spec per (kernel in fwd / dkdv / dq, head_dim, fp16 | bf16, arch); the
    label ends in ``@sm80`` / ``@sm90``: compile each spec for its own arch, e.g.
    ``compile_report(aot_specs(90), archs=(90,))``. ``arch=None`` returns both generations.
    """
    from transfusion_fast.aot import KernelSpec
    from transfusion_fast.ops.attention import SUPPORTED_HEAD_DIMS

    specs = []
    for gen in ((80, 90) if arch is None else (arch,)):
        for head_dim in SUPPORTED_HEAD_DIMS:
            for dtype, data_type in _AOT_DTYPES.items():
                config = _HALF_CONFIGS[(gen, head_dim)]
                attn = dict(HEAD_DIM=head_dim, BLOCK_D=_next_power_of_2(head_dim), GROUP=1,
                            DOT_PRECISION=_dot_precision(dtype), COUNT_WORK=False)
                kernels = {
                    "fwd": (dict(attn, BLOCK_M=config.fwd_block_m, BLOCK_N=config.fwd_block_n),
                            config.fwd_warps, config.fwd_stages),
                    "dkdv": (dict(attn, BLOCK_M=config.dkdv_block_m, BLOCK_N=config.dkdv_block_n),
                             config.dkdv_warps, config.dkdv_stages),
                    "dq": (dict(attn, BLOCK_M=config.dq_block_m, BLOCK_N=config.dq_block_n,
                                HAS_DLSE=False),
                           config.dq_warps, config.dq_stages),
                }
                for name, (constexprs, warps, stages) in kernels.items():
                    kernel = _KERNELS[name]
                    blocks = f" {constexprs['BLOCK_M']}x{constexprs['BLOCK_N']}"
                    signature = _signature(kernel, data_type, constexprs)
                    specs.append(KernelSpec(
                        module=__name__, kernel=kernel.fn.__name__,
                        signature=signature, constexprs=constexprs,
                        num_warps=warps, num_stages=stages,
                        divisible_by_16=_divisible_by_16(signature),
                        label=f"{name} d{head_dim} {data_type}{blocks} w{warps}s{stages} @sm{gen}"))
    return specs
