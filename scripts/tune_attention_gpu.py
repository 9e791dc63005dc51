"""Tile-size sweep of the Triton attention kernels on a CUDA GPU (run through scripts/gpu_session.sh).

    python scripts/tune_attention_gpu.py [--head-dims 64 128] [--copies 8] [--json PATH] [--combined]

For each head_dim (bf16, heads = 2048 // head_dim, the Transfusion layout of the attention bench),
times the forward and the backward with candidate tile configs, one kernel varied at a time (the
others at the shipped config), with ``triton.testing.do_bench`` (median). Each candidate's outputs
are compared with those of the shipped config (relative error of the norm): a candidate that
disagrees is reported as wrong, never as fast. The shipped table in kernels/attention.py is edited
by hand from this output.

``--combined`` times whole configs instead (COMBINED below: forward, backward and the public
``ops.attention`` forward+backward, the latter also by wall clock around a synchronized call, which
shows the host-side overhead of the custom op and the launches).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import torch
import triton

from transfusion_fast import ops
from transfusion_fast.kernels import attention as attn
from transfusion_fast.testing import random_qkv, transfusion_example

# (block_m, block_n, warps, stages) per kernel
FWD = [(128, 32, 8, 1), (128, 32, 8, 3), (128, 64, 8, 1), (128, 64, 8, 2), (128, 64, 8, 3),
       (128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2), (64, 128, 8, 3)]
DKDV = [(32, 32, 4, 2), (32, 64, 4, 2), (32, 64, 8, 3), (64, 64, 8, 2), (64, 64, 4, 3),
        (32, 128, 8, 2), (32, 128, 4, 3), (64, 128, 8, 2), (16, 64, 4, 3), (16, 128, 8, 3)]
DQ = [(64, 32, 4, 2), (64, 32, 8, 2), (128, 32, 8, 2), (64, 64, 4, 2), (64, 64, 8, 2), (64, 64, 8, 3),
      (128, 64, 8, 2), (128, 32, 4, 3), (128, 64, 8, 3)]


# whole configs (fwd bm, bn, warps, stages | dkdv bm, bn, warps, stages | dq bm, bn, warps, stages)
COMBINED = {
    64: [(64, 64, 4, 3, 64, 64, 4, 2, 64, 64, 4, 2), (64, 64, 4, 3, 64, 64, 4, 3, 64, 64, 4, 3),
         (64, 64, 4, 3, 64, 64, 4, 2, 128, 64, 8, 3), (128, 64, 8, 3, 64, 64, 4, 2, 64, 64, 4, 2)],
    128: [(128, 64, 8, 3, 32, 64, 4, 2, 128, 64, 8, 3), (128, 64, 8, 3, 32, 64, 4, 2, 64, 32, 4, 2),
          (128, 64, 8, 3, 16, 64, 4, 3, 128, 64, 8, 3), (128, 64, 8, 3, 16, 64, 4, 2, 128, 64, 8, 3),
          (128, 64, 8, 3, 32, 64, 4, 2, 64, 64, 4, 2)],
}


def wall_ms(fn, rounds: int = 30) -> float:
    """Min over synchronized calls by the host clock: kernel time plus host overhead."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def save_rows(path: str | None, rows: list[dict]) -> None:
    """The measured rows as JSON at ``path`` (``--json``), if one was given."""
    if path:
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)


def bench_inputs(layout, head_dim: int):
    """bf16 q, k, v and dO for ``layout``, heads = 2048 // head_dim, as in the attention bench."""
    heads = 2048 // head_dim
    q, k, v = random_qkv(layout.num_keys, layout.num_keys, heads, heads, head_dim,
                         dtype=torch.bfloat16, device="cuda", seed=0)
    return heads, q, k, v, torch.randn_like(q)


def layer_calls(layout, q, k, v, grad_out):
    """``ops.attention`` forward (no grad) and forward+backward, as the bench times them."""
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]

    def forward():
        with torch.no_grad():
            return ops.attention(q, k, v, layout)

    def forward_backward():
        return torch.autograd.grad(ops.attention(*leaves, layout), leaves, grad_out)
    return forward, forward_backward


def _problem(head_dim: int, copies: int):
    """The bench's Transfusion layout (``copies`` documents), its inputs and the shipped tile
    config for this GPU."""
    layout = transfusion_example(7, 256, 32, num_sequences=copies, device="cuda")
    heads, q, k, v, do = bench_inputs(layout, head_dim)
    shipped = attn.tile_config(head_dim, torch.bfloat16, attn.gpu_arch(q.device))
    return layout, heads, q, k, v, do, shipped


def combined(head_dim: int, copies: int) -> list[dict]:
    layout, _, q, k, v, do, shipped = _problem(head_dim, copies)
    forward, forward_backward = layer_calls(layout, q, k, v, do)
    rows = []
    for values in [tuple(shipped.as_list())] + [c for c in COMBINED.get(head_dim, []) if c != tuple(shipped.as_list())]:
        config = attn.TileConfig.from_list(values)
        with attn.forced_tile_config(config):
            row = {"head_dim": head_dim, "config": values, "shipped": config == shipped,
                   "fwd_ms": triton.testing.do_bench(forward, warmup=25, rep=150, return_mode="median"),
                   "fwd_bwd_ms": triton.testing.do_bench(forward_backward, warmup=25, rep=150,
                                                         return_mode="median"),
                   "fwd_wall_ms": wall_ms(forward), "fwd_bwd_wall_ms": wall_ms(forward_backward)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def _with(config, kernel: str, cand) -> attn.TileConfig:
    bm, bn, w, s = cand
    if kernel == "fwd":
        return dataclasses.replace(config, fwd_block_m=bm, fwd_block_n=bn, fwd_warps=w, fwd_stages=s)
    if kernel == "dkdv":
        return dataclasses.replace(config, dkdv_block_m=bm, dkdv_block_n=bn, dkdv_warps=w, dkdv_stages=s)
    return dataclasses.replace(config, dq_block_m=bm, dq_block_n=bn, dq_warps=w, dq_stages=s)


def sweep(head_dim: int, copies: int) -> list[dict]:
    layout, heads, q, k, v, do, shipped = _problem(head_dim, copies)
    scale = head_dim ** -0.5
    visible = layout.visible_elements() * heads
    rows = []

    def run(config: attn.TileConfig):
        fwd, dkdv, dq = attn.tile_tables(layout, config)
        forward = lambda: attn.launch_forward(  # noqa: E731
            q, k, v, layout.kv_start, layout.kv_end, *attn.row_walk(fwd), scale, config)
        o, lse = forward()
        backward = lambda: attn.launch_backward(  # noqa: E731
            do, None, q, k, v, o, lse, layout.kv_start, layout.kv_end, *attn.column_walk(dkdv),
            *attn.row_walk(dq), scale, config)
        return forward, backward, (o, *backward())

    _, _, expected = run(shipped)
    for kernel, candidates in (("fwd", FWD), ("dkdv", DKDV), ("dq", DQ)):
        for cand in candidates:
            config = _with(shipped, kernel, cand)
            row = {"head_dim": head_dim, "T": layout.num_keys, "kernel": kernel,
                   "tiles": "%dx%d w%d s%d" % cand, "shipped": config == shipped}
            try:
                forward, backward, got = run(config)
                row["rel_err"] = max(_rel(a, b) for a, b in zip(got, expected))
                timed = forward if kernel == "fwd" else backward
                row["ms"] = triton.testing.do_bench(timed, warmup=25, rep=150, return_mode="median")
                flops = 4 * head_dim * visible * (1 if kernel == "fwd" else 2.5)
                row["tflops"] = flops / row["ms"] / 1e9
                row["ok"] = row["rel_err"] < 2e-2
            except Exception as error:  # a config that does not compile (shared memory) is a row
                row.update(ok=False, error=f"{type(error).__name__}: {str(error).splitlines()[0][:120]}")
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--copies", type=int, default=8)
    parser.add_argument("--json", default=None)
    parser.add_argument("--combined", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    if args.combined:
        rows = [r for d in args.head_dims for r in combined(d, args.copies)]
        print(f"\n{'d':>4} {'config':48} {'fwd':>7} {'fwd+bwd':>8} {'fwd wall':>9} {'f+b wall':>9}  (ms)")
        for r in rows:
            mark = "*" if r["shipped"] else " "
            print(f"{r['head_dim']:4d} {str(r['config']):47}{mark} {r['fwd_ms']:7.3f} {r['fwd_bwd_ms']:8.3f} "
                  f"{r['fwd_wall_ms']:9.3f} {r['fwd_bwd_wall_ms']:9.3f}")
        save_rows(args.json, rows)
        return 0
    rows = [r for d in args.head_dims for r in sweep(d, args.copies)]
    print(f"\n{'d':>4} {'kernel':6} {'tiles':16} {'ms':>8} {'TFLOP/s':>8} {'rel_err':>8}")
    for r in rows:
        mark = "*" if r["shipped"] else " "
        if "ms" in r:
            flag = "" if r["ok"] else "  WRONG"
            print(f"{r['head_dim']:4d} {r['kernel']:6} {r['tiles']:15}{mark} {r['ms']:8.3f} "
                  f"{r['tflops']:8.1f} {r['rel_err']:8.1e}{flag}")
        else:
            print(f"{r['head_dim']:4d} {r['kernel']:6} {r['tiles']:15}{mark} {r['error']}")
    save_rows(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
