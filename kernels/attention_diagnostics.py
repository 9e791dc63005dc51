"""Checks of the Triton attention that need no GPU: the work counter and the AOT config list.

* :func:`count_computed_tiles` runs the three kernels with ``COUNT_WORK`` on: each program records
  the tiles it computed, which a block-sparse schedule without waste makes equal to the minimal
  count the Layout gives (``tests/test_attention_triton.py`` asserts it on every tested layout).
* :func:`aot_specs` lists every shipped kernel config as a :class:`transfusion_fast.aot.KernelSpec`
  for the ahead-of-time compile (registers, spills, shared memory per config, without a GPU).
"""
from __future__ import annotations

import torch

from transfusion_fast.aot import KernelSpec, kernel_signature
from transfusion_fast.layout import Layout

from .attention import (column_walk, dot_precision, gpu_arch, launch_backward, launch_forward, row_walk,
                        tile_tables)
from .attention_exact import (EXACT_MAXNREG, EXACT_WARPS, attn_bwd_dkdv_exact, attn_bwd_dq_exact,
                              attn_fwd_exact)
from .attention_kernels import attn_bwd_dkdv, attn_bwd_dq, attn_fwd
from .attention_tiles import HALF_CONFIGS, SUPPORTED_HEAD_DIMS, tile_config
from .launch import next_power_of_2

__all__ = ["count_computed_tiles", "aot_specs"]


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
    config = tile_config(head_dim, dtype, gpu_arch(device))
    fwd, dkdv, dq = tile_tables(layout, config)
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
    o, lse = launch_forward(q, k, v, layout.kv_start, layout.kv_end, *row_walk(fwd), scale,
                            config, work["fwd"])
    launch_backward(torch.randn(o.shape, generator=gen).to(device, dtype), None, q, k, v, o, lse,
                    layout.kv_start, layout.kv_end, *column_walk(dkdv), *row_walk(dq), scale,
                    config, work["dkdv"], work["dq"])
    return {name: {"computed": int(work[name][0].sum()), "unmasked": int(work[name][1].sum()),
                   "minimal": table.counts()["computed"] * num_q_heads,
                   "block": (table.block_m, table.block_n)}
            for name, table in (("fwd", fwd), ("dkdv", dkdv), ("dq", dq))}


# ================================================================================== AOT specs
_KERNELS = {"fwd": attn_fwd, "dkdv": attn_bwd_dkdv, "dq": attn_bwd_dq, "fwd_exact": attn_fwd_exact,
            "dkdv_exact": attn_bwd_dkdv_exact, "dq_exact": attn_bwd_dq_exact}
_AOT_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16"}
#: the parameters that are not tensors of the input dtype or int32 sizes and strides
_TYPES = {"LSE": "*fp32", "DELTA": "*fp32", "DLSE": "*fp32", "qk_scale_log2": "fp32", "scale": "fp32",
          **{table: "*i32" for table in ("KV_START", "KV_END", "KV_LO", "KV_HI", "KV_FULL_LO",
                                         "KV_FULL_HI", "M_ORDER", "Q_LO", "Q_HI", "Q_FULL_LO",
                                         "Q_FULL_HI", "N_ORDER", "FLAGS", "WORK")}}


def _divisible_by_16(signature: dict) -> tuple:
    """What the JIT specializes as multiples of 16 for packed inputs: every tensor pointer (torch
    allocations are 16-byte aligned) and every stride (each supported head_dim is a multiple of
    16, hence so are the token and head strides of packed and fused-qkv tensors)."""
    return tuple(name for name, kind in signature.items()
                 if kind.startswith("*") or name.startswith("stride_"))


def aot_specs(arch: int | None = None) -> list[KernelSpec]:
    """Every shipped kernel config as a :class:`transfusion_fast.aot.KernelSpec`, labelled.

    One spec per (kernel in fwd / dkdv / dq and their exact kernels, head_dim, fp16 | bf16,
    arch); the
    label ends in ``@sm80`` / ``@sm90``: compile each spec for its own arch, e.g.
    ``compile_report(aot_specs(90), archs=(90,))``. ``arch=None`` returns both generations.
    """
    specs = []
    for gen in ((80, 90) if arch is None else (arch,)):
        for head_dim in SUPPORTED_HEAD_DIMS:
            for dtype, data_type in _AOT_DTYPES.items():
                config = HALF_CONFIGS[(gen, head_dim)]
                attn = dict(HEAD_DIM=head_dim, BLOCK_D=next_power_of_2(head_dim), GROUP=1,
                            DOT_PRECISION=dot_precision(dtype))
                fwd = dict(attn, BLOCK_M=config.fwd_block_m, BLOCK_N=config.fwd_block_n)
                dkdv = dict(attn, BLOCK_M=config.dkdv_block_m, BLOCK_N=config.dkdv_block_n)
                dq = dict(attn, BLOCK_M=config.dq_block_m, BLOCK_N=config.dq_block_n)
                kernels = {
                    "fwd": (dict(fwd, COUNT_WORK=False), config.fwd_warps, config.fwd_stages),
                    "dkdv": (dict(dkdv, COUNT_WORK=False), config.dkdv_warps, config.dkdv_stages),
                    "dq": (dict(dq, HAS_DLSE=False, COUNT_WORK=False), config.dq_warps,
                           config.dq_stages),
                    "fwd_exact": (fwd, EXACT_WARPS, 1),
                    "dkdv_exact": (dkdv, EXACT_WARPS, 1),
                    "dq_exact": (dq, EXACT_WARPS, 1),
                }
                for name, (constexprs, warps, stages) in kernels.items():
                    kernel = _KERNELS[name]
                    blocks = f" {constexprs['BLOCK_M']}x{constexprs['BLOCK_N']}"
                    signature = kernel_signature(kernel, constexprs, data_type, _TYPES)
                    specs.append(KernelSpec(
                        module=kernel.fn.__module__, kernel=kernel.fn.__name__,
                        signature=signature, constexprs=constexprs,
                        num_warps=warps, num_stages=stages,
                        maxnreg=EXACT_MAXNREG if name.endswith("_exact") else None,
                        divisible_by_16=_divisible_by_16(signature),
                        label=f"{name} d{head_dim} {data_type}{blocks} w{warps}s{stages} @sm{gen}"))
    return specs
