"""Layout suite: building the mask representation, ours against FlexAttention's ``create_block_mask``.

Ours: ``Layout.transfusion(cu_seqlens, spans)`` plus its 128×128 tile table (the block size of
FlexAttention's BlockMask, so both produce the same granularity). Baselines: ``create_block_mask``
for the same mask (a ``mask_mod`` reading the layout's per-row intervals), plain and compiled
(``torch.compile(create_block_mask)``; compile time excluded by a warm-up round). Goal: at least 1000x faster.
Memory is the retained bytes of the built structure: O(T) for the Layout, O((T/128)²) for the
BlockMask. ``create_block_mask`` is quadratic in T: it is run only up to a cap (stated in the
summary) and nothing is extrapolated beyond it.
"""
from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

import benchlib
from benchlib import CONFIG, RECORD, Compare, measure
from transfusion_fast import Layout
from transfusion_fast.testing import transfusion_example

SUITE = "layout"
BLOCK = 128
THREADS = 1   # O(T) vector ops: one thread, and no OpenMP barrier stalls on a loaded machine

if CONFIG.full:
    SEQUENCES = (1, 4, 16, 64)          # x 2,048 tokens: T = 2k, 8k, 32k, 128k
    PLAIN_CAP, COMPILED_CAP = 8192, 8192
    LAYOUT = dict(num_images=7, patches_per_image=256, text_between=32)
else:
    SEQUENCES = (1, 4)                  # x 224 tokens
    PLAIN_CAP, COMPILED_CAP = 1024, 256     # one compile only: it dominates the smoke run
    LAYOUT = dict(num_images=2, patches_per_image=64, text_between=32)

IMPLS = ("ours", "cbm-plain", "cbm-compiled")


@functools.lru_cache(maxsize=None)
def _layout(sequences: int) -> Layout:
    return transfusion_example(num_sequences=sequences, device=CONFIG.device, **LAYOUT)


def _case(layout: Layout) -> str:
    return f"transfusion T={layout.num_keys}"


def _tensor_bytes(objects) -> int:
    seen, total = set(), 0
    for value in objects:
        if isinstance(value, torch.Tensor) and value.data_ptr() not in seen:
            seen.add(value.data_ptr())
            total += value.numel() * value.element_size()
    return total


def _layout_bytes(layout: Layout, table) -> int:
    return _tensor_bytes(list(vars(layout).values())
                         + [getattr(table, f.name) for f in dataclasses.fields(table)])


def _block_mask_fn(layout: Layout, compiled: bool):
    from torch.nn.attention.flex_attention import create_block_mask
    kv_start, kv_end = layout.kv_start, layout.kv_end

    def layout_mask(b, h, q_idx, kv_idx):
        return (kv_idx >= kv_start[q_idx]) & (kv_idx < kv_end[q_idx])

    make = torch.compile(create_block_mask, dynamic=False) if compiled else create_block_mask

    def build():
        return make(layout_mask, None, None, layout.num_queries, layout.num_keys,
                    device=CONFIG.device, BLOCK_SIZE=BLOCK)
    return build


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("sequences", SEQUENCES)
def test_layout_build(benchmark, sequences: int, impl: str):
    layout = _layout(sequences)
    total, case = layout.num_keys, _case(layout)
    cu, spans = layout.cu_seqlens.clone(), layout.spans.clone()
    with benchlib.num_threads(THREADS):
        if impl == "ours":
            def build():
                built = Layout.transfusion(cu, spans)
                return built, built.tile_table(BLOCK, BLOCK)
            built, table = measure(
                benchmark, build, suite=SUITE, case=case, impl="Layout+tile table", threads=THREADS,
                dtype=torch.int32, rounds=50 if total <= 32768 else 20, warmup=1,
                compare=(Compare("cbm-plain", "speedup", 1000.0), Compare("cbm-compiled", "speedup", 1000.0),
                         Compare("cbm-plain", "memory"), Compare("cbm-compiled", "memory")))
            benchmark.extra_info["retained_bytes"] = _layout_bytes(built, table)
            assert torch.equal(built.kv_end, layout.kv_end) and torch.equal(built.kv_start, layout.kv_start)
            return
        cap = PLAIN_CAP if impl == "cbm-plain" else COMPILED_CAP
        if total > cap:
            RECORD.mark_unavailable(SUITE, case, impl, f"not run above T={cap} (quadratic in T; "
                                    f"too slow for this machine's time budget); not extrapolated")
            assert total > cap
            return
        compiled = impl == "cbm-compiled"
        if compiled:
            works, why = benchlib.compile_works()
            if not works:
                RECORD.mark_unavailable(SUITE, case, impl, f"torch.compile unavailable: {why}")
                return
            torch._dynamo.reset()   # one static compile per T, never a silent eager fallback
        block_mask = measure(benchmark, _block_mask_fn(layout, compiled), suite=SUITE, case=case,
                             impl=impl, threads=THREADS, dtype=torch.int32, rounds=3, warmup=1)
    benchmark.extra_info["retained_bytes"] = _tensor_bytes(vars(block_mask).values())
    # Same mask, same granularity: the BlockMask visits exactly our tiles. (It may call fewer of
    # them full: a ragged last tile is never full for FlexAttention, it is for the Layout.)
    counts = layout.tile_counts(BLOCK, BLOCK)
    full = int(block_mask.full_kv_num_blocks.sum()) if block_mask.full_kv_num_blocks is not None else 0
    assert int(block_mask.kv_num_blocks.sum()) + full == counts["computed"]
    assert full <= counts["full"]
