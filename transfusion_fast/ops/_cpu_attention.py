"""The compiled block-sparse CPU attention (csrc/attention_cpu*), with autograd and fake kernels.

:func:`cpu_attention` is what ``transfusion_fast.ops.attention`` runs under the ``auto`` backend on
CPU tensors (after it validated its inputs). The kernels walk the Layout's tile tables, the same
ones the Triton kernels read: skipped tiles are never touched, full tiles skip the mask, memory is
O(T·H·D) for any layout.

Which hand-written kernels run is chosen by CPU feature at load time (the best of ``"avx512"``,
``"avx2"``, ``"portable"``): :func:`set_cpu_isa` / :func:`use_cpu_isa` or the environment variable
``TRANSFUSION_FAST_CPU_ISA`` (read the first time the kernels are used) force another one the CPU can
run, :func:`cpu_isa` says which is in use and :func:`available_cpu_isas` which ones this CPU runs.
``"portable"`` is BLAS products with compiler-vectorized passes, what non-x86 CPUs run.
docs/cpu_attention.md describes the paths.

Structure: the C++ ops ``transfusion_fast::attention_cpu_fwd`` and ``attention_cpu_bwd`` are plain
kernels, wrapped here as the custom ops ``transfusion_fast::cpu_attention`` / ``cpu_attention_backward``.
``_CpuAttention`` (an ``autograd.Function`` that hands the backward the column tile table its dK/dV walk
needs) runs the two as opaque custom ops with fake kernels, so that ``torch.compile(fullgraph=True)``
traces through it.
"""
from __future__ import annotations

import contextlib
import os

import torch

from .. import _ext
from ..checks import refuse_double_backward
from ..layout import Layout, TileTable

__all__ = ["cpu_attention", "FORWARD_BLOCKS", "BACKWARD_BLOCKS", "SUPPORTED_DTYPES", "CPU_ISAS",
           "CPU_ISA_ENV", "cpu_isa", "set_cpu_isa", "use_cpu_isa", "available_cpu_isas"]

#: Every ISA path of the CPU attention, best first; a CPU runs a subset (:func:`available_cpu_isas`).
CPU_ISAS = ("avx512", "avx2", "portable")
#: Environment variable naming the ISA path to run instead of the best one the CPU has.
CPU_ISA_ENV = "TRANSFUSION_FAST_CPU_ISA"


def _isa_from_environment() -> None:
    name = os.environ.get(CPU_ISA_ENV, "").strip()
    if name:
        _set_isa(name, f"{CPU_ISA_ENV}={name!r}")


def _ops():
    """The extension's ops, with ``TRANSFUSION_FAST_CPU_ISA`` applied the first time."""
    return _ext.ops(_isa_from_environment)


def _set_isa(name: str, what: str) -> str:
    if name not in CPU_ISAS:
        raise ValueError(f"{what}: the CPU attention ISA must be one of {CPU_ISAS}, got {name!r}")
    available = tuple(_ext.ops().attention_cpu_isas())
    if name not in available:
        raise ValueError(f"{what}: this CPU cannot run the {name!r} path of the CPU attention; it runs "
                         f"{tuple(reversed(available))}")
    return _ext.ops().attention_cpu_set_isa(name)


def available_cpu_isas() -> tuple[str, ...]:
    """The ISA paths this CPU (and build) can run, best first; always ends with ``"portable"``."""
    return tuple(reversed(_ops().attention_cpu_isas()))


def cpu_isa() -> str:
    """The ISA path the CPU attention runs now: ``"avx512"``, ``"avx2"`` or ``"portable"``."""
    return _ops().attention_cpu_isa()


def set_cpu_isa(name: str) -> str:
    """Run the CPU attention's ``name`` path from now on; returns the previous one.

    Raises ValueError for an unknown name or one this CPU cannot run (see :func:`available_cpu_isas`).
    """
    _ops()
    return _set_isa(name, f"set_cpu_isa(name={name!r})")


@contextlib.contextmanager
def use_cpu_isa(name: str):
    """Run the block with the CPU attention's ``name`` path, restoring the previous one after."""
    previous = set_cpu_isa(name)
    try:
        yield name
    finally:
        _ext.ops().attention_cpu_set_isa(previous)

#: Tile sizes (query rows, keys) of the forward and of the backward kernel. The kernels merge
#: consecutive visited tiles into wider products (csrc/attention_cpu_fwd.cpp / _bwd.cpp,
#: kForwardGemmCols / kBackwardGemmRows) and, inside a tile, follow the documents and the rows'
#: intervals (masked work in 32-wide sub-blocks), so the tile sizes mostly set the task
#: granularity; docs/cpu_attention.md has the sweep they were chosen from.
FORWARD_BLOCKS = (128, 64)
BACKWARD_BLOCKS = (32, 128)

#: fp32 and fp64 run natively; fp16 / bf16 are converted to fp32 once and accumulate in fp32.
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.custom_op("transfusion_fast::cpu_attention", mutates_args=(), device_types="cpu")
def _cpu_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_start: torch.Tensor,
                      kv_end: torch.Tensor, kv_lo: torch.Tensor, kv_hi: torch.Tensor,
                      kv_full_lo: torch.Tensor, kv_full_hi: torch.Tensor, block_m: int, block_n: int,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """o (Tq, Hq, D) in q's dtype and lse (Hq, Tq) in the compute dtype (fp32, or fp64 for fp64).

    kv_start / kv_end are the rows' key intervals (Layout), kv_lo.. the (block_m, block_n) tile table."""
    return _ops().attention_cpu_fwd(q, k, v, kv_start, kv_end, kv_lo, kv_hi, kv_full_lo,
                                        kv_full_hi, block_m, block_n, scale)


@_cpu_attention_op.register_fake
def _(q, k, v, kv_start, kv_end, kv_lo, kv_hi, kv_full_lo, kv_full_hi, block_m, block_n, scale):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=_compute_dtype(q.dtype))


@torch.library.custom_op("transfusion_fast::cpu_attention_backward", mutates_args=(),
                         device_types="cpu")
def _cpu_attention_backward_op(grad_o: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                               v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                               grad_lse: torch.Tensor | None,
                               kv_start: torch.Tensor, kv_end: torch.Tensor, q_start: torch.Tensor,
                               q_end: torch.Tensor, q_lo: torch.Tensor,
                               q_hi: torch.Tensor, q_full_lo: torch.Tensor, q_full_hi: torch.Tensor,
                               block_m: int, block_n: int,
                               scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv (contiguous, in the inputs' dtypes).

    The kernel computes delta_i = Σ_d dO·O itself; a gradient flowing into the LSE (``grad_lse``)
    adds grad_lse_i · P_ij to dS_ij (∂lse_i/∂s_ij = P_ij), the same as subtracting it from delta."""
    return _ops().attention_cpu_bwd(grad_o, q, k, v, o, lse, grad_lse, kv_start, kv_end, q_start, q_end,
                                        q_lo, q_hi, q_full_lo, q_full_hi, block_m, block_n, scale)


refuse_double_backward(_cpu_attention_backward_op, "attention (cpu)")


@_cpu_attention_backward_op.register_fake
def _(grad_o, q, k, v, o, lse, grad_lse, kv_start, kv_end, q_start, q_end, q_lo, q_hi, q_full_lo, q_full_hi, block_m,
      block_n, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


#: The ISA paths whose own forward is slower than ATen's flash attention kernel (what
#: ``F.scaled_dot_product_attention`` runs without a mask) on a layout that is dense per document,
#: measured (docs/cpu_attention.md): there the forward is ATen's, one call per document, and the
#: backward stays this kernel's (it needs only o and the LSE, so gradients, GQA and a differentiated
#: LSE work as everywhere). The AVX-512 and AVX2 paths' own forward is the faster one.
ATEN_FORWARD_FOR_DENSE_DOCUMENTS = frozenset({"portable"})
#: More documents than this run through this kernel anyway: one ATen call each would cost more host
#: time than the forward saves.
_MAX_ATEN_DOCUMENTS = 16


def _aten_forward_wins(q: torch.Tensor, layout: Layout) -> bool:
    """Whether the forward of this call goes to ATen's flash attention kernel (see above)."""
    return (layout.is_bidirectional and layout.num_queries == layout.num_keys
            and layout.num_docs <= _MAX_ATEN_DOCUMENTS and q.dtype == torch.float32
            and not torch.compiler.is_compiling() and cpu_isa() in ATEN_FORWARD_FOR_DENSE_DOCUMENTS)


def _aten_dense_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout,
                        scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """o (T, Hq, D) and lse (Hq, T) of a layout whose documents are each fully bidirectional, by
    ATen's CPU flash attention kernel per document (GQA included: it maps query head h to kv head
    h // (Hq / Hkv), as this kernel does)."""
    bounds = layout.cu_seqlens.tolist()
    outs, lses = [], []
    for a, b in zip(bounds[:-1], bounds[1:]):
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            *(t[a:b].transpose(0, 1)[None] for t in (q, k, v)), scale=scale)
        outs.append(o[0].transpose(0, 1))
        lses.append(lse[0])
    return torch.cat(outs).contiguous(), torch.cat(lses, 1).contiguous()


class _CpuAttention(torch.autograd.Function):
    """o, lse = attention(q, k, v); the backward's (column) tile table rides along.

    An autograd.Function around the two opaque ops rather than ``register_autograd``: the library
    wrapper re-reads the op schema per argument per call, host time that shows at short sequences
    (docs/cpu_attention.md)."""

    @staticmethod
    def forward(ctx, q, k, v, layout: Layout, rows: TileTable, cols: TileTable, scale: float,
                aten_forward: bool = False):
        if aten_forward:
            o, lse = _aten_dense_forward(q, k, v, layout, scale)
        # NaN / inf inputs: this kernel's semantics (ops.attention's docstring). One sum, not an
        # elementwise isfinite (a bool tensor and a parallel pass): a NaN or an infinity always
        # reaches the sum, and a finite sum that overflows only costs the kernel's run.
        if aten_forward and not bool(torch.isfinite(o.sum(dtype=torch.float32) + lse.sum())):
            aten_forward = False
        if not aten_forward:
            o, lse = _cpu_attention_op(q, k, v, layout.kv_start, layout.kv_end, rows.kv_lo, rows.kv_hi,
                                       rows.kv_full_lo, rows.kv_full_hi, rows.block_m, rows.block_n, scale)
        ctx.save_for_backward(q, k, v, o, lse, layout.kv_start, layout.kv_end, layout.q_start, layout.q_end,
                              cols.q_lo, cols.q_hi, cols.q_full_lo, cols.q_full_hi)
        ctx.block_m, ctx.block_n, ctx.scale = cols.block_m, cols.block_n, scale
        # an unused output's gradient stays None: no zero-filled dLSE is read by the kernel
        ctx.set_materialize_grads(False)
        return o, lse

    @staticmethod
    def backward(ctx, grad_o, grad_lse):
        q, k, v, o, lse, *tables = ctx.saved_tensors
        grad_o = torch.zeros_like(o) if grad_o is None else grad_o.contiguous()
        dq, dk, dv = _cpu_attention_backward_op(grad_o, q, k, v, o, lse, grad_lse, *tables,
                                                ctx.block_m, ctx.block_n, ctx.scale)
        return dq, dk, dv, None, None, None, None, None


def cpu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout, scale: float,
                  forward_blocks: tuple[int, int] = FORWARD_BLOCKS,
                  backward_blocks: tuple[int, int] = BACKWARD_BLOCKS):
    """Block-sparse attention on CPU tensors: ``(o (Tq, Hq, D) in q's dtype, lse (Hq, Tq) float32)``.

    Inputs are expected to be validated by ``transfusion_fast.ops.attention`` (packed
    ``(T, H, D)``, ``Hq % Hkv == 0``, unit stride on ``D``). Differentiable w.r.t. q, k, v (and
    through the returned LSE). ``forward_blocks`` / ``backward_blocks`` are the (rows, keys) tile
    sizes of the two kernels; the defaults are the tuned ones.
    """
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"cpu_attention: q must have one of the dtypes {SUPPORTED_DTYPES}, got {q.dtype}")
    if q.device.type != "cpu" or layout.device.type != "cpu":
        raise ValueError(f"cpu_attention needs CPU tensors and a CPU layout, got q on {q.device} and "
                         f"the layout on {layout.device}")
    o, lse = _CpuAttention.apply(q, k, v, layout, layout.tile_table(*forward_blocks),
                                 layout.tile_table(*backward_blocks), float(scale), _aten_forward_wins(q, layout))
    return o, lse.float()
