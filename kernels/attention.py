"""Block-sparse Transfusion attention in Triton: host launchers, custom ops, autograd.

One op in the manner of Liger-Kernel, split along its seams:

* :mod:`~transfusion_fast.kernels.attention_kernels`: the ``@triton.jit`` kernels (forward, dQ with
  delta, dK/dV) and how they walk the Layout's tile tables;
* :mod:`~transfusion_fast.kernels.attention_exact`: the exact path that recomputes, after each fast
  kernel, the tiles whose result came out non-finite (IEEE arithmetic over the visible pairs);
* :mod:`~transfusion_fast.kernels.attention_tiles`: the shipped tile sizes per head_dim, dtype and
  GPU generation (:func:`tile_config`, :func:`forced_tile_sizes`);
* :mod:`~transfusion_fast.kernels.launch`: the launch cache that keeps the host time of a call small;
* this file: the launchers that size the grids and pass the tile tables, the forward and backward
  registered as the custom ops ``transfusion_fast::triton_attention_fwd`` / ``_bwd`` (with fake
  implementations, so ``torch.compile`` traces them without a graph break), the
  ``autograd.Function`` joining them, and :func:`triton_attention`;
* :mod:`~transfusion_fast.kernels.attention_diagnostics`: the work counter
  (``count_computed_tiles``) and every shipped kernel config for the AOT compile (``aot_specs``).

The tile tables are cached on the Layout per block size, so every layer of a model reuses them.
"""
from __future__ import annotations

import functools

import torch

from transfusion_fast.checks import refuse_double_backward
from transfusion_fast.layout import Layout, TileTable

from .attention_exact import (EXACT_MAXNREG, EXACT_WARPS, attn_bwd_dkdv_exact, attn_bwd_dq_exact,
                              attn_fwd_exact)
from .attention_kernels import attn_bwd_dkdv, attn_bwd_dq, attn_fwd
from .attention_tiles import (SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS, TileConfig, forced_tile_config,
                              forced_tile_sizes, tile_config)
from .launch import Launcher, cdiv, next_power_of_2

__all__ = ["triton_attention", "launch_forward", "launch_backward", "tile_tables", "row_walk",
           "column_walk", "dot_precision", "TileConfig", "tile_config", "forced_tile_sizes",
           "forced_tile_config", "gpu_arch", "SUPPORTED_DTYPES", "SUPPORTED_HEAD_DIMS"]

LOG2E = 1.4426950408889634


# ================================================================================== launchers
# torch.compile: the answer is a trace-time constant (dynamo would otherwise put the query in the
# graph or break it); the device of a traced tensor cannot change without a recompile.
@torch._dynamo.assume_constant_result
def gpu_arch(device: torch.device) -> int:
    """80 (Ampere-class) or 90 (Hopper and newer); the interpreter plans as for sm_80."""
    if device.type != "cuda":
        return 80
    major, _ = torch.cuda.get_device_capability(device)
    return 90 if major >= 9 else 80


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get IEEE products: the fp32 path must match the reference to fp32 accuracy.
    return "ieee" if dtype == torch.float32 else "tf32"


def row_walk(table: TileTable) -> tuple[torch.Tensor, ...]:
    """What a kernel over row tiles reads: key-tile ranges and the longest-first tile order."""
    return table.kv_lo, table.kv_hi, table.kv_full_lo, table.kv_full_hi, table.m_order


def column_walk(table: TileTable) -> tuple[torch.Tensor, ...]:
    """What a kernel over key tiles reads: query-tile ranges and the longest-first tile order."""
    return table.q_lo, table.q_hi, table.q_full_lo, table.q_full_hi, table.n_order


def tile_tables(layout: Layout, config: TileConfig) -> tuple[TileTable, TileTable, TileTable]:
    """The (cached) tile tables of the forward, dK/dV and dQ kernels under ``config``."""
    return (layout.tile_table(config.fwd_block_m, config.fwd_block_n),
            layout.tile_table(config.dkdv_block_m, config.dkdv_block_n),
            layout.tile_table(config.dq_block_m, config.dq_block_n))


_launch_fwd, _launch_dq, _launch_dkdv = map(Launcher, (attn_fwd, attn_bwd_dq, attn_bwd_dkdv))
_launch_fwd_exact, _launch_dq_exact, _launch_dkdv_exact = map(
    Launcher, (attn_fwd_exact, attn_bwd_dq_exact, attn_bwd_dkdv_exact))
_EXACT = dict(num_warps=EXACT_WARPS, num_stages=1, maxnreg=EXACT_MAXNREG)


def launch_forward(q, k, v, kv_start, kv_end, kv_lo, kv_hi, kv_full_lo, kv_full_hi, m_order,
                   scale: float, config: TileConfig, work: torch.Tensor | None = None):
    n_queries, hq, head_dim = q.shape
    n_keys, hkv = k.shape[0], k.shape[1]
    o = torch.empty((n_queries, hq, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((hq, n_queries), dtype=torch.float32, device=q.device)
    grid = (cdiv(n_queries, config.fwd_block_m), hq)
    # per program: its result came out non-finite, the exact kernel recomputes it (every slot
    # is written by the fast kernel)
    flags = torch.empty((hq, grid[0]), dtype=torch.int32, device=q.device)
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
               o.stride(0), o.stride(1))
    common = dict(GROUP=hq // hkv, HEAD_DIM=head_dim, BLOCK_D=next_power_of_2(head_dim),
                  BLOCK_M=config.fwd_block_m, BLOCK_N=config.fwd_block_n,
                  DOT_PRECISION=dot_precision(q.dtype))
    _launch_fwd(
        grid, q, k, v, o, lse, kv_start, kv_end, kv_lo, kv_hi, kv_full_lo, kv_full_hi, m_order,
        flags, kv_start if work is None else work,   # never written unless COUNT_WORK
        *strides, n_queries, n_keys, scale * LOG2E, COUNT_WORK=work is not None,
        num_warps=config.fwd_warps, num_stages=config.fwd_stages, **common)
    _launch_fwd_exact(grid, q, k, v, o, lse, kv_start, kv_end, kv_lo, kv_hi, flags, *strides,
                      n_queries, n_keys, scale * LOG2E, **_EXACT, **common)
    return o, lse


def launch_backward(do, dlse, q, k, v, o, lse, kv_start, kv_end, q_lo, q_hi, q_full_lo,
                    q_full_hi, n_order, kv_lo, kv_hi, kv_full_lo, kv_full_hi, m_order,
                    scale: float, config: TileConfig, work_dkdv: torch.Tensor | None = None,
                    work_dq: torch.Tensor | None = None):
    n_queries, hq, head_dim = q.shape
    n_keys, hkv = k.shape[0], k.shape[1]
    if do.stride(-1) != 1:       # e.g. the expanded gradient of a .sum()
        do = do.contiguous()
    if dlse is not None:
        dlse = dlse.contiguous()
    common = dict(GROUP=hq // hkv, HEAD_DIM=head_dim, BLOCK_D=next_power_of_2(head_dim),
                  DOT_PRECISION=dot_precision(q.dtype))

    # -- dQ and delta = rowsum(dO * O) - dLSE: one program per (row tile, query head)
    delta = torch.empty((hq, n_queries), dtype=torch.float32, device=q.device)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    qkv_strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1))
    grid = (cdiv(n_queries, config.dq_block_m), hq)
    flags = torch.empty((hq, grid[0]), dtype=torch.int32, device=q.device)   # as in the forward
    blocks = dict(BLOCK_M=config.dq_block_m, BLOCK_N=config.dq_block_n)
    _launch_dq(
        grid, q, k, v, o, do, lse, delta if dlse is None else dlse, delta, dq, kv_start, kv_end,
        kv_lo, kv_hi, kv_full_lo, kv_full_hi, m_order, flags,
        kv_start if work_dq is None else work_dq, *qkv_strides, o.stride(0), o.stride(1),
        do.stride(0), do.stride(1), dq.stride(0), dq.stride(1), n_queries, n_keys, scale * LOG2E,
        scale, HAS_DLSE=dlse is not None, COUNT_WORK=work_dq is not None,
        num_warps=config.dq_warps, num_stages=config.dq_stages, **blocks, **common)
    _launch_dq_exact(
        grid, q, k, v, do, lse, delta, dq, kv_start, kv_end, kv_lo, kv_hi, flags, *qkv_strides,
        do.stride(0), do.stride(1), dq.stride(0), dq.stride(1), n_queries, n_keys, scale * LOG2E,
        scale, **_EXACT, **blocks, **common)
    # -- dK, dV (reads the delta written above): one program per (key tile, kv head)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    grid = (cdiv(n_keys, config.dkdv_block_n), hkv)
    flags = torch.empty((hkv, grid[0]), dtype=torch.int32, device=q.device)
    blocks = dict(BLOCK_M=config.dkdv_block_m, BLOCK_N=config.dkdv_block_n)
    strides = (*qkv_strides, do.stride(0), do.stride(1), dk.stride(0), dk.stride(1), dv.stride(0),
               dv.stride(1))
    _launch_dkdv(
        grid, q, k, v, do, lse, delta, dk, dv, kv_start, kv_end, q_lo, q_hi, q_full_lo,
        q_full_hi, n_order, flags, kv_start if work_dkdv is None else work_dkdv, *strides,
        n_queries, n_keys, scale * LOG2E, scale, COUNT_WORK=work_dkdv is not None,
        num_warps=config.dkdv_warps, num_stages=config.dkdv_stages, **blocks, **common)
    _launch_dkdv_exact(
        grid, q, k, v, do, lse, delta, dk, dv, kv_start, kv_end, q_lo, q_hi, flags, *strides,
        n_queries, n_keys, scale * LOG2E, scale, **_EXACT, **blocks, **common)
    return dq, dk, dv


# ================================================================================== custom ops
# The forward and the backward, each registered as an opaque op so that torch.compile traces
# around the kernels, joined by an autograd.Function. Eager calls run the plain functions: going
# through the op (the dispatcher, the library's Python kernel wrapper) adds host time to every
# call, and at small sizes the GPU waits for the host. The Function rather than
# ``register_autograd`` for the same reason: the library's autograd wrapper re-reads the op schema
# for every argument on each call.
def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_start: torch.Tensor,
                   kv_end: torch.Tensor, kv_lo: torch.Tensor, kv_hi: torch.Tensor,
                   kv_full_lo: torch.Tensor, kv_full_hi: torch.Tensor, m_order: torch.Tensor,
                   scale: float, tiles: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward: (o, lse)."""
    return launch_forward(q, k, v, kv_start, kv_end, kv_lo, kv_hi, kv_full_lo, kv_full_hi,
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
    return launch_backward(do, dlse, q, k, v, o, lse, kv_start, kv_end, q_lo, q_hi, q_full_lo,
                           q_full_hi, n_order, kv_lo, kv_hi, kv_full_lo, kv_full_hi, m_order,
                           scale, _config_of(tiles))


_attention_bwd_op = torch.library.custom_op("transfusion_fast::triton_attention_bwd",
                                            mutates_args=())(_attention_bwd)
refuse_double_backward(_attention_bwd_op, "attention (triton)")


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
        o, lse = forward(q, k, v, kv_start, kv_end, *row_walk(fwd), scale, tiles)
        ctx.save_for_backward(q, k, v, o, lse, kv_start, kv_end, *column_walk(dkdv),
                              *row_walk(dq))
        ctx.scale, ctx.tiles = scale, tiles
        # an unused output's gradient stays None: no zero-filled dLSE is read by the kernels
        ctx.set_materialize_grads(False)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse, *tables = ctx.saved_tensors
        if do is None:
            do = torch.zeros_like(o)
        # Under create_graph=True (grad mode on in the backward) the op's registered autograd
        # refuses a double backward with a clear error; the plain launcher would return
        # gradients silently cut from the graph.
        compiled_or_graph = torch.compiler.is_compiling() or torch.is_grad_enabled()
        backward = _attention_bwd_op if compiled_or_graph else _attention_bwd
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


def triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention with the Triton kernels; differentiable w.r.t. q, k, v.

    Inputs are validated by :func:`transfusion_fast.ops.attention.check_attention_inputs` (call
    :func:`transfusion_fast.ops.attention` for the validated entry point). Returns ``o``
    ``(Tq, Hq, D)`` in q's dtype and ``lse`` ``(Hq, Tq)`` float32; both have gradients.
    """
    _check_kernel_inputs(q, k, layout)
    config = tile_config(q.shape[2], q.dtype, gpu_arch(q.device))
    fwd, dkdv, dq = tile_tables(layout, config)
    return _TritonAttention.apply(q, k, v, layout.kv_start, layout.kv_end, fwd, dkdv, dq,
                                  float(scale), config.as_list())
