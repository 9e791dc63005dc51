"""Launching Triton kernels with little host time: a cache of compiled kernels per specialization.

``kernel[grid](*args)`` makes ``JITFunction.run`` bind and specialize every argument and rebuild
its cache key before each launch. For kernels with many arguments on small problems that host work
takes longer than the kernel, and the GPU waits for the host. :class:`Launcher` keeps the
``CompiledKernel`` of each specialization and launches it directly. The host arithmetic helpers are
plain Python for the same reason (``triton.cdiv`` / ``next_power_of_2`` are constexpr functions
with a costly host call path).
"""
from __future__ import annotations

import torch
from triton.compiler import CompiledKernel

__all__ = ["Launcher", "specialization", "cdiv", "next_power_of_2"]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def specialization(arg) -> tuple:
    """What Triton specializes a kernel on, for one argument, or finer: a tensor's dtype and
    16-byte alignment; an int's being 1, a multiple of 16, and its width (i32 / i64 / u64)."""
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() % 16 == 0
    if isinstance(arg, int):
        width = 32 if -2**31 <= arg < 2**31 else 64 if arg < 2**63 else 65
        return arg == 1, arg % 16 == 0, width
    return (type(arg),)


class Launcher:
    """``kernel[grid](*args, **constexprs)`` without Triton's argument binding on every call.

    The CompiledKernel that the JIT returns launches directly (``compiled[grid](*args)``); one is
    kept per specialization key, a key at least as fine as Triton's own (:func:`specialization`,
    the constexprs, warps, stages, register cap and the current device), so no call runs a binary compiled for
    other argument properties. The first call of each key, and every call under TRITON_INTERPRET
    (nothing compiled), goes through the JIT. The kernel's constexprs must be its trailing
    parameters (checked on the first compiled launch).
    """

    def __init__(self, kernel):
        self.kernel = kernel
        self.compiled: dict[tuple, tuple] = {}

    def __call__(self, grid: tuple, *args, num_warps: int, num_stages: int, maxnreg: int | None = None,
                 **constexprs):
        key = (torch.cuda.current_device() if torch.cuda.is_initialized() else -1, num_warps,
               num_stages, maxnreg, *constexprs.items(), *map(specialization, args))
        hit = self.compiled.get(key)
        if hit is not None:
            compiled, constexpr_values = hit
            compiled[(*grid, 1, 1)[:3]](*args, *constexpr_values)    # it takes a 3-D grid
            return
        options = {} if maxnreg is None else {"maxnreg": maxnreg}
        compiled = self.kernel[grid](*args, num_warps=num_warps, num_stages=num_stages,
                                     **options, **constexprs)
        if isinstance(compiled, CompiledKernel):
            # the launcher takes every parameter in order, the constexprs last
            names = self.kernel.arg_names[len(args):]
            if sorted(names) != sorted(constexprs):
                raise RuntimeError(f"{self.kernel.fn.__name__}: constexprs {sorted(constexprs)} "
                                   f"are not its trailing parameters {names}")
            self.compiled[key] = compiled, tuple(constexprs[name] for name in names)
