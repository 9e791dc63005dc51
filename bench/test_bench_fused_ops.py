"""Fused elementwise ops suite: RoPE, SwiGLU, RMSNorm, forward and forward+backward.

``ours`` is the public op under backend ``auto``: the Triton kernels on CUDA; on CPU it runs the
reference composition (ATen's own kernels), so the CPU ratios against eager are ~1 by design and
the figure that predicts the GPU speed-up of these memory-bound kernels is the memory model:
bytes moved per element by the eager composition (counted op by op while it runs) against the
bytes a fused kernel must move (its inputs read once, its outputs written once, computed from the
shapes). On CUDA the summary also shows GB/s of the fused minimum.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import benchlib
from benchlib import CONFIG, RECORD, Compare, measure
from transfusion_fast import ops

SUITE = "fused ops"
PASSES = ("fwd", "fwd+bwd")
IMPLS = ("ours", "eager", "compiled")
THREADS = 2


@dataclass(frozen=True, eq=False)
class FusedCase:
    name: str
    make_inputs: Callable[[], tuple]              # differentiable inputs first, then the rest
    differentiable: int                            # how many leading inputs get gradients
    ours: Callable
    reference: Callable
    #: bytes a fused kernel moves: (inputs, outputs) forward and (grad_outputs, inputs) backward
    fused_bytes: Callable[[tuple, tuple, str], int]
    primary_elements: Callable[[tuple], int]       # the "element" of bytes per element


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _sizes():
    if not CONFIG.full:
        return dict(tokens=64, heads=2, kv_heads=1, head_dim=32, ffn=96, hidden=80)
    if CONFIG.on_gpu:
        return dict(tokens=16384, heads=32, kv_heads=8, head_dim=128, ffn=8192, hidden=4096)
    return dict(tokens=4096, heads=8, kv_heads=2, head_dim=64, ffn=2048, hidden=1024)


SIZES = _sizes()
DTYPE = torch.bfloat16 if CONFIG.on_gpu else torch.float32


def _randn(*shape):
    return torch.randn(*shape, device=benchlib.device(), dtype=DTYPE)


def _rope_inputs():
    s = SIZES
    positions = (torch.arange(s["tokens"], device=benchlib.device()) % 512).to(torch.int32)
    return (_randn(s["tokens"], s["heads"], s["head_dim"]),
            _randn(s["tokens"], s["kv_heads"], s["head_dim"]), positions)


def _rope_fused_bytes(inputs, outputs, pass_):
    q, k, positions = inputs
    # forward: read q, k, positions; write q_rot, k_rot (cos/sin computed in registers).
    # backward: the inverse rotation of the two output gradients: same traffic.
    return _nbytes(q, k, positions) + _nbytes(*outputs)


def _swiglu_fused_bytes(inputs, outputs, pass_):
    gate, up = inputs
    if pass_ == "fwd":
        return _nbytes(gate, up) + _nbytes(*outputs)
    # backward: read d_out, gate, up (silu recomputed); write d_gate, d_up
    return _nbytes(outputs[0]) + 2 * _nbytes(gate, up)


def _rms_fused_bytes(inputs, outputs, pass_):
    x, weight = inputs
    rstd = x.shape[0] * 4        # one fp32 per row, the only saved statistic
    if pass_ == "fwd":
        return _nbytes(x, weight) + _nbytes(outputs[0]) + rstd
    # backward: read d_y, x, weight, rstd; write d_x and d_weight
    return _nbytes(outputs[0], x, weight) + rstd + _nbytes(x, weight)


def _cases() -> list[FusedCase]:
    s = SIZES
    return [
        FusedCase(f"rope q({s['tokens']},{s['heads']},{s['head_dim']}) k({s['tokens']},{s['kv_heads']},{s['head_dim']})",
                  _rope_inputs, 2, ops.apply_rope, ops.apply_rope_reference, _rope_fused_bytes,
                  lambda inputs: inputs[0].numel() + inputs[1].numel()),
        FusedCase(f"swiglu ({s['tokens']},{s['ffn']})",
                  lambda: (_randn(s["tokens"], s["ffn"]), _randn(s["tokens"], s["ffn"])), 2,
                  ops.swiglu, ops.swiglu_reference, _swiglu_fused_bytes, lambda inputs: inputs[0].numel()),
        FusedCase(f"rms_norm ({s['tokens']},{s['hidden']})",
                  lambda: (_randn(s["tokens"], s["hidden"]), 1 + 0.1 * _randn(s["hidden"])), 2,
                  ops.rms_norm, ops.rms_norm_reference, _rms_fused_bytes, lambda inputs: inputs[0].numel()),
    ]


CASES = _cases()


@functools.lru_cache(maxsize=None)
def _inputs(case: FusedCase) -> tuple:
    return case.make_inputs()


@functools.lru_cache(maxsize=None)
def _grad_outputs(case: FusedCase) -> tuple:
    return tuple(torch.randn_like(o) for o in _as_tuple(case.reference(*_inputs(case))))


def _as_tuple(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


_compiled: dict = {}


def _compiled_reference(case: FusedCase) -> Callable:
    if case not in _compiled:
        _compiled[case] = torch.compile(case.reference, dynamic=False)
    return _compiled[case]


def _runner(fn: Callable, case: FusedCase, pass_: str) -> Callable:
    inputs = _inputs(case)
    if pass_ == "fwd":
        def run_fwd():
            with torch.no_grad():
                return _as_tuple(fn(*inputs))
        return run_fwd
    leaves = tuple(t.detach().requires_grad_(True) for t in inputs[: case.differentiable])
    rest = inputs[case.differentiable:]
    grads = _grad_outputs(case)

    def run_fwd_bwd():
        outs = _as_tuple(fn(*leaves, *rest))
        return torch.autograd.grad(outs, leaves, grads)
    return run_fwd_bwd


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("case", CASES, ids=[c.name.split()[0] for c in CASES])
def test_fused_op(benchmark, case: FusedCase, pass_: str, impl: str):
    inputs = _inputs(case)
    with benchlib.num_threads(THREADS):
        if impl == "compiled":
            works, why = benchlib.compile_works()
            if not works:
                RECORD.mark_unavailable(SUITE, f"{case.name} {pass_}", impl, f"torch.compile unavailable: {why}")
                return
            fn = _compiled_reference(case)
        else:
            fn = case.ours if impl == "ours" else case.reference
        outputs = _as_tuple(case.reference(*inputs))
        moved = case.fused_bytes(inputs, outputs, "fwd")
        if pass_ == "fwd+bwd":
            moved += case.fused_bytes(inputs, outputs, "bwd")
        name = f"ours-{_resolved(inputs[0])}" if impl == "ours" else impl
        result = measure(
            benchmark, _runner(fn, case, pass_), suite=SUITE, case=f"{case.name} {pass_}", impl=name,
            dtype=DTYPE, threads=THREADS, moved_bytes=moved, work=moved, work_unit="bytes",
            compare=(Compare("eager"), Compare("compiled")) if impl == "ours" else (),
            rounds=10, warmup=1)
    expected = _runner(case.reference, case, pass_)()
    # fp32 backward: weight gradients sum over every row, in a different order in compiled code.
    tol = (dict(atol=2e-2, rtol=2e-2) if DTYPE == torch.bfloat16 else
           dict(atol=1e-5, rtol=1e-5) if pass_ == "fwd" else dict(atol=1e-3, rtol=1e-4))
    for got, want in zip(result, expected):
        torch.testing.assert_close(got.float(), want.float(), **tol)


def _resolved(tensor: torch.Tensor) -> str:
    from transfusion_fast import backend
    impl = backend.resolve(tensor, "fused op")
    return "reference composition" if impl == "cpu" else impl


# ----------------------------------------------------------------------------- memory model
def _addressed_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a kernel touches (broadcast dims with stride 0 count once)."""
    elements = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            elements *= size
    return elements * t.element_size()


class _TrafficCounter(TorchDispatchMode):
    """Bytes each ATen op reads (its tensor arguments) and writes (its outputs); views are free."""

    def __init__(self):
        super().__init__()
        self.bytes = 0
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if getattr(func, "is_view", False) or func in (torch.ops.aten.detach.default,):
            return out
        tensors_in = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        tensors_out = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        self.bytes += sum(_addressed_bytes(t) for t in tensors_in + tensors_out)
        self.ops += 1
        return out


def _eager_traffic(case: FusedCase, pass_: str) -> tuple[int, int]:
    inputs = _inputs(case)
    leaves = tuple(t.detach().requires_grad_(pass_ != "fwd") for t in inputs[: case.differentiable])
    rest = inputs[case.differentiable:]
    if pass_ == "fwd":
        counter = _TrafficCounter()
        with torch.no_grad(), counter:
            case.reference(*leaves, *rest)
        return counter.bytes, counter.ops
    outs = _as_tuple(case.reference(*leaves, *rest))
    grads = tuple(torch.ones_like(o) for o in outs)
    counter = _TrafficCounter()
    with counter:
        torch.autograd.grad(outs, leaves, grads)
    return counter.bytes, counter.ops


def test_fused_memory_model():
    """Bytes per element: eager composition (counted) vs a fused kernel (inputs + outputs once)."""
    rows = []
    for case in CASES:
        inputs = _inputs(case)
        outputs = _as_tuple(case.reference(*inputs))
        elements = case.primary_elements(inputs)
        for pass_ in ("fwd", "bwd"):
            eager, num_ops = _eager_traffic(case, pass_)
            fused = case.fused_bytes(inputs, outputs, pass_)
            assert fused > 0 and eager > 0
            rows.append({"op": case.name.split()[0], "pass": pass_, "dtype": str(DTYPE).replace("torch.", ""),
                         "shape": case.name.split(" ", 1)[1], "eager aten ops": num_ops,
                         "eager B/elem": round(eager / elements, 2), "fused B/elem": round(fused / elements, 2),
                         "eager/fused": round(eager / fused, 2)})
    RECORD.add_report(
        "Fused ops memory model", rows,
        "bytes moved per element of the main input; eager counted per ATen op while the reference "
        "composition runs (inputs read + outputs written, views free); fused = each input read and "
        "each output written once, from the shapes. On a memory-bound GPU kernel the speed-up over "
        "eager approaches eager/fused.")
