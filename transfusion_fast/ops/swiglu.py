"""SwiGLU: ``silu(gate) * up``, from two tensors or from the fused ``[gate | up]`` projection.

Implementations (picked by :func:`transfusion_fast.backend.resolve`):

* ``"triton"``: the fused kernels of :mod:`transfusion_fast.kernels.swiglu` (sigmoid in float32,
  backward recomputes silu from the saved inputs; its module docstring gives the activation memory
  saved versus this eager composition).
* ``"cpu"``: the reference composition below, run by ATen's compiled (vectorized) CPU kernels; this
  is the documented CPU path of the ``auto`` backend (SwiGLU has no C++ kernel of its own).
* ``"reference"``: the reference composition.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from transfusion_fast.backend import resolve
from transfusion_fast.kernels import swiglu as swiglu_kernels

__all__ = ["swiglu", "swiglu_fused", "swiglu_reference", "check_swiglu_inputs"]


def check_swiglu_inputs(gate: torch.Tensor, up: torch.Tensor) -> None:
    for name, t in (("gate", gate), ("up", up)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got "
                             f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
    if gate.shape != up.shape:
        raise ValueError(f"gate and up must have the same shape, got {tuple(gate.shape)} and {tuple(up.shape)}")
    if gate.dtype != up.dtype:
        raise ValueError(f"gate and up must share a dtype, got {gate.dtype} and {up.dtype}")
    if gate.device != up.device:
        raise ValueError(f"gate and up must be on one device, got {gate.device} and {up.device}")


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` computed in float32 (float64 inputs stay float64), cast back."""
    compute = torch.promote_types(gate.dtype, torch.float32)
    return (F.silu(gate.to(compute)) * up.to(compute)).to(gate.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` with the sigmoid in float32."""
    check_swiglu_inputs(gate, up)
    if resolve(gate, "swiglu") == "triton":
        return swiglu_kernels.swiglu(gate, up)
    return swiglu_reference(gate, up)


def swiglu_fused(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU of the fused projection output ``(..., 2F)`` laid out as ``[gate | up]`` → ``(..., F)``."""
    if not isinstance(gate_up, torch.Tensor) or gate_up.dim() < 1 or gate_up.shape[-1] % 2 != 0:
        raise ValueError(f"gate_up must be a tensor whose last dimension is even ([gate | up]), got "
                         f"{tuple(gate_up.shape) if isinstance(gate_up, torch.Tensor) else type(gate_up).__name__}")
    if not gate_up.is_floating_point():
        raise ValueError(f"gate_up must be a floating-point tensor, got {gate_up.dtype}")
    if resolve(gate_up, "swiglu_fused") == "triton":
        return swiglu_kernels.swiglu_fused(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return swiglu_reference(gate, up)
