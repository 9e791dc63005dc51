"""Tile sizes of the Triton attention kernels: block sizes, warps and pipeline stages per kernel,
per head_dim, dtype and GPU generation (sm_80 / sm_90).

:func:`tile_config` gives the shipped configuration; :func:`forced_tile_sizes` and
:func:`forced_tile_config` override it inside a block (tests use tiny tiles to exercise many
tiles; the tuning script sweeps candidates). ``SUPPORTED_HEAD_DIMS`` are the head dims that have a
shipped configuration: every implementation of :func:`transfusion_fast.ops.attention` accepts
exactly these. This module imports only torch, so that the ops can read the supported head dims
without loading the Triton path.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

__all__ = ["TileConfig", "tile_config", "forced_tile_sizes", "forced_tile_config", "SUPPORTED_HEAD_DIMS",
           "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class TileConfig:
    """Block sizes, warps and pipeline stages of the forward and of the two backward kernels."""

    fwd_block_m: int
    fwd_block_n: int
    fwd_warps: int
    fwd_stages: int
    dkdv_block_m: int
    dkdv_block_n: int
    dkdv_warps: int
    dkdv_stages: int
    dq_block_m: int
    dq_block_n: int
    dq_warps: int
    dq_stages: int

    def as_list(self) -> list[int]:
        return [self.fwd_block_m, self.fwd_block_n, self.fwd_warps, self.fwd_stages,
                self.dkdv_block_m, self.dkdv_block_n, self.dkdv_warps, self.dkdv_stages,
                self.dq_block_m, self.dq_block_n, self.dq_warps, self.dq_stages]

    @classmethod
    def from_list(cls, values) -> "TileConfig":
        return cls(*[int(v) for v in values])


# (arch, head_dim) -> config for 16-bit inputs. The register budget decides: the forward holds an
# fp32 (BLOCK_M, D) accumulator with Q; dK/dV two fp32 (BLOCK_N, D) accumulators with K and V,
# so it takes few query rows per step (BLOCK_M = 32); dQ one (BLOCK_M, D) accumulator with Q and
# dO, so few keys per step (BLOCK_N = 32), as in FlashAttention-2. Every entry compiles with zero
# spills on sm_80 and sm_90a (tests/test_attention_triton_aot.py, figures in docs/performance.md);
# large head dims take smaller tiles, more warps and no software pipelining to stay spill-free.
_SMALL_D = dict(fwd_block_m=128, fwd_block_n=64, fwd_warps=8, fwd_stages=2, dkdv_block_m=32,
                dkdv_block_n=64, dkdv_warps=4, dkdv_stages=2, dq_block_m=64, dq_block_n=32,
                dq_warps=4, dq_stages=2)
_MEDIUM_D = dict(_SMALL_D, fwd_stages=1, dkdv_warps=8, dq_warps=8)
_LARGE_D = dict(fwd_block_m=64, fwd_block_n=32, fwd_warps=8, fwd_stages=1, dkdv_block_m=32,
                dkdv_block_n=32, dkdv_warps=8, dkdv_stages=1, dq_block_m=16, dq_block_n=32,
                dq_warps=4, dq_stages=1)
# sm_90, chosen with scripts/tune_attention_gpu.py on an H100 (bf16, the attention bench's
# 16k-token Transfusion layout, one kernel varied at a time; the figures are in docs/gpu.md):
# 64-row forward tiles with 4 warps and a 3-stage pipeline at D = 64 (fewer partial tiles per row,
# more programs), square 64 x 64 backward tiles at D = 64. At D >= 96 the 64-row forward spills in
# fp16, so it takes 128 x 64 with 8 warps; dK/dV keeps 32 query rows per step (64 spills), with 8
# warps (4 warps spill under Triton 3.6, torch 2.11's, at D = 96 and 128). Since dQ
# also computes delta, its 64 x 64 / 4-warp tile spills at D = 128: it takes 128 x 64 with 8 warps
# and 3 stages, the fastest of a whole-backward sweep. D = 96 (padded to 128) keeps a 64 x 32 dQ.
_SM90_D64 = dict(fwd_block_m=64, fwd_block_n=64, fwd_warps=4, fwd_stages=3, dkdv_block_m=64,
                 dkdv_block_n=64, dkdv_warps=4, dkdv_stages=2, dq_block_m=64, dq_block_n=64,
                 dq_warps=4, dq_stages=2)
_SM90_D128 = dict(_SM90_D64, fwd_block_m=128, fwd_warps=8, dkdv_block_m=32, dkdv_warps=8,
                  dq_block_m=128, dq_warps=8, dq_stages=3)
_SM90 = {
    "small": _SM90_D64,
    "medium": dict(_SM90_D128, dq_block_m=64, dq_block_n=32, dq_warps=4, dq_stages=2),
    "d128": _SM90_D128,
    "large": dict(_LARGE_D, fwd_block_m=32, dkdv_warps=8, dq_warps=8),
}
_SM80 = {"small": _SMALL_D, "medium": _MEDIUM_D, "d128": _MEDIUM_D, "large": _LARGE_D}
#: head_dim -> its row of the tables above; the keys are the supported head dims
_SIZE_OF_HEAD_DIM = {16: "small", 32: "small", 64: "small", 96: "medium", 128: "d128", 256: "large"}
SUPPORTED_HEAD_DIMS = tuple(_SIZE_OF_HEAD_DIM)
#: (arch, head_dim) -> the shipped config for fp16 / bf16 inputs
HALF_CONFIGS = {
    (arch, dim): TileConfig(**table[size])
    for arch, table in ((80, _SM80), (90, _SM90))
    for dim, size in _SIZE_OF_HEAD_DIM.items()
}
# fp32 inputs use IEEE fp32 dots (no tensor cores, no TF32 rounding): the exact-math path. Its
# FMA-based dot needs far more registers per tile than mma, hence small tiles (spill-free on
# sm_80 and sm_90a, checked with the same AOT compile, not part of aot_specs()).
_FP32_CONFIGS = {
    "small": TileConfig(32, 32, 8, 1, 16, 32, 4, 1, 32, 16, 4, 1),
    "medium": TileConfig(32, 16, 8, 1, 16, 16, 4, 1, 32, 16, 8, 1),
    "large": TileConfig(16, 16, 8, 1, 16, 16, 8, 1, 16, 16, 8, 1),
}

_forced_config: TileConfig | None = None


def tile_config(head_dim: int, dtype: torch.dtype, arch: int = 80) -> TileConfig:
    """The shipped tile sizes for ``head_dim``, ``dtype`` and GPU generation ``arch`` (80 or 90).

    :func:`forced_tile_sizes` / :func:`forced_tile_config` override it.
    """
    if _forced_config is not None:
        return _forced_config
    if dtype == torch.float32:
        return _FP32_CONFIGS["small" if head_dim <= 64 else "medium" if head_dim <= 128 else "large"]
    key = (90 if arch >= 90 else 80, int(head_dim))
    if key not in HALF_CONFIGS or dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"no Triton attention config for head_dim={head_dim}, dtype={dtype}, "
                         f"arch=sm_{arch}")
    return HALF_CONFIGS[key]


@contextlib.contextmanager
def forced_tile_config(config: TileConfig):
    """Every kernel uses ``config`` inside the block, whatever the head_dim, dtype and GPU."""
    global _forced_config
    if not isinstance(config, TileConfig):
        raise TypeError(f"config must be a TileConfig, got {type(config).__name__}")
    previous = _forced_config
    _forced_config = config
    try:
        yield config
    finally:
        _forced_config = previous


@contextlib.contextmanager
def forced_tile_sizes(block_m: int, block_n: int, num_warps: int = 4, num_stages: int = 1):
    """Every kernel uses ``block_m`` × ``block_n`` tiles inside the block (for tests)."""
    for name, value in (("block_m", block_m), ("block_n", block_n)):
        if not isinstance(value, int) or value < 16 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two >= 16 (tl.dot minimum), got {value!r}")
    with forced_tile_config(TileConfig(*[block_m, block_n, num_warps, num_stages] * 3)) as config:
        yield config
