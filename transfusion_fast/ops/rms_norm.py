"""RMSNorm over the last dimension, with an optional fused residual add.

Implementations (picked by :func:`transfusion_fast.backend.resolve`):

* ``"triton"``: the fused kernels of :mod:`transfusion_fast.kernels.rms_norm` (forward saves only the
  per-row rstd; deterministic weight gradient; rows up to ``MAX_HIDDEN`` wide).
* ``"cpu"``: the reference composition below, run by ATen's compiled (vectorized) CPU kernels; this
  is the documented CPU path of the ``auto`` backend (RMSNorm has no C++ kernel of its own).
* ``"reference"``: the reference composition.

Mixed precision: ``x`` and ``residual`` may differ in dtype (under ``torch.autocast`` a block's
output arrives in bf16/fp16 while the residual stream stays fp32). The sum ``h = x + residual`` is
then kept in the wider of the two dtypes, as eager ``x + residual`` would, and ``y`` has ``h``'s
dtype; the statistics are computed in float32 either way.
"""
from __future__ import annotations

import torch

from transfusion_fast.backend import resolve
from transfusion_fast.checks import check_float
from transfusion_fast.kernels import rms_norm as rms_norm_kernels

__all__ = ["rms_norm", "rms_norm_reference", "check_rms_norm_inputs"]


def check_rms_norm_inputs(x: torch.Tensor, weight: torch.Tensor, eps: float,
                          residual: torch.Tensor | None) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise ValueError(f"x must be a floating-point tensor with at least 1 dimension, got "
                         f"{(x.dtype, tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not isinstance(weight, torch.Tensor) or weight.shape != (x.shape[-1],):
        raise ValueError(f"weight must have shape ({x.shape[-1]},) (the last dim of x), got "
                         f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}")
    if residual is not None:
        if not isinstance(residual, torch.Tensor) or residual.shape != x.shape or not residual.is_floating_point():
            raise ValueError(f"residual must be a floating-point tensor of x's shape {tuple(x.shape)}, got "
                             f"{(tuple(residual.shape), residual.dtype) if isinstance(residual, torch.Tensor) else type(residual).__name__}")
        if residual.device != x.device:
            raise ValueError(f"residual is on {residual.device} but x is on {x.device}")
    check_float("eps", eps, 0.0, low_open=True)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
                       residual: torch.Tensor | None = None):
    """``y = x / sqrt(mean(x²) + eps) * weight`` in float32 (float64 inputs stay float64); with
    ``residual``, normalizes ``h = x + residual`` (in the wider dtype of the two) and returns
    ``(y, h)`` with ``y`` in ``h``'s dtype."""
    h = x if residual is None else x + residual
    compute = torch.promote_types(h.dtype, torch.float32)
    hf = h.to(compute)
    y = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps) * weight.to(compute)).to(h.dtype)
    return y if residual is None else (y, h)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
             residual: torch.Tensor | None = None):
    """RMSNorm over the last dim; see :func:`rms_norm_reference` for the exact semantics."""
    check_rms_norm_inputs(x, weight, eps, residual)
    if residual is not None and residual.dtype != x.dtype:
        # The kernels take one activation dtype: widen the narrower input (the sum is formed in
        # the wider dtype anyway, so no precision is lost).
        wide = torch.promote_types(x.dtype, residual.dtype)
        x, residual = x.to(wide), residual.to(wide)
    if resolve(x, "rms_norm") == "triton":
        return rms_norm_kernels.rms_norm(x, weight, eps, residual)
    return rms_norm_reference(x, weight, eps, residual)
