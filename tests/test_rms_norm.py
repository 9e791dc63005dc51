"""RMSNorm: reference vs ``F.rms_norm`` and float64 gradcheck, Triton kernels (interpreter or GPU) vs
the reference in values and gradients (with and without the fused residual add), deterministic
weight gradient, saved tensors, AOT compile, bad input, torch.compile."""
import pytest
import torch
import torch.nn.functional as F

import transfusion_fast
from transfusion_fast.kernels import rms_norm as rms_norm_kernels
from transfusion_fast.ops.rms_norm import rms_norm, rms_norm_reference
from transfusion_fast.testing import TOLERANCES, compile_without_spills

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _random(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(device=device, dtype=dtype)


def _assert_close(actual, expected, dtype, scale=1.0):
    """Tolerance relative to the largest expected magnitude: the weight gradient sums over rows."""
    atol, rtol = TOLERANCES[dtype]
    magnitude = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol * magnitude * scale, rtol=rtol * scale)


def test_reference_matches_torch_rms_norm_float64():
    x, weight = _random((6, 13), torch.float64, "cpu"), _random(13, torch.float64, "cpu", seed=1)
    residual = _random((6, 13), torch.float64, "cpu", seed=2)
    torch.testing.assert_close(rms_norm_reference(x, weight, 1e-5),
                               F.rms_norm(x, (13,), weight, eps=1e-5), atol=1e-12, rtol=1e-12)
    y, h = rms_norm_reference(x, weight, 1e-5, residual)
    torch.testing.assert_close(h, x + residual, atol=0, rtol=0)
    torch.testing.assert_close(y, F.rms_norm(x + residual, (13,), weight, eps=1e-5), atol=1e-12, rtol=1e-12)


def test_reference_float64_gradcheck():
    x = _random((3, 7), torch.float64, "cpu").requires_grad_(True)
    weight = _random(7, torch.float64, "cpu", seed=1).requires_grad_(True)
    residual = _random((3, 7), torch.float64, "cpu", seed=2).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, w: rms_norm_reference(a, w, 1e-6), (x, weight))
    assert torch.autograd.gradcheck(lambda a, w, r: rms_norm_reference(a, w, 1e-6, r), (x, weight, residual))


def _run_and_compare(x, weight, residual, dtype, eps=1e-6):
    """Triton forward + backward vs the reference path's values and autograd gradients."""
    inputs = (x, weight) if residual is None else (x, weight, residual)
    with transfusion_fast.use_backend("triton"):
        out = rms_norm(x, weight, eps, residual)
    expected = rms_norm_reference(x, weight, eps, residual)
    outs = (out,) if residual is None else out
    expected_outs = (expected,) if residual is None else expected
    for got, want in zip(outs, expected_outs):
        assert got.shape == want.shape and got.dtype == want.dtype
        _assert_close(got, want, dtype)
    douts = [_random(o.shape, o.dtype, o.device, seed=5 + i) for i, o in enumerate(outs)]
    grads = torch.autograd.grad(outs, inputs, douts)
    grads_ref = torch.autograd.grad(expected_outs, inputs, douts)
    for got, want in zip(grads, grads_ref):
        _assert_close(got, want, dtype, scale=2.0)
    return grads


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("shape", [(7, 97), (2, 3, 40), (150, 24)])   # odd hidden; 3-D; more rows than programs
def test_kernel_matches_reference(triton_device, dtype, with_residual, shape):
    x = _random(shape, dtype, triton_device).requires_grad_(True)
    weight = (1 + 0.1 * _random(shape[-1], dtype, triton_device, seed=1)).requires_grad_(True)
    residual = _random(shape, dtype, triton_device, seed=2).requires_grad_(True) if with_residual else None
    _run_and_compare(x, weight, residual, dtype)


def test_kernel_float32_weight_with_half_input(triton_device):
    x = _random((5, 33), torch.float16, triton_device).requires_grad_(True)
    weight = _random(33, torch.float32, triton_device, seed=1).requires_grad_(True)
    _, dweight = _run_and_compare(x, weight, None, torch.float16)
    assert dweight.dtype == torch.float32


def test_kernel_non_contiguous_inputs(triton_device):
    """Column slice (row stride > hidden), transposed residual (unit column stride lost), permuted 3-D x."""
    x = _random((9, 3 * 21), torch.float32, triton_device)[:, 5:26].detach().requires_grad_(True)
    residual = _random((21, 9), torch.float32, triton_device, seed=2).t().detach().requires_grad_(True)
    weight = _random(21, torch.float32, triton_device, seed=1).requires_grad_(True)
    assert not x.is_contiguous() and residual.stride(-1) != 1
    _run_and_compare(x, weight, residual, torch.float32)
    x3 = _random((4, 3, 21), torch.float32, triton_device).permute(1, 0, 2).detach().requires_grad_(True)
    _run_and_compare(x3, weight, None, torch.float32)


def test_kernel_no_rows(triton_device):
    x = torch.empty(0, 16, device=triton_device, requires_grad=True)
    weight = torch.ones(16, device=triton_device, requires_grad=True)
    with transfusion_fast.use_backend("triton"):
        y = rms_norm(x, weight)
    dx, dweight = torch.autograd.grad(y.sum(), (x, weight))
    assert y.shape == (0, 16) and dx.shape == (0, 16)
    assert torch.equal(dweight, torch.zeros_like(weight))


def test_weight_gradient_is_deterministic(triton_device):
    x = _random((150, 24), torch.float32, triton_device).requires_grad_(True)
    weight = _random(24, torch.float32, triton_device, seed=1).requires_grad_(True)
    dy = _random((150, 24), torch.float32, triton_device, seed=3)
    with transfusion_fast.use_backend("triton"):
        first = torch.autograd.grad(rms_norm(x, weight), weight, dy)[0]
        second = torch.autograd.grad(rms_norm(x, weight), weight, dy)[0]
    assert torch.equal(first, second)


def test_forward_saves_only_rstd_beyond_inputs(triton_device):
    """Saved for the backward: x (or h), weight and a float32 rstd per row, nothing else."""
    rows, hidden = 6, 40
    x = _random((rows, hidden), torch.float16, triton_device).requires_grad_(True)
    weight = _random(hidden, torch.float16, triton_device, seed=1).requires_grad_(True)
    residual = _random((rows, hidden), torch.float16, triton_device, seed=2).requires_grad_(True)
    for res in (None, residual):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t), \
                transfusion_fast.use_backend("triton"):
            out = rms_norm(x, weight, 1e-6, res)
        h = x if res is None else out[1]
        shapes = sorted((tuple(t.shape), t.dtype) for t in saved)
        assert shapes == sorted([((rows, hidden), h.dtype), ((hidden,), weight.dtype), ((rows,), torch.float32)])
        assert any(t.data_ptr() == h.data_ptr() for t in saved)


def test_cpu_backend_is_the_reference_composition():
    x, weight = _random((4, 10), torch.bfloat16, "cpu"), _random(10, torch.bfloat16, "cpu", seed=1)
    residual = _random((4, 10), torch.bfloat16, "cpu", seed=2)
    with transfusion_fast.use_backend("auto"):
        assert torch.equal(rms_norm(x, weight), rms_norm_reference(x, weight))
        got, want = rms_norm(x, weight, 1e-5, residual), rms_norm_reference(x, weight, 1e-5, residual)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("backend", ["reference", "auto", "triton"])
def test_mixed_dtype_residual_sums_in_the_wider_dtype(backend, triton_device):
    """Under autocast a block output (fp16/bf16) meets the fp32 residual stream: h = x + residual
    is formed in fp32 and y has h's dtype, with the values and gradients of the all-fp32 call."""
    device = triton_device if backend == "triton" else "cpu"
    half = torch.float16 if backend == "triton" else torch.bfloat16   # interpreter: no bf16 dots
    x = _random((6, 24), half, device).requires_grad_(True)
    residual = _random((6, 24), torch.float32, device, seed=2).requires_grad_(True)
    weight = _random(24, torch.float32, device, seed=1).requires_grad_(True)
    with transfusion_fast.use_backend(backend):
        y, h = rms_norm(x, weight, 1e-5, residual)
    assert y.dtype == h.dtype == torch.float32
    want_y, want_h = rms_norm_reference(x.detach().float(), weight.detach(), 1e-5, residual.detach())
    torch.testing.assert_close(h, want_h, atol=0, rtol=0)
    torch.testing.assert_close(y, want_y, atol=1e-5, rtol=1e-5)
    (y * h).sum().backward()
    xf, rf, wf = (t.detach().float().requires_grad_(True) for t in (x, residual, weight))
    yf, hf = rms_norm_reference(xf, wf, 1e-5, rf)
    (yf * hf).sum().backward()
    assert x.grad.dtype == half and residual.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad, xf.grad.to(half), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(residual.grad, rf.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(weight.grad, wf.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("call, message", [
    (lambda: rms_norm(torch.randn(3, 8), torch.randn(7)), r"weight must have shape \(8,\)"),
    (lambda: rms_norm(torch.randn(3, 8), torch.randn(8), 1e-6, torch.arange(24).view(3, 8)),
     r"residual must be a floating-point tensor of x's shape \(3, 8\)"),
    (lambda: rms_norm(torch.randn(3, 8), torch.randn(8), 1e-6, torch.randn(4, 8)),
     r"residual must be a floating-point tensor of x's shape \(3, 8\)"),
    (lambda: rms_norm(torch.randn(3, 8), torch.randn(8), -1.0), "eps must be a positive"),
    (lambda: rms_norm(torch.arange(8), torch.randn(8)), "floating-point"),
])
def test_bad_input_raises(call, message):
    with transfusion_fast.use_backend("triton"), pytest.raises(ValueError, match=message):
        call()


def test_row_wider_than_registers_raises_before_launch(triton_device):
    hidden = rms_norm_kernels.MAX_HIDDEN + 2
    x, weight = torch.randn(1, hidden, device=triton_device), torch.randn(hidden, device=triton_device)
    with transfusion_fast.use_backend("triton"), pytest.raises(ValueError, match=f"at most {hidden - 2}, got {hidden}"):
        rms_norm(x, weight)


def test_torch_compile_fullgraph(triton_device):
    x = _random((4, 20), torch.float32, triton_device).requires_grad_(True)
    weight = _random(20, torch.float32, triton_device, seed=1).requires_grad_(True)
    residual = _random((4, 20), torch.float32, triton_device, seed=2).requires_grad_(True)

    def plain(x, weight, residual):
        return rms_norm(x, weight) + residual

    def fused(x, weight, residual):
        y, h = rms_norm(x, weight, 1e-6, residual)
        return y * h

    with transfusion_fast.use_backend("triton"):
        for fn in (plain, fused):
            compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
            out, out_eager = compiled(x, weight, residual), fn(x, weight, residual)
            torch.testing.assert_close(out, out_eager, atol=0, rtol=0)
            grads = torch.autograd.grad(out.sum(), (x, weight, residual))
            grads_eager = torch.autograd.grad(out_eager.sum(), (x, weight, residual))
            for got, want in zip(grads, grads_eager):
                torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_aot_compile_every_config_without_spills():
    specs = rms_norm_kernels.aot_specs()
    compile_without_spills(specs)
    assert max(s.constexprs["BLOCK_N"] for s in specs) == rms_norm_kernels.MAX_HIDDEN
