"""Ahead-of-time compile of the shipped attention kernel configs for sm_80 and sm_90a (no GPU
needed): zero register spills, tensor-core instructions in the fwd / dK,dV / dQ kernels, shared
memory within each architecture's per-block limit, for the fast kernels and for the exact kernels
that recompute non-finite tiles. ``pytest -s`` prints the register table.

Compiling all 144 (config, arch) pairs takes several minutes on a small CI machine, so the test
compiles one head_dim per distinct tile configuration and architecture, both dtypes appearing;
the benchmark's static kernel report compiles the full ``aot_specs()`` list.
"""
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from transfusion_fast.aot import compile_report
from transfusion_fast.kernels.attention import tile_config
from transfusion_fast.kernels.attention_diagnostics import aot_specs
from transfusion_fast.ops.attention import SUPPORTED_HEAD_DIMS

# Max dynamic shared memory per block: A100 163 KB, H100 227 KB.
SHARED_LIMIT = {"sm_80": 163 * 1024, "sm_90a": 227 * 1024}
KERNELS = ("fwd", "dkdv", "dq", "fwd_exact", "dkdv_exact", "dq_exact")
# (head_dim, dtype label, arch) compiled by the test: each distinct tile configuration (small,
# medium and large head dims on each architecture) once, alternating the dtype.
REPRESENTATIVE = [(64, "fp16", 80), (64, "bf16", 90), (128, "bf16", 80), (96, "fp16", 90),
                  (128, "fp16", 90), (256, "fp16", 80), (256, "bf16", 90)]


def _key(spec):
    kernel, dim, dtype = spec.label.split()[:3]
    return kernel, int(dim[1:]), dtype, int(spec.label.rsplit("@sm", 1)[1])


def test_aot_specs_cover_every_shipped_config():
    specs = aot_specs()
    keys = [_key(s) for s in specs]
    assert len(set(keys)) == len(keys) == len(KERNELS) * len(SUPPORTED_HEAD_DIMS) * 2 * 2
    assert len({s.label for s in specs}) == len(specs)
    for spec in specs:
        kernel, head_dim, dtype, arch = _key(spec)
        assert spec.constexprs["HEAD_DIM"] == head_dim
        config = tile_config(head_dim, torch.float16, arch)
        block = {"fwd": (config.fwd_block_m, config.fwd_block_n),
                 "dkdv": (config.dkdv_block_m, config.dkdv_block_n),
                 "dq": (config.dq_block_m, config.dq_block_n)}[kernel.removesuffix("_exact")]
        assert (spec.constexprs["BLOCK_M"], spec.constexprs["BLOCK_N"]) == block
        if kernel.endswith("_exact"):   # the non-finite path: its fast kernel's tiles, no register cap
            assert "COUNT_WORK" not in spec.constexprs and spec.maxnreg == 255 and spec.num_stages == 1
        else:
            assert spec.constexprs["COUNT_WORK"] is False and spec.maxnreg is None
    assert {len(aot_specs(80)), len(aot_specs(90))} == {len(specs) // 2}


@pytest.mark.slow
def test_representative_configs_compile_without_spills():
    chosen = {(d, t, a) for d, t, a in REPRESENTATIVE}
    by_arch = {80: [], 90: []}
    for spec in aot_specs():
        kernel, head_dim, dtype, arch = _key(spec)
        if (head_dim, dtype, arch) in chosen:
            by_arch[arch].append(spec)
    with ThreadPoolExecutor(2) as pool:   # one compile subprocess per architecture
        batches = pool.map(lambda arch: compile_report(by_arch[arch], archs=(arch,)), by_arch)
        reports = [r for batch in batches for r in batch]
    assert len(reports) == sum(len(s) for s in by_arch.values())
    print(f"\n{'config':44s} {'arch':7s} {'regs':>5s} {'spills':>7s} {'shared':>8s} tensor-cores")
    for r in reports:
        print(f"{r.label:44s} {r.arch:7s} {r.registers:5d} {r.spill_stores + r.spill_loads:7d} "
              f"{r.shared_bytes:8d} {r.tensor_cores}")
    for r in reports:
        assert not r.error, f"{r.label} on {r.arch}: {r.error}"
        assert r.spill_stores == 0 and r.spill_loads == 0, f"{r.label} on {r.arch} spills: {r}"
        assert 0 < r.registers <= 255
        assert r.shared_bytes <= SHARED_LIMIT[r.arch], f"{r.label} on {r.arch}: {r.shared_bytes} B"
        assert r.tensor_cores, f"{r.label} on {r.arch}: no mma/wgmma in the PTX"
