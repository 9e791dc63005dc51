"""Cross-entropy rows of a logits chunk in Triton: loss, log-sum-exp and, in place, d(loss)/d(logits).

The fused linear + cross-entropy (:mod:`transfusion_fast.ops.linear_cross_entropy`) never holds the
``(rows, vocab)`` logits: it walks the rows in chunks, computes a chunk's logits with one matmul
(cuBLAS), hands them to :func:`launch_rows`, and multiplies the gradient this kernel leaves in the
chunk's buffer by the weight (the hidden gradient) and by the hidden chunk (the weight gradient).
The chunk loop is shared with the CPU path and lives there; this file is the part that is a kernel.

One program per row of the chunk, two passes over the vocabulary in blocks of ``BLOCK_N`` columns:

1. online log-sum-exp: a running maximum ``m`` and a running ``s = Σ exp(x − m)`` rescaled when
   the maximum grows (one ``exp`` per element), and ``Σ x`` for label smoothing; then
   ``lse = m + log s`` and, with ``t`` the target, ``ε`` the label smoothing, ``V`` the vocabulary
   and ``z`` the z-loss coefficient,

       loss = lse − (1 − ε)·x_t − (ε / V)·Σ_j x_j + z·lse²

   (the label-smoothed cross-entropy of ``F.cross_entropy`` plus the z-loss of PaLM);
2. with ``COMPUTE_GRAD``, the gradient of ``scale·loss``, written over the logits:

       dx_j = scale·((1 + 2z·lse)·softmax(x)_j − ε / V − (1 − ε)·[j = t])

``scale`` is read per row (``stride_scale = 1``: the incoming gradient of an unreduced loss) or
once for all rows (``stride_scale = 0``: ``1 / #targets`` of a mean, 1 of a sum). A row whose
target is ``ignore_index`` gets loss 0, lse 0 and a zero gradient row, and reads no logits.

Everything is computed in float32; the logits are read in their dtype (the matmul's output dtype:
fp16, bf16 or fp32) and the gradient is written back in it. DRAM traffic per logit: two reads and,
with the gradient, one write.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from transfusion_fast.aot import TRITON_DTYPES, KernelSpec, kernel_signature

__all__ = ["launch_rows", "aot_specs", "SUPPORTED_DTYPES", "MAX_BLOCK_N"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

#: Widest block of columns per loop step: 4096 fp32 values over 8 warps are 16 per thread, enough
#: in flight to stream the row at full bandwidth, few enough registers to leave the row loop unspilled.
MAX_BLOCK_N = 4096


@triton.jit
def _lce_rows_kernel(LOGITS, TARGETS, SCALE, LOSS, LSE, stride_logits, stride_scale, n_cols,
                     ignore_index, label_smoothing, z_loss,
                     COMPUTE_GRAD: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    logits = LOGITS + row * stride_logits
    cols = tl.arange(0, BLOCK_N)
    target = tl.load(TARGETS + row).to(tl.int64)
    if target == ignore_index:
        tl.store(LOSS + row, 0.0)
        tl.store(LSE + row, 0.0)
        if COMPUTE_GRAD:
            zeros = tl.zeros([BLOCK_N], dtype=LOGITS.dtype.element_ty)
            for start in range(0, n_cols, BLOCK_N):
                tl.store(logits + start + cols, zeros, mask=start + cols < n_cols)
        return

    # Pass 1: online log-sum-exp over the row (and the sum of the logits for label smoothing).
    m = -float("inf")
    s = 0.0
    sum_x = 0.0
    for start in range(0, n_cols, BLOCK_N):
        mask = start + cols < n_cols
        x = tl.load(logits + start + cols, mask=mask, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        sum_x += tl.sum(tl.where(mask, x, 0.0), axis=0)
        m = m_new
    lse = m + tl.log(s)
    x_target = tl.load(logits + target).to(tl.float32)
    smooth = label_smoothing / n_cols
    loss = lse - (1.0 - label_smoothing) * x_target - smooth * sum_x + z_loss * lse * lse
    tl.store(LOSS + row, loss)
    tl.store(LSE + row, lse)

    # Pass 2: the gradient of scale * loss, over the logits it was computed from.
    if COMPUTE_GRAD:
        scale = tl.load(SCALE + row * stride_scale).to(tl.float32)
        coef = scale * (1.0 + 2.0 * z_loss * lse)
        for start in range(0, n_cols, BLOCK_N):
            mask = start + cols < n_cols
            x = tl.load(logits + start + cols, mask=mask, other=0.0).to(tl.float32)
            grad = coef * tl.exp(x - lse) - scale * smooth
            grad = tl.where(start + cols == target, grad - scale * (1.0 - label_smoothing), grad)
            tl.store(logits + start + cols, grad.to(LOGITS.dtype.element_ty), mask=mask)


def _block_config(n_cols: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps) for a vocabulary of ``n_cols``."""
    block = min(MAX_BLOCK_N, triton.next_power_of_2(max(n_cols, 16)))
    # 8 warps from 1024 columns: with 4, the fp32 pass with the gradient spills under Triton 3.6.
    return block, (4 if block < 1024 else 8)


def launch_rows(logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor, loss: torch.Tensor,
                lse: torch.Tensor, ignore_index: int, label_smoothing: float, z_loss: float,
                compute_grad: bool) -> None:
    """Per row of ``logits`` (C, V) (unit column stride, any row stride): ``loss`` and ``lse`` (C,)
    float32, and with ``compute_grad`` the gradient of ``scale · loss`` written over ``logits``.

    ``targets`` (C,) int64 with values in ``[0, V)`` or ``ignore_index`` (checked by the caller);
    ``scale`` float32 of shape (C,) (per row) or (1,) (every row).
    """
    n_rows, n_cols = logits.shape
    if n_rows == 0:
        return
    block, warps = _block_config(n_cols)
    _lce_rows_kernel[(n_rows,)](
        logits, targets, scale, loss, lse, logits.stride(0), 0 if scale.numel() == 1 else scale.stride(0),
        n_cols, int(ignore_index), float(label_smoothing), float(z_loss),
        COMPUTE_GRAD=bool(compute_grad), BLOCK_N=block, num_warps=warps)


#: One vocabulary per num_warps bucket of _block_config, the widest block of each, and 1024, the
#: narrowest block of the 8-warp bucket.
AOT_VOCAB_SIZES = (512, 1024, 131072)
#: the kernel's arguments that are not "data-type tensor / i32" by the naming convention
_AOT_TYPES = {"TARGETS": "*i64", "SCALE": "*fp32", "LOSS": "*fp32", "LSE": "*fp32",
              "label_smoothing": "fp32", "z_loss": "fp32"}


def aot_specs() -> list[KernelSpec]:
    """Every shipped config: loss only and loss + gradient, per logits dtype and block bucket."""
    specs = []
    for ty in TRITON_DTYPES.values():
        for vocab in AOT_VOCAB_SIZES:
            block, warps = _block_config(vocab)
            for grad in (False, True):
                constexprs = {"COMPUTE_GRAD": grad, "BLOCK_N": block}
                specs.append(KernelSpec(
                    _lce_rows_kernel.fn.__module__, _lce_rows_kernel.fn.__name__,
                    kernel_signature(_lce_rows_kernel, constexprs, ty, _AOT_TYPES), constexprs,
                    num_warps=warps, num_stages=1,
                    label=f"lce_rows {ty} BLOCK_N={block}{' +grad' if grad else ''}"))
    return specs
