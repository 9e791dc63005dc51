"""Ahead-of-time compilation of Triton kernels for sm_80 / sm_90a without a GPU, with ptxas figures.

``compile_report(specs)`` compiles each :class:`KernelSpec` in a subprocess where
``TRITON_INTERPRET`` is unset (under the interpreter ``@triton.jit`` yields interpreted functions
that cannot be compiled), runs the ``ptxas`` bundled with Triton with ``-v`` on the PTX, and returns
one :class:`KernelReport` per (spec, arch): registers, spill bytes, shared memory and whether
tensor-core instructions (``mma.sync`` / ``wgmma``) appear. Used by the kernel tests and by the
static kernel report of the benchmark suite.

Each kernel file's ``aot_specs()`` lists its shipped configs; :func:`kernel_signature` derives a
kernel's Triton signature from its parameter names, so no signature is written by hand.

Command line: ``python -m transfusion_fast.aot < specs.json`` prints the reports as JSON.
"""
from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

__all__ = ["KernelSpec", "KernelReport", "compile_report", "kernel_signature", "ARCHS", "TRITON_DTYPES"]

ARCHS = (80, 90)
#: torch dtype -> its name in a Triton signature
TRITON_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def kernel_signature(kernel, constexprs: dict, data: str, types: dict | None = None) -> dict:
    """The Triton signature of the ``@triton.jit`` function ``kernel``, in parameter order, from the
    naming convention of this package's kernels: ``"constexpr"`` for a name in ``constexprs``; a
    pointer to the data type ``data`` (``"fp16"``, ``"bf16"``, ``"fp32"``) for an UPPER-CASE name
    (a tensor); ``"i32"`` for a lower-case one (strides, sizes). ``types`` gives the exceptions by
    name (fp32 statistics, int32 tables, float scalars); names it holds that ``kernel`` lacks are
    ignored, so one dict can serve the kernels of a family."""
    types = types or {}
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in types:
            signature[name] = types[name]
        else:
            signature[name] = f"*{data}" if name.isupper() else "i32"
    return signature


@dataclass
class KernelSpec:
    """One kernel configuration: ``module:kernel`` with its Triton signature and constexprs."""

    module: str                      # e.g. "transfusion_fast.kernels.attention"
    kernel: str                      # e.g. "_attn_fwd"
    signature: dict                  # argument name -> Triton type ("*fp16", "i32", "constexpr", ...)
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    label: str = ""                  # a human-readable name for reports
    #: arguments the JIT would see as multiples of 16 (pointers from torch's allocator, strides of
    #: packed tensors): compiled with ``tt.divisibility=16`` as the JIT specializes them, so that
    #: the register counts are those of the kernels that run (wider vector loads, fewer registers)
    divisible_by_16: tuple = ()
    #: the ``maxnreg`` option (PTX ``.maxnreg``) the kernel is launched with, if any
    maxnreg: int | None = None


@dataclass
class KernelReport:
    label: str
    kernel: str
    arch: str                        # "sm_80" / "sm_90a"
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int                # Triton's dynamic shared memory (metadata.shared)
    tensor_cores: bool
    num_warps: int
    num_stages: int
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and self.spill_stores == 0 and self.spill_loads == 0


def _ptxas() -> str:
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(path):
        raise RuntimeError(f"ptxas not found at {path} (it ships with triton's NVIDIA backend)")
    return path


def _ptxas_figures(ptx: str, gpu_name: str) -> tuple[int, int, int]:
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([_ptxas(), "-v", f"--gpu-name={gpu_name}", src, "-o",
                              os.path.join(tmp, "kernel.cubin")], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"ptxas failed: {out.stderr.strip()}")
    text = out.stderr + out.stdout
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return (int(regs.group(1)) if regs else -1,
            int(spills.group(1)) if spills else 0, int(spills.group(2)) if spills else 0)


def _compile_one(spec: KernelSpec, arch: int) -> KernelReport:
    gpu_name = "sm_90a" if arch == 90 else f"sm_{arch}"
    label = spec.label or spec.kernel
    try:
        fn = getattr(importlib.import_module(spec.module), spec.kernel)
        attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]]
                 for name in spec.divisible_by_16}
        src = ASTSource(fn=fn, signature=spec.signature, constexprs=spec.constexprs, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": spec.num_warps, "num_stages": spec.num_stages,
                                           **({} if spec.maxnreg is None else {"maxnreg": spec.maxnreg})})
        ptx = compiled.asm["ptx"]
        regs, st, ld = _ptxas_figures(ptx, gpu_name)
        tensor_cores = ("mma.sync" in ptx) or ("wgmma" in ptx)
        return KernelReport(label, spec.kernel, gpu_name, regs, st, ld, int(compiled.metadata.shared),
                            tensor_cores, spec.num_warps, spec.num_stages)
    except Exception as error:  # reported per config; the caller asserts on it
        return KernelReport(label, spec.kernel, gpu_name, -1, 0, 0, 0, False, spec.num_warps,
                            spec.num_stages, error=f"{type(error).__name__}: {error}")


def compile_report(specs: list[KernelSpec], archs=ARCHS, timeout: float = 900) -> list[KernelReport]:
    """AOT-compile every spec for every arch in a clean subprocess; one report per (spec, arch)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    payload = json.dumps({"archs": list(archs), "specs": [asdict(s) for s in specs]})
    out = subprocess.run([sys.executable, "-m", "transfusion_fast.aot"], input=payload, text=True,
                         capture_output=True, env=env, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"AOT compile subprocess failed:\n{out.stderr[-4000:]}")
    return [KernelReport(**r) for r in json.loads(out.stdout.strip().splitlines()[-1])]


def _main() -> None:
    request = json.loads(sys.stdin.read())
    reports = [asdict(_compile_one(KernelSpec(**spec), arch))
               for spec in request["specs"] for arch in request["archs"]]
    sys.stdout.write(json.dumps(reports) + "\n")


if __name__ == "__main__":
    _main()
