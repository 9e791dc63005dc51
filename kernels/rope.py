"""Fused rotary position embedding of q and k in Triton: one launch, forward = backward kernel.

One program per token rotates every head of q and then every head of k (their head counts may
differ), in blocks of heads, on packed ``(T, H, D)`` tensors of any token/head/dim strides, in place
or into new tensors. Positions are read per token (int32 or int64), so packed documents restart at
0 and axial image tokens take (row, column) positions; both pair conventions (rotate-half pairs
``(i, i + D/2)``, interleaved pairs ``(2i, 2i + 1)``) are a constexpr switch. The backward of a
rotation is the inverse rotation: the same kernel with ``sin`` negated (``sin_sign = -1``; a
runtime argument, not a constexpr: one multiply per pair and token, and one binary for both ways).

DRAM traffic per element of q and k (s = element size): read once and written once, ``2s``, in both
directions; positions and the frequency table are O(T + D).

cos/sin: computed in float32 inside the kernel, not read from a cached ``(max_position, D/2)`` table.
The kernel is memory-bound and the trig runs on the otherwise idle special-function units, once per
(token, pair) and reused by all ``Hq + Hk`` heads of the token; a table would add ``D · 4`` bytes of
reads per token, cap the position range at the table size, need a second table for the axial
convention, and have to be invalidated when theta or head_dim changes. What the kernel does read is
the tiny ``(2, D/2)`` inverse-frequency table (1-D row, axial row) built in float64 by
:func:`transfusion_fast.ops.rope.rope_inv_freq`: computing ``theta^(-2i/D)`` in float32 in-kernel
(``exp2``) carries about an order of magnitude more relative error than the float64 table rounded
once, and the angles would no longer match the reference path's. The angle is then ``float32(position) · inv_freq``
in float32, exactly as the reference path computes it.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from transfusion_fast.aot import TRITON_DTYPES, KernelSpec, kernel_signature

__all__ = ["apply_rope", "apply_rope_", "aot_specs", "block_config"]


@triton.jit
def _rotate_heads(X, OUT, token, stride_xt, stride_xh, stride_xd, stride_ot, stride_oh, stride_od,
                  n_heads, cos, sin, first, second, pair_mask, BLOCK_H: tl.constexpr):
    """Rotate the pairs ``(first, second)`` of every head of one token: loads precede stores, so
    ``OUT`` may be ``X`` (in place)."""
    heads = tl.arange(0, BLOCK_H)
    x_token = X + token * stride_xt
    o_token = OUT + token * stride_ot
    for head_start in range(0, n_heads, BLOCK_H):
        head = (head_start + heads).to(tl.int64)
        mask = (head < n_heads)[:, None] & pair_mask[None, :]
        x_rows = x_token + head[:, None] * stride_xh
        o_rows = o_token + head[:, None] * stride_oh
        x1 = tl.load(x_rows + first[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_rows + second[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
        out1 = x1 * cos[None, :] - x2 * sin[None, :]
        out2 = x2 * cos[None, :] + x1 * sin[None, :]
        tl.store(o_rows + first[None, :] * stride_od, out1.to(OUT.dtype.element_ty), mask=mask)
        tl.store(o_rows + second[None, :] * stride_od, out2.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(Q, K, Q_OUT, K_OUT, POSITIONS, AXIAL, INV_FREQ,
                 stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd,
                 stride_qot, stride_qoh, stride_qod, stride_kot, stride_koh, stride_kod,
                 stride_pos_t, stride_pos_axis, n_q_heads, n_k_heads, sin_sign,
                 HALF: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr,
                 IS_AXIAL: tl.constexpr, INTERLEAVED: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    pairs = tl.arange(0, BLOCK_P)
    pair_mask = pairs < HALF
    position = tl.load(POSITIONS + token * stride_pos_t)
    if IS_AXIAL:
        axial = tl.load(AXIAL + token) != 0
        column = tl.load(POSITIONS + token * stride_pos_t + stride_pos_axis)
        # Axial tokens: first half of the pairs by row, second half by column (module docstring of
        # transfusion_fast.ops.rope); row 1 of INV_FREQ holds the D/2-dim frequencies twice.
        pair_position = tl.where(axial & (pairs >= HALF // 2), column, position)
        inv_freq = tl.load(INV_FREQ + axial.to(tl.int32) * HALF + pairs, mask=pair_mask, other=0.0)
    else:
        pair_position = tl.zeros([BLOCK_P], dtype=position.dtype) + position
        inv_freq = tl.load(INV_FREQ + pairs, mask=pair_mask, other=0.0)
    angle = pair_position.to(tl.float32) * inv_freq
    cos = tl.cos(angle)
    sin = tl.sin(angle) * sin_sign
    if INTERLEAVED:
        first = 2 * pairs
        second = first + 1
    else:
        first = pairs
        second = pairs + HALF
    _rotate_heads(Q, Q_OUT, token, stride_qt, stride_qh, stride_qd, stride_qot, stride_qoh, stride_qod,
                  n_q_heads, cos, sin, first, second, pair_mask, BLOCK_H)
    _rotate_heads(K, K_OUT, token, stride_kt, stride_kh, stride_kd, stride_kot, stride_koh, stride_kod,
                  n_k_heads, cos, sin, first, second, pair_mask, BLOCK_H)


#: Pairs rotated per loop step of a program (BLOCK_H × BLOCK_P): 1024 pairs = 2048 elements over
#: 4 warps, 16 per thread, enough loads in flight without pressuring registers.
PAIRS_PER_STEP = 1024
NUM_WARPS = 4


def block_config(head_dim: int, max_heads: int) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_H) for ``head_dim`` and the larger of the q/k head counts."""
    block_p = triton.next_power_of_2(head_dim // 2)
    block_h = max(1, min(triton.next_power_of_2(max(max_heads, 1)), PAIRS_PER_STEP // block_p))
    return block_p, block_h


def _launch(q, k, q_out, k_out, positions, axial, inv_freq, interleaved: bool, inverse: bool) -> None:
    num_tokens, _, head_dim = q.shape
    if num_tokens == 0:
        return
    block_p, block_h = block_config(head_dim, max(q.shape[1], k.shape[1]))
    is_axial = axial is not None
    # bool and uint8 share a byte layout: a free reinterpretation the kernel loads as u8 (unit stride).
    axial_bytes = axial.contiguous().view(torch.uint8) if is_axial else positions
    stride_axis = positions.stride(1) if is_axial else 0
    _rope_kernel[(num_tokens,)](
        q, k, q_out, k_out, positions, axial_bytes, inv_freq,
        *q.stride(), *k.stride(), *q_out.stride(), *k_out.stride(), positions.stride(0), stride_axis,
        q.shape[1], k.shape[1], -1.0 if inverse else 1.0, HALF=head_dim // 2, BLOCK_P=block_p,
        BLOCK_H=block_h, IS_AXIAL=is_axial, INTERLEAVED=interleaved, num_warps=NUM_WARPS)


def _empty_packed(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


@torch.library.custom_op("transfusion_fast::rope", mutates_args=())
def _rope_op(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, axial: Optional[torch.Tensor],
             inv_freq: torch.Tensor, interleaved: bool, inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    q_out, k_out = _empty_packed(q), _empty_packed(k)
    _launch(q, k, q_out, k_out, positions, axial, inv_freq, interleaved, inverse)
    return q_out, k_out


@torch.library.custom_op("transfusion_fast::rope_", mutates_args=("q", "k"))
def _rope_inplace_op(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, axial: Optional[torch.Tensor],
                     inv_freq: torch.Tensor, interleaved: bool) -> None:
    _launch(q, k, q, k, positions, axial, inv_freq, interleaved, False)


@_rope_op.register_fake
def _(q, k, positions, axial, inv_freq, interleaved, inverse):
    return q.new_empty(q.shape), k.new_empty(k.shape)


@_rope_inplace_op.register_fake
def _(q, k, positions, axial, inv_freq, interleaved):
    return None


def _rope_setup(ctx, inputs, output):
    _, _, positions, axial, inv_freq, interleaved, inverse = inputs
    ctx.save_for_backward(positions, axial, inv_freq)
    ctx.interleaved, ctx.inverse = interleaved, inverse


def _rope_grad(ctx, dq_out, dk_out):
    positions, axial, inv_freq = ctx.saved_tensors
    dq, dk = torch.ops.transfusion_fast.rope(dq_out, dk_out, positions, axial, inv_freq, ctx.interleaved,
                                             not ctx.inverse)
    return dq, dk, None, None, None, None, None


_rope_op.register_autograd(_rope_grad, setup_context=_rope_setup)


def apply_rope(q, k, positions, inv_freq, *, axial=None, interleaved=False):
    """Rotated copies ``(q_rot, k_rot)`` of validated inputs, with autograd.

    ``inv_freq``: the ``(2, D/2)`` float32 table of :func:`transfusion_fast.ops.rope.rope_inv_freq`.
    """
    return torch.ops.transfusion_fast.rope(q, k, positions, axial, inv_freq, interleaved, False)


def apply_rope_(q, k, positions, inv_freq, *, axial=None, interleaved=False):
    """Rotate validated q and k in place (no autograd: for inference, e.g. a KV cache); returns them."""
    torch.ops.transfusion_fast.rope_(q, k, positions, axial, inv_freq, interleaved)
    return q, k


#: Head dims of the shipped configs (the models of this package use 64 and 128).
AOT_HEAD_DIMS = (64, 128)
#: the parameters that are not tensors of the input dtype or int32 sizes and strides
_AOT_TYPES = {"POSITIONS": "*i64", "AXIAL": "*u8", "INV_FREQ": "*fp32", "sin_sign": "fp32"}


def _spec(ty: str, head_dim: int, axial: bool, interleaved: bool) -> KernelSpec:
    block_p, block_h = block_config(head_dim, PAIRS_PER_STEP)   # the widest head block of head_dim
    constexprs = {"HALF": head_dim // 2, "BLOCK_P": block_p, "BLOCK_H": block_h, "IS_AXIAL": axial,
                  "INTERLEAVED": interleaved}
    label = f"rope_fwd+bwd {ty} D={head_dim}{' axial' if axial else ''}{' interleaved' if interleaved else ''}"
    return KernelSpec(_rope_kernel.fn.__module__, _rope_kernel.fn.__name__,
                      kernel_signature(_rope_kernel, constexprs, ty, _AOT_TYPES), constexprs,
                      num_warps=NUM_WARPS, num_stages=1, label=label)


def aot_specs() -> list[KernelSpec]:
    """Every shipped config (one binary serves forward and backward): per dtype and head_dim, plus the
    axial and interleaved variants (the constexprs that change the generated code) at head_dim 128."""
    specs = [_spec(ty, d, False, False) for ty in TRITON_DTYPES.values() for d in AOT_HEAD_DIMS]
    specs += [_spec(ty, 128, axial, interleaved) for ty in TRITON_DTYPES.values()
              for axial, interleaved in ((True, False), (False, True), (True, True))]
    return specs
