"""Fused RMSNorm (optionally with the residual add) in Triton: forward, backward, custom ops.

Forward, one program per row: ``h = x (+ residual)``, ``rstd = rsqrt(mean(h²) + eps)`` in float32,
``y = h · rstd · weight``. It saves only the per-row ``rstd`` (4 bytes a row) next to the tensors
the backward needs anyway (``h`` and ``weight``): eager PyTorch's autograd keeps the float32 copy
of ``h``, ``h²``'s input, the normalized ``h · rstd`` and the weight product's inputs.

Backward, one program per contiguous chunk of rows:
``dh = rstd · (g − ĥ · mean(g · ĥ))`` with ``g = dy · weight`` and ``ĥ = h · rstd``; with the
residual add the gradient arriving at the ``h`` output is added, and ``dx = dresidual = dh``.
The weight gradient ``Σ_rows dy · ĥ`` is reduced deterministically: each program accumulates its
rows in float32 registers and writes one partial row to a ``(programs, N)`` buffer, which is summed
by ``torch.sum`` afterwards. No atomics, so the result is bit-identical run to run on a device.

DRAM traffic per element (s = element size): forward reads x and writes y, ``2s`` (``4s`` with the
residual: + residual read, h write); backward reads dy and h and writes dx, ``3s`` (``4s`` with the
gradient of h). The per-row rstd and the ``(programs, N)`` partials are O(rows + N).

The whole row lives in registers (one block of ``next_power_of_2(N)`` columns), which covers the
hidden sizes of the models this package targets; wider rows are refused with a clear error.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from transfusion_fast.aot import TRITON_DTYPES, KernelSpec, kernel_signature

__all__ = ["rms_norm", "aot_specs", "MAX_HIDDEN"]

#: Widest row kept in registers: the fp32 backward holds four row-sized vectors per program, and at
#: 16384 columns ptxas spills even with 16 warps (measured with aot_specs), so 8192 is the limit.
MAX_HIDDEN = 8192


@triton.jit
def _rms_norm_fwd_kernel(X, RES, W, Y, H, RSTD, stride_x, stride_res, stride_y, stride_h, n_cols, eps,
                         HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        res = tl.load(RES + row * stride_res + cols, mask=mask, other=0.0)
        # Rounded to the input dtype before normalizing, exactly as the eager ``x + residual``.
        x = (x.to(tl.float32) + res.to(tl.float32)).to(x.dtype)
        tl.store(H + row * stride_h + cols, x, mask=mask)
    h = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(h * h, axis=0) / n_cols + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    y = (h * rstd) * w
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(DY, DH_OUT, H, W, RSTD, DX, DW_PARTIAL, stride_dy, stride_dh_out, stride_h,
                         stride_dx, n_rows, n_cols, rows_per_program,
                         HAS_DH_OUT: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    row_start = pid * rows_per_program
    row_count = tl.minimum(row_start + rows_per_program, n_rows) - row_start
    for i in range(0, row_count):
        row = row_start.to(tl.int64) + i
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        h = tl.load(H + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        h_hat = h * rstd
        g = dy * w
        dh = rstd * (g - h_hat * (tl.sum(g * h_hat, axis=0) / n_cols))
        if HAS_DH_OUT:
            dh += tl.load(DH_OUT + row * stride_dh_out + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row * stride_dx + cols, dh.to(DX.dtype.element_ty), mask=mask)
        dw_acc += dy * h_hat
    tl.store(DW_PARTIAL + pid.to(tl.int64) * n_cols + cols, dw_acc, mask=mask)


def _block_config(n_cols: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps) for a row of ``n_cols``: the whole row in one block."""
    if n_cols > MAX_HIDDEN:
        raise ValueError(f"rms_norm (triton): the last dimension of x must be at most {MAX_HIDDEN}, got "
                         f"{n_cols} (a row is kept in registers); use backend 'reference' for wider rows")
    block = triton.next_power_of_2(n_cols)
    # 16 warps from 4096 columns: with 8, the fp32 forward with a residual spills under Triton 3.6.
    return block, (4 if block <= 1024 else 8 if block < 4096 else 16)


@functools.lru_cache(maxsize=None)
def _backward_programs(device: torch.device) -> int:
    """Programs of the backward grid: a few per SM on a GPU, a handful under the interpreter."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _unit_stride_rows(t: torch.Tensor) -> torch.Tensor:
    """The 2-D tensor with unit column stride (any row stride is fine for the kernels)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _forward(x: torch.Tensor, weight: torch.Tensor, residual: Optional[torch.Tensor], eps: float):
    n_rows, n_cols = x.shape
    block, warps = _block_config(n_cols)
    x, weight = _unit_stride_rows(x), weight.contiguous()
    y = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if residual is not None:
        residual = _unit_stride_rows(residual)
        h = torch.empty_like(y)
    else:
        residual, h = x, y    # unused by the kernel (HAS_RESIDUAL false)
    if n_rows:
        _rms_norm_fwd_kernel[(n_rows,)](
            x, residual, weight, y, h, rstd, x.stride(0), residual.stride(0), y.stride(0), h.stride(0),
            n_cols, eps, HAS_RESIDUAL=h is not y, BLOCK_N=block, num_warps=warps)
    return y, (h if h is not y else None), rstd


@torch.library.custom_op("transfusion_fast::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    y, _, rstd = _forward(x, weight, None, eps)
    return y, rstd


@torch.library.custom_op("transfusion_fast::rms_norm_residual", mutates_args=())
def _rms_norm_residual_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                          eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(x, weight, residual, eps)


@torch.library.custom_op("transfusion_fast::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(dy: torch.Tensor, dh_out: Optional[torch.Tensor], h: torch.Tensor,
                          weight: torch.Tensor, rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n_rows, n_cols = h.shape
    block, warps = _block_config(n_cols)
    dy, h, weight = _unit_stride_rows(dy), _unit_stride_rows(h), weight.contiguous()
    dx = torch.empty((n_rows, n_cols), dtype=h.dtype, device=h.device)
    programs = max(1, min(n_rows, _backward_programs(h.device)))
    partial = torch.zeros((programs, n_cols), dtype=torch.float32, device=h.device)
    if n_rows:
        dh_arg = dx if dh_out is None else _unit_stride_rows(dh_out)
        _rms_norm_bwd_kernel[(programs,)](
            dy, dh_arg, h, weight, rstd, dx, partial, dy.stride(0), dh_arg.stride(0), h.stride(0),
            dx.stride(0), n_rows, n_cols, triton.cdiv(n_rows, programs),
            HAS_DH_OUT=dh_out is not None, BLOCK_N=block, num_warps=warps)
    return dx, partial.sum(0).to(weight.dtype)


@_rms_norm_op.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape), x.new_empty((x.shape[0],), dtype=torch.float32)


@_rms_norm_residual_op.register_fake
def _(x, residual, weight, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape), x.new_empty((x.shape[0],), dtype=torch.float32)


@_rms_norm_backward_op.register_fake
def _(dy, dh_out, h, weight, rstd):
    return h.new_empty(h.shape), weight.new_empty(weight.shape)


def _setup_plain(ctx, inputs, output):
    x, weight, _ = inputs
    _, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.save_for_backward(x, weight, rstd)


def _backward_plain(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dweight = torch.ops.transfusion_fast.rms_norm_backward(dy, None, x, weight, rstd)
    return dx, dweight, None


def _setup_residual(ctx, inputs, output):
    _, _, weight, _ = inputs
    _, h, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.save_for_backward(h, weight, rstd)


def _backward_residual(ctx, dy, dh_out, _drstd):
    h, weight, rstd = ctx.saved_tensors
    dh, dweight = torch.ops.transfusion_fast.rms_norm_backward(dy, dh_out, h, weight, rstd)
    return dh, dh, dweight, None


_rms_norm_op.register_autograd(_backward_plain, setup_context=_setup_plain)
_rms_norm_residual_op.register_autograd(_backward_residual, setup_context=_setup_residual)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
             residual: Optional[torch.Tensor] = None):
    """Triton RMSNorm over the last dim of validated inputs; ``y`` or ``(y, x + residual)``.

    Leading dimensions are flattened to rows (a view whenever the strides allow it).
    """
    shape = x.shape
    rows = x.reshape(-1, shape[-1])
    if residual is None:
        y, _ = torch.ops.transfusion_fast.rms_norm(rows, weight, float(eps))
        return y.view(shape)
    y, h, _ = torch.ops.transfusion_fast.rms_norm_residual(rows, residual.reshape(-1, shape[-1]), weight,
                                                          float(eps))
    return y.view(shape), h.view(shape)


#: One hidden size per num_warps bucket of _block_config, the widest of each (most registers), and
#: 4096, the narrowest of the 16-warp bucket (fewest threads per element).
AOT_HIDDEN_SIZES = (1024, 2048, 4096, MAX_HIDDEN)
#: the parameters that are not tensors of the input dtype or int32 sizes and strides
_AOT_TYPES = {"RSTD": "*fp32", "DW_PARTIAL": "*fp32", "eps": "fp32"}


def aot_specs() -> list[KernelSpec]:
    """Every shipped config (forward with/without residual, backward with/without ``dh``) per dtype."""
    specs = []
    for ty in TRITON_DTYPES.values():
        for hidden in AOT_HIDDEN_SIZES:
            block, warps = _block_config(hidden)
            for residual in (False, True):
                suffix = f"{ty} N={hidden}{' +residual' if residual else ''}"
                for kernel, constexprs, label in (
                        (_rms_norm_fwd_kernel, {"HAS_RESIDUAL": residual, "BLOCK_N": block}, "rms_norm_fwd"),
                        (_rms_norm_bwd_kernel, {"HAS_DH_OUT": residual, "BLOCK_N": block}, "rms_norm_bwd")):
                    specs.append(KernelSpec(
                        kernel.fn.__module__, kernel.fn.__name__,
                        kernel_signature(kernel, constexprs, ty, _AOT_TYPES), constexprs,
                        num_warps=warps, num_stages=1, label=f"{label} {suffix}"))
    return specs
