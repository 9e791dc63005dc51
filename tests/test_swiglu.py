"""SwiGLU: reference vs a float64 formula oracle and gradcheck, Triton kernels (interpreter or GPU)
vs the reference in values and gradients, activation memory saved, AOT compile, bad input,
torch.compile."""
import pytest
import torch

import transfusion_fast
from transfusion_fast.kernels import swiglu as swiglu_kernels
from transfusion_fast.ops.swiglu import swiglu, swiglu_fused, swiglu_reference
from transfusion_fast.testing import TOLERANCES, compile_without_spills

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _random(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (2 * torch.randn(shape, generator=g)).to(device=device, dtype=dtype)


def _assert_close(actual, expected, dtype):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol)


def test_reference_matches_formula_float64():
    gate, up = _random((5, 7), torch.float64, "cpu"), _random((5, 7), torch.float64, "cpu", seed=1)
    expected = gate / (1 + torch.exp(-gate)) * up
    torch.testing.assert_close(swiglu_reference(gate, up), expected, atol=1e-12, rtol=1e-12)


def test_reference_float64_gradcheck():
    gate = _random((3, 5), torch.float64, "cpu").requires_grad_(True)
    up = _random((3, 5), torch.float64, "cpu", seed=1).requires_grad_(True)
    assert torch.autograd.gradcheck(swiglu_reference, (gate, up))


def _check_grads(outputs, inputs, reference_outputs, dtype):
    dout = _random(outputs.shape, outputs.dtype, outputs.device, seed=7)
    grads = torch.autograd.grad(outputs, inputs, dout)
    grads_ref = torch.autograd.grad(reference_outputs, inputs, dout)
    for got, want in zip(grads, grads_ref):
        _assert_close(got, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 3, 97), (130, 40), (3, 1100)])   # odd widths; > one column block
def test_kernel_matches_reference(triton_device, dtype, shape):
    gate = _random(shape, dtype, triton_device).requires_grad_(True)
    up = _random(shape, dtype, triton_device, seed=1).requires_grad_(True)
    with transfusion_fast.use_backend("triton"):
        out = swiglu(gate, up)
    expected = swiglu_reference(gate, up)
    assert out.shape == expected.shape and out.dtype == dtype
    _assert_close(out, expected, dtype)
    _check_grads(out, (gate, up), expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_kernel_matches_reference(triton_device, dtype):
    gate_up = _random((4, 3, 2 * 77), dtype, triton_device).requires_grad_(True)
    with transfusion_fast.use_backend("triton"):
        out = swiglu_fused(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    expected = swiglu_reference(gate, up)
    assert out.shape == (4, 3, 77)
    _assert_close(out, expected, dtype)
    _check_grads(out, (gate_up,), expected, dtype)


def test_kernel_non_contiguous_inputs(triton_device):
    """Row-strided column slices, a transposed tensor (unit column stride lost) and a strided fused input."""
    base = _random((9, 3 * 33), torch.float32, triton_device)
    gate = base[:, :33].detach().requires_grad_(True)
    up = _random((33, 9), torch.float32, triton_device, seed=2).t().detach().requires_grad_(True)
    assert not gate.is_contiguous() and up.stride(-1) != 1
    with transfusion_fast.use_backend("triton"):
        out = swiglu(gate, up)
    expected = swiglu_reference(gate, up)
    _assert_close(out, expected, torch.float32)
    _check_grads(out, (gate, up), expected, torch.float32)
    gate_up = _random((2, 8, 2 * 20), torch.float32, triton_device)[:, ::2].detach().requires_grad_(True)
    with transfusion_fast.use_backend("triton"):
        out = swiglu_fused(gate_up)
    expected = swiglu_reference(*gate_up.chunk(2, dim=-1))
    _assert_close(out, expected, torch.float32)
    _check_grads(out, (gate_up,), expected, torch.float32)


def test_kernel_empty_inputs(triton_device):
    gate = torch.empty(0, 5, device=triton_device, requires_grad=True)
    up = torch.empty(0, 5, device=triton_device, requires_grad=True)
    gate_up = torch.empty(2, 0, device=triton_device, requires_grad=True)
    with transfusion_fast.use_backend("triton"):
        out, fused_out = swiglu(gate, up), swiglu_fused(gate_up)
    assert out.shape == (0, 5) and fused_out.shape == (2, 0)
    assert torch.autograd.grad(out.sum(), gate)[0].shape == (0, 5)
    assert torch.autograd.grad(fused_out.sum(), gate_up)[0].shape == (2, 0)


def _saved_bytes(fn, *inputs):
    """(all bytes autograd saves for the backward, bytes of it that are not the inputs' storage)."""
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    input_storages = {t.untyped_storage().data_ptr() for t in inputs}
    return sum(saved.values()), sum(n for ptr, n in saved.items() if ptr not in input_storages)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_saved_activation_bytes(triton_device, dtype):
    """The figures of the kernel module's docstring, measured against the reference path."""
    rows, width = 8, 48
    gate = _random((rows, width), dtype, triton_device).requires_grad_(True)
    up = _random((rows, width), dtype, triton_device, seed=1).requires_grad_(True)
    gate_up = _random((rows, 2 * width), dtype, triton_device).requires_grad_(True)
    with transfusion_fast.use_backend("triton"):
        fused_total, fused_extra = _saved_bytes(swiglu, gate, up)
        fused_form_total, fused_form_extra = _saved_bytes(swiglu_fused, gate_up)
    eager_total, eager_extra = _saved_bytes(swiglu_reference, gate, up)
    elements, element_size = rows * width, gate.element_size()
    assert fused_extra == 0 and fused_form_extra == 0
    assert fused_total == fused_form_total == 2 * elements * element_size
    assert eager_total == 12 * elements                    # float32 gate, silu(gate), up
    assert eager_extra == (12 if dtype == torch.float16 else 4) * elements
    assert fused_total < eager_total


def test_cpu_backend_is_the_reference_composition():
    gate, up = _random((3, 10), torch.float16, "cpu"), _random((3, 10), torch.float16, "cpu", seed=1)
    with transfusion_fast.use_backend("auto"):
        assert torch.equal(swiglu(gate, up), swiglu_reference(gate, up))
        assert torch.equal(swiglu_fused(torch.cat([gate, up], -1)), swiglu_reference(gate, up))


@pytest.mark.parametrize("call, message", [
    (lambda: swiglu(torch.randn(2, 4), torch.randn(2, 4, dtype=torch.float16)), "share a dtype"),
    (lambda: swiglu(torch.randn(2, 4), torch.randn(2, 5)), "same shape"),
    (lambda: swiglu(torch.arange(4), torch.arange(4)), "floating-point"),
    (lambda: swiglu_fused(torch.randn(2, 5)), "last dimension is even"),
    (lambda: swiglu_fused(torch.ones(2, 4, dtype=torch.int32)), "floating-point"),
])
def test_bad_input_raises(call, message):
    with transfusion_fast.use_backend("triton"), pytest.raises(ValueError, match=message):
        call()


def test_torch_compile_fullgraph(triton_device):
    gate = _random((3, 20), torch.float32, triton_device).requires_grad_(True)
    up = _random((3, 20), torch.float32, triton_device, seed=1).requires_grad_(True)
    gate_up = _random((3, 40), torch.float32, triton_device).requires_grad_(True)
    with transfusion_fast.use_backend("triton"):
        for fn, inputs in ((swiglu, (gate, up)), (swiglu_fused, (gate_up,))):
            compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
            out, out_eager = compiled(*inputs), fn(*inputs)
            torch.testing.assert_close(out, out_eager, atol=0, rtol=0)
            grads = torch.autograd.grad(out.sum(), inputs)
            grads_eager = torch.autograd.grad(out_eager.sum(), inputs)
            for got, want in zip(grads, grads_eager):
                torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_aot_compile_every_config_without_spills():
    specs = swiglu_kernels.aot_specs()
    compile_without_spills(specs)
