"""Where the time of one ``ops.attention`` call goes on a CUDA GPU: the host or the device.

    python scripts/attention_time_split.py [--json PATH] [--rounds 30]

For the attention bench's GPU layouts (bf16, heads = 2048 // head_dim), forward and
forward+backward:

* ``wall``: min over synchronized calls, as the bench times them;
* ``device``: ``--rounds`` calls queued behind a long ``torch.cuda._sleep``, CUDA events around
  them, per call: the GPU never waits for the host, so this is the kernels' time alone;
* ``host``: the time to enqueue those calls, per call (Python, autograd, launches);
* ``kernels``: device time per call of each kernel, from ``torch.profiler``.

``wall`` close to ``host`` means the call is host-bound at that size: faster kernels would not
show, less host work would.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict

import torch

from transfusion_fast.layout import Layout
from transfusion_fast.testing import transfusion_example
# scripts/ is on sys.path when this file runs
from tune_attention_gpu import bench_inputs, layer_calls, save_rows, wall_ms


def _cases():
    def single(total, bidirectional):
        cu = torch.tensor([0, total], dtype=torch.int32, device="cuda")
        return Layout.bidirectional(cu) if bidirectional else Layout.causal(cu)
    for head_dim in (64, 128):
        for copies in (1, 2, 4, 8):
            yield (f"transfusion x{copies} T={2048 * copies} D={head_dim}", head_dim,
                   lambda n=copies: transfusion_example(7, 256, 32, num_sequences=n, device="cuda"))
    yield "bidirectional T=4096 D=128", 128, lambda: single(4096, True)
    yield "causal T=16384 D=128", 128, lambda: single(16384, False)


def _device_and_host_us(fn, rounds: int) -> tuple[float, float, bool]:
    """(device µs per call, host µs per call, whether the sleep covered the whole enqueue)."""
    fn()
    torch.cuda.synchronize()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(200_000_000)           # ~0.1 s at H100 clocks: longer than the enqueue
    begin.record()
    start = time.perf_counter()
    for _ in range(rounds):
        fn()
    host = (time.perf_counter() - start) / rounds
    end.record()
    covered = not begin.query()              # the sleep was still running when we finished
    torch.cuda.synchronize()
    return begin.elapsed_time(end) * 1e3 / rounds, host * 1e6, covered


def _kernel_us(fn, rounds: int) -> dict:
    try:
        return _profiled_kernel_us(fn, rounds)
    except Exception as error:   # the profiler's event API moves between torch versions
        return {"error": f"{type(error).__name__}: {error}"[:200]}


def _profiled_kernel_us(fn, rounds: int) -> dict:
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(rounds):
            fn()
        torch.cuda.synchronize()
    totals = defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name] += event.device_time / rounds
    return {name: round(us, 2) for name, us in sorted(totals.items(), key=lambda kv: -kv[1])}


def _profile_host(fn, calls: int) -> None:
    import cProfile
    import pstats

    def run():
        for _ in range(calls):
            fn()
            torch.cuda.synchronize()
    run()
    profiler = cProfile.Profile()
    profiler.runcall(run)
    stats = pstats.Stats(profiler)
    stats.sort_stats("tottime").print_stats(30)
    stats.sort_stats("cumtime").print_stats(30)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--label", default="", help="a name for this build in the output")
    parser.add_argument("--profile-host", type=int, default=0, metavar="CALLS",
                        help="instead: cProfile CALLS synchronized forward+backward calls of the "
                             "first case and print where the host time goes")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    rows = []
    for name, head_dim, build in _cases():
        layout = build()
        _, q, k, v, grad_out = bench_inputs(layout, head_dim)
        forward, forward_backward = layer_calls(layout, q, k, v, grad_out)
        if args.profile_host:
            _profile_host(forward_backward, args.profile_host)
            return 0
        for pass_, fn in (("fwd", forward), ("fwd+bwd", forward_backward)):
            device, host, covered = _device_and_host_us(fn, args.rounds)
            row = {"label": args.label, "case": name, "pass": pass_,
                   "wall_us": round(wall_ms(fn, args.rounds) * 1e3, 1), "device_us": round(device, 1),
                   "host_us": round(host, 1), "sleep_covered_enqueue": covered,
                   "kernels_us": _kernel_us(fn, 10)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{'case':34} {'pass':8} {'wall':>8} {'device':>8} {'host':>8}  (µs per call) {args.label}")
    for r in rows:
        print(f"{r['case']:34} {r['pass']:8} {r['wall_us']:8.1f} {r['device_us']:8.1f} "
              f"{r['host_us']:8.1f}{'' if r['sleep_covered_enqueue'] else '  (sleep too short)'}")
    save_rows(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
