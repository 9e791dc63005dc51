"""Fused SwiGLU ``silu(gate) · up`` in Triton: forward, backward, custom ops.

The forward reads gate and up once and writes the product; the sigmoid runs in float32. The
backward recomputes ``sigmoid(gate)`` from the saved inputs instead of saving ``silu(gate)``:

    dgate = dout · up · s · (1 + gate · (1 − s)),   dup = dout · gate · s,   s = sigmoid(gate)

DRAM traffic per output element (s = element size): forward reads gate and up and writes the output,
``3s``; backward reads dout, gate and up and writes dgate and dup, ``5s``.

The fused form takes the ``[gate | up]`` projection output ``(rows, 2F)`` directly: gate and up are
the two column halves of the same rows (a row stride of 2F), so the same kernels serve both forms
and the backward writes ``d[gate | up]`` into one ``(rows, 2F)`` tensor without a concatenation.

Autograd memory (measured by ``tests/test_swiglu.py::test_saved_activation_bytes`` with saved-tensor
hooks, reference path in the same run): the custom op saves only gate and up, which are alive anyway
as the projection's output, so it allocates no activation memory for the backward: 0 extra bytes per
output element. Eager PyTorch's ``(F.silu(gate.float()) * up.float()).to(dtype)`` saves the float32
``gate``, ``silu(gate)`` and ``up``: 12 bytes per element, all of it new memory for fp16/bf16
inputs; in fp32 the casts are no-ops and the new memory is the 4-byte ``silu(gate)``. For a
LLaMA-7B MLP (F = 11008) over 4096 tokens in bf16 that is 541 MB per layer the fused op never keeps.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from transfusion_fast.aot import TRITON_DTYPES, KernelSpec, kernel_signature

__all__ = ["swiglu", "swiglu_fused", "aot_specs", "BLOCK_SIZE", "NUM_WARPS"]

#: Columns per program: 1024 elements over 4 warps = 8 per thread, 16-byte vector accesses in fp16.
BLOCK_SIZE = 1024
NUM_WARPS = 4


@triton.jit
def _swiglu_fwd_kernel(GATE, UP, OUT, stride_gate, stride_up, stride_out, n_cols,
                       BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(GATE + row * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(UP + row * stride_up + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(OUT + row * stride_out + cols, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DOUT, GATE, UP, DGATE, DUP, stride_dout, stride_gate, stride_up, stride_dgate,
                       stride_dup, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dout = tl.load(DOUT + row * stride_dout + cols, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(GATE + row * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(UP + row * stride_up + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    dgate = dout * up * sig * (1.0 + gate * (1.0 - sig))
    tl.store(DGATE + row * stride_dgate + cols, dgate.to(DGATE.dtype.element_ty), mask=mask)
    tl.store(DUP + row * stride_dup + cols, (dout * silu).to(DUP.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as ``(rows, cols)`` with unit column stride: a view whenever the strides allow it."""
    rows = t.reshape(-1, t.shape[-1]) if t.dim() != 2 else t   # callers skip empty tensors
    return rows if rows.stride(-1) == 1 or rows.shape[-1] <= 1 else rows.contiguous()


def _grid(n_rows: int, n_cols: int) -> tuple[int, int]:
    return n_rows, triton.cdiv(n_cols, BLOCK_SIZE)


def _launch_forward(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor) -> None:
    """``out = silu(gate) · up`` on 2-D row views with unit column stride."""
    _swiglu_fwd_kernel[_grid(*out.shape)](gate, up, out, gate.stride(0), up.stride(0), out.stride(0),
                                          out.shape[1], BLOCK=BLOCK_SIZE, num_warps=NUM_WARPS)


def _launch_backward(dout, gate, up, dgate, dup) -> None:
    _swiglu_bwd_kernel[_grid(*dgate.shape)](dout, gate, up, dgate, dup, dout.stride(0), gate.stride(0),
                                            up.stride(0), dgate.stride(0), dup.stride(0), dgate.shape[1],
                                            BLOCK=BLOCK_SIZE, num_warps=NUM_WARPS)


@torch.library.custom_op("transfusion_fast::swiglu", mutates_args=())
def _swiglu_op(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if out.numel():
        _launch_forward(_rows(gate), _rows(up), out.view(-1, gate.shape[-1]))
    return out


@torch.library.custom_op("transfusion_fast::swiglu_backward", mutates_args=())
def _swiglu_backward_op(dout: torch.Tensor, gate: torch.Tensor,
                        up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dgate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    dup = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    width = gate.shape[-1]
    if dgate.numel():
        _launch_backward(_rows(dout), _rows(gate), _rows(up), dgate.view(-1, width), dup.view(-1, width))
    return dgate, dup


@torch.library.custom_op("transfusion_fast::swiglu_fused", mutates_args=())
def _swiglu_fused_op(gate_up: torch.Tensor) -> torch.Tensor:
    width = gate_up.shape[-1] // 2
    out = torch.empty((*gate_up.shape[:-1], width), dtype=gate_up.dtype, device=gate_up.device)
    if out.numel():
        rows = _rows(gate_up)
        _launch_forward(rows[:, :width], rows[:, width:], out.view(-1, width))
    return out


@torch.library.custom_op("transfusion_fast::swiglu_fused_backward", mutates_args=())
def _swiglu_fused_backward_op(dout: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    width = gate_up.shape[-1] // 2
    dgate_up = torch.empty(gate_up.shape, dtype=gate_up.dtype, device=gate_up.device)
    if dgate_up.numel():
        rows, drows = _rows(gate_up), dgate_up.view(-1, 2 * width)
        _launch_backward(_rows(dout), rows[:, :width], rows[:, width:], drows[:, :width], drows[:, width:])
    return dgate_up


@_swiglu_op.register_fake
def _(gate, up):
    return gate.new_empty(gate.shape)


@_swiglu_backward_op.register_fake
def _(dout, gate, up):
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


@_swiglu_fused_op.register_fake
def _(gate_up):
    return gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2))


@_swiglu_fused_backward_op.register_fake
def _(dout, gate_up):
    return gate_up.new_empty(gate_up.shape)


def _save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _swiglu_grad(ctx, dout):
    gate, up = ctx.saved_tensors
    return torch.ops.transfusion_fast.swiglu_backward(dout, gate, up)


def _swiglu_fused_grad(ctx, dout):
    (gate_up,) = ctx.saved_tensors
    return torch.ops.transfusion_fast.swiglu_fused_backward(dout, gate_up)


_swiglu_op.register_autograd(_swiglu_grad, setup_context=_save_inputs)
_swiglu_fused_op.register_autograd(_swiglu_fused_grad, setup_context=_save_inputs)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Triton ``silu(gate) · up`` of validated, same-shape inputs (any strides)."""
    return torch.ops.transfusion_fast.swiglu(gate, up)


def swiglu_fused(gate_up: torch.Tensor) -> torch.Tensor:
    """Triton SwiGLU of the validated ``[gate | up]`` projection output ``(..., 2F)`` → ``(..., F)``."""
    return torch.ops.transfusion_fast.swiglu_fused(gate_up)


def aot_specs() -> list[KernelSpec]:
    """Every shipped config: forward and backward per dtype (one block size for all widths)."""
    constexprs = {"BLOCK": BLOCK_SIZE}
    return [KernelSpec(kernel.fn.__module__, kernel.fn.__name__, kernel_signature(kernel, constexprs, ty),
                       constexprs, num_warps=NUM_WARPS, num_stages=1, label=f"{label} {ty}")
            for ty in TRITON_DTYPES.values()
            for kernel, label in ((_swiglu_fwd_kernel, "swiglu_fwd"), (_swiglu_bwd_kernel, "swiglu_bwd"))]
