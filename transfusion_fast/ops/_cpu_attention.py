"""The compiled block-sparse CPU attention (csrc/attention_cpu.cpp), with autograd and fake kernels.

:func:`cpu_attention` is what ``transfusion_fast.ops.attention`` runs under the ``auto`` backend on
CPU tensors (after it validated its inputs). The kernels walk the Layout's tile tables, the same
ones the Triton kernels read: skipped tiles are never touched, full tiles skip the mask, memory is
O(T·H·D) for any layout.

Structure: the C++ ops ``transfusion_fast::attention_cpu_fwd`` and ``attention_cpu_bwd`` are plain
kernels. The differentiable unit is the custom op ``transfusion_fast::cpu_attention`` defined here
(it takes the row *and* column tile tables, so that its backward has what the dK/dV walk needs),
with ``register_autograd`` and ``register_fake`` so that ``torch.compile(fullgraph=True)`` traces
through it.
"""
from __future__ import annotations

import torch

from .. import _ext
from ..layout import Layout

__all__ = ["cpu_attention", "CPU_BLOCK_M", "CPU_BLOCK_N", "SUPPORTED_DTYPES"]

#: Tile sizes of the CPU kernels (query rows × keys): one BLAS call per tile must amortize its
#: overhead, while partial tiles at span and document edges should waste little. Swept over
#: {32, 64, 128, 256}² on a 2-thread AVX-512 Xeon (fp32, 8 heads, head_dim 64, T = 2,048
#: Transfusion and packed-document layouts): 64 × 128 was best or within noise of it for forward
#: and backward on both.
CPU_BLOCK_M = 64
CPU_BLOCK_N = 128

#: fp32 and fp64 run natively; fp16 / bf16 are converted to fp32 once and accumulate in fp32.
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.custom_op("transfusion_fast::cpu_attention", mutates_args=(), device_types="cpu")
def _cpu_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_start: torch.Tensor,
                      kv_end: torch.Tensor, kv_lo: torch.Tensor, kv_hi: torch.Tensor,
                      kv_full_lo: torch.Tensor, kv_full_hi: torch.Tensor, q_lo: torch.Tensor,
                      q_hi: torch.Tensor, q_full_lo: torch.Tensor, q_full_hi: torch.Tensor,
                      block_m: int, block_n: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """o (Tq, Hq, D) in q's dtype and lse (Hq, Tq) in the compute dtype (fp32, or fp64 for fp64)."""
    return _ext.ops().attention_cpu_fwd(q, k, v, kv_start, kv_end, kv_lo, kv_hi, kv_full_lo,
                                        kv_full_hi, block_m, block_n, scale)


@_cpu_attention_op.register_fake
def _(q, k, v, kv_start, kv_end, kv_lo, kv_hi, kv_full_lo, kv_full_hi, q_lo, q_hi, q_full_lo,
      q_full_hi, block_m, block_n, scale):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=_compute_dtype(q.dtype))


@torch.library.custom_op("transfusion_fast::cpu_attention_backward", mutates_args=(),
                         device_types="cpu")
def _cpu_attention_backward_op(grad_o: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                               v: torch.Tensor, lse: torch.Tensor, delta: torch.Tensor,
                               kv_start: torch.Tensor, kv_end: torch.Tensor, q_lo: torch.Tensor,
                               q_hi: torch.Tensor, q_full_lo: torch.Tensor, q_full_hi: torch.Tensor,
                               block_m: int, block_n: int,
                               scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv (contiguous, in the inputs' dtypes)."""
    return _ext.ops().attention_cpu_bwd(grad_o, q, k, v, lse, delta, kv_start, kv_end, q_lo, q_hi,
                                        q_full_lo, q_full_hi, block_m, block_n, scale)


@_cpu_attention_backward_op.register_fake
def _(grad_o, q, k, v, lse, delta, kv_start, kv_end, q_lo, q_hi, q_full_lo, q_full_hi, block_m,
      block_n, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, kv_start, kv_end = inputs[:5]
    q_lo, q_hi, q_full_lo, q_full_hi, block_m, block_n, scale = inputs[9:]
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, kv_start, kv_end, q_lo, q_hi, q_full_lo, q_full_hi)
    ctx.block_m, ctx.block_n, ctx.scale = block_m, block_n, scale


def _backward(ctx, grad_o, grad_lse):
    q, k, v, o, lse, kv_start, kv_end, q_lo, q_hi, q_full_lo, q_full_hi = ctx.saved_tensors
    # delta_i = Σ_d dO·O. A gradient flowing into the LSE itself adds grad_lse_i · P_ij to dS_ij
    # (∂lse_i/∂s_ij = P_ij), which is the same as subtracting it from delta.
    delta = (grad_o.to(lse.dtype) * o.to(lse.dtype)).sum(-1).transpose(0, 1)
    if grad_lse is not None:
        delta = delta - grad_lse.to(lse.dtype)
    dq, dk, dv = _cpu_attention_backward_op(grad_o.contiguous(), q, k, v, lse, delta.contiguous(),
                                            kv_start, kv_end, q_lo, q_hi, q_full_lo, q_full_hi,
                                            ctx.block_m, ctx.block_n, ctx.scale)
    return (dq, dk, dv) + (None,) * 13


_cpu_attention_op.register_autograd(_backward, setup_context=_setup_context)


def cpu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout, scale: float,
                  block_m: int = CPU_BLOCK_M, block_n: int = CPU_BLOCK_N):
    """Block-sparse attention on CPU tensors: ``(o (Tq, Hq, D) in q's dtype, lse (Hq, Tq) float32)``.

    Inputs are expected to be validated by ``transfusion_fast.ops.attention`` (packed
    ``(T, H, D)``, ``Hq % Hkv == 0``, unit stride on ``D``). Differentiable w.r.t. q, k, v (and
    through the returned LSE). ``block_m`` / ``block_n`` select the tile table; the defaults are
    the tuned ones.
    """
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"cpu_attention: q must have one of the dtypes {SUPPORTED_DTYPES}, got {q.dtype}")
    if q.device.type != "cpu" or layout.device.type != "cpu":
        raise ValueError(f"cpu_attention needs CPU tensors and a CPU layout, got q on {q.device} and "
                         f"the layout on {layout.device}")
    table = layout.tile_table(block_m, block_n)
    o, lse = _cpu_attention_op(q, k, v, layout.kv_start, layout.kv_end, table.kv_lo, table.kv_hi,
                               table.kv_full_lo, table.kv_full_hi, table.q_lo, table.q_hi,
                               table.q_full_lo, table.q_full_hi, block_m, block_n, float(scale))
    return o, lse.float()
