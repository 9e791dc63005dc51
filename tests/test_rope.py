"""RoPE: reference vs a complex-multiplication oracle, Triton kernel (interpreter or GPU) vs the
reference in values and gradients, AOT compile of every shipped config, bad input, torch.compile."""
import re

import pytest
import torch

import transfusion_fast
from transfusion_fast.kernels import rope as rope_kernels
from transfusion_fast.ops.rope import apply_rope, apply_rope_reference
from transfusion_fast.testing import TOLERANCES, compile_without_spills

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _positions_of_documents(lengths):
    """Per-token 1-D positions of packed documents: each restarts at 0."""
    return torch.cat([torch.arange(n) for n in lengths])


def _axial_example(lengths_and_grids):
    """2-D positions + axial mask: text tokens ``("text", n)``, image spans ``("image", rows, cols)``
    whose patches take (row, column); text after an image continues its document's 1-D counter."""
    positions, axial, cursor = [], [], 0
    for item in lengths_and_grids:
        if item[0] == "text":
            n = item[1]
            positions += [(cursor + i, 0) for i in range(n)]
            axial += [False] * n
            cursor += n
        else:
            _, rows, cols = item
            positions += [(r, c) for r in range(rows) for c in range(cols)]
            axial += [True] * (rows * cols)
            cursor += 1
    return torch.tensor(positions), torch.tensor(axial)


def _random_qk(tokens, hq, hk, head_dim, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(tokens, hq, head_dim, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(tokens, hk, head_dim, generator=g).to(device=device, dtype=dtype)
    return q, k


def _complex_oracle(x, positions, theta, axial, interleaved):
    """Rotation as complex multiplication in float64, angles from first principles."""
    t, _, d = x.shape
    half = d // 2
    x = x.double()
    if interleaved:
        pairs = torch.complex(x[..., 0::2], x[..., 1::2])
    else:
        pairs = torch.complex(x[..., :half], x[..., half:])
    angles = torch.empty(t, half, dtype=torch.float64)
    for token in range(t):
        for i in range(half):
            if positions.dim() == 2 and axial[token]:
                axis, j = (0, i) if i < half // 2 else (1, i - half // 2)
                angles[token, i] = positions[token, axis].item() * theta ** (-2.0 * j / half)
            else:
                p = positions[token, 0] if positions.dim() == 2 else positions[token]
                angles[token, i] = p.item() * theta ** (-2.0 * i / d)
    rotated = pairs * torch.polar(torch.ones_like(angles), angles)[:, None, :]
    if interleaved:
        return torch.stack([rotated.real, rotated.imag], dim=-1).flatten(-2)
    return torch.cat([rotated.real, rotated.imag], dim=-1)


def _assert_close(actual, expected, dtype, scale=1.0):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol * scale, rtol=rtol * scale)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("two_d", [False, True])
def test_reference_matches_complex_oracle(two_d, interleaved):
    theta = 500.0
    if two_d:
        positions, axial = _axial_example([("text", 3), ("image", 2, 3), ("text", 2)])
    else:
        positions, axial = _positions_of_documents([4, 1, 6]), None
    q, k = _random_qk(positions.shape[0], 3, 1, 8, torch.float64, "cpu")
    q_rot, k_rot = apply_rope_reference(q, k, positions, theta, axial, interleaved)
    # The reference's angles are float32 (as on the GPU): ~1e-7 relative of positions below 10.
    torch.testing.assert_close(q_rot, _complex_oracle(q, positions, theta, axial, interleaved),
                               atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(k_rot, _complex_oracle(k, positions, theta, axial, interleaved),
                               atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("interleaved", [False, True])
def test_reference_float64_gradcheck(interleaved):
    positions, axial = _axial_example([("text", 2), ("image", 2, 2)])
    q, k = _random_qk(positions.shape[0], 2, 1, 8, torch.float64, "cpu")
    q.requires_grad_(True)
    k.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: apply_rope_reference(a, b, positions, 100.0, axial, interleaved), (q, k))


def _check_against_reference(q, k, positions, axial, theta, interleaved, dtype):
    """Triton forward and backward vs the reference path's values and autograd gradients."""
    q = q.detach().requires_grad_(True)
    k = k.detach().requires_grad_(True)
    with transfusion_fast.use_backend("triton"):
        q_rot, k_rot = apply_rope(q, k, positions, theta, axial=axial, interleaved=interleaved)
    q_ref, k_ref = apply_rope_reference(q, k, positions, theta, axial, interleaved)
    _assert_close(q_rot, q_ref, dtype)
    _assert_close(k_rot, k_ref, dtype)
    g = torch.Generator().manual_seed(1)
    dq_out = torch.randn(q_rot.shape, generator=g).to(q_rot)
    dk_out = torch.randn(k_rot.shape, generator=g).to(k_rot)
    grads = torch.autograd.grad((q_rot, k_rot), (q, k), (dq_out, dk_out))
    grads_ref = torch.autograd.grad((q_ref, k_ref), (q, k), (dq_out, dk_out))
    for got, want in zip(grads, grads_ref):
        _assert_close(got, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
def test_kernel_1d_packed_documents(triton_device, dtype, interleaved):
    positions = _positions_of_documents([5, 1, 7]).to(triton_device)
    q, k = _random_qk(13, 4, 2, 24, dtype, triton_device)        # GQA, head_dim 24: D/2 not a power of 2
    _check_against_reference(q, k, positions, None, 10000.0, interleaved, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
def test_kernel_2d_axial(triton_device, dtype, interleaved):
    positions, axial = _axial_example([("text", 3), ("image", 3, 2), ("text", 2), ("image", 1, 2)])
    q, k = _random_qk(positions.shape[0], 3, 5, 12, dtype, triton_device)   # more k heads than q heads
    _check_against_reference(q, k, positions.to(triton_device), axial.to(triton_device), 250.0,
                             interleaved, dtype)


def test_kernel_2d_axial_strided_positions_and_mask(triton_device):
    """Column-major positions (strides (1, T)) and the axial mask as a column of a wider bool tensor."""
    positions, axial = _axial_example([("image", 2, 3), ("text", 2)])
    column_major = positions.t().contiguous().t()
    mask_table = torch.stack([~axial, axial, ~axial], dim=1)
    assert column_major.stride() == (1, positions.shape[0]) and not mask_table[:, 1].is_contiguous()
    q, k = _random_qk(positions.shape[0], 2, 1, 8, torch.float32, triton_device)
    _check_against_reference(q, k, column_major.to(triton_device), mask_table.to(triton_device)[:, 1], 10000.0,
                             False, torch.float32)


def test_kernel_no_tokens(triton_device):
    q, k = _random_qk(0, 2, 1, 8, torch.float32, triton_device)
    with transfusion_fast.use_backend("triton"):
        q_rot, k_rot = apply_rope(q, k, torch.zeros(0, dtype=torch.int64, device=triton_device))
    assert q_rot.shape == (0, 2, 8) and k_rot.shape == (0, 1, 8)


def test_kernel_many_tokens_int32_positions(triton_device):
    positions = _positions_of_documents([80, 1, 79]).to(device=triton_device, dtype=torch.int32)
    q, k = _random_qk(160, 2, 1, 8, torch.float32, triton_device)
    _check_against_reference(q, k, positions, None, 10000.0, False, torch.float32)


def test_kernel_strided_views_of_fused_qkv(triton_device):
    """q, k as head slices of one (T, Hq + 2 Hk, D) projection; a (H, T, D) transpose; a strided D."""
    tokens, hq, hk, d = 9, 4, 2, 16
    qkv = torch.randn(tokens, hq + 2 * hk, d, device=triton_device)
    q, k = qkv[:, :hq], qkv[:, hq:hq + hk]
    assert not q.is_contiguous() and not k.is_contiguous()
    positions = _positions_of_documents([4, 5]).to(triton_device)
    _check_against_reference(q, k, positions, None, 10000.0, False, torch.float32)
    heads_first = torch.randn(hq, tokens, d, device=triton_device).transpose(0, 1)
    every_other_dim = torch.randn(tokens, hk, 2 * d, device=triton_device)[..., ::2]
    _check_against_reference(heads_first, every_other_dim, positions, None, 10000.0, True, torch.float32)


@pytest.mark.parametrize("two_d", [False, True])
def test_kernel_in_place_matches_out_of_place(triton_device, two_d):
    if two_d:
        positions, axial = _axial_example([("text", 2), ("image", 2, 2)])
        positions, axial = positions.to(triton_device), axial.to(triton_device)
    else:
        positions, axial = _positions_of_documents([3, 3]).to(triton_device), None
    qkv = torch.randn(6, 3 + 2, 8, device=triton_device, dtype=torch.float16)
    q, k = qkv[:, :3], qkv[:, 3:4]
    expected = apply_rope_reference(q, k, positions, 10000.0, axial, False)
    untouched_v = qkv[:, 4].clone()
    with transfusion_fast.use_backend("triton"):
        q_out, k_out = apply_rope(q, k, positions, axial=axial, inplace=True)
    assert q_out.data_ptr() == q.data_ptr() and k_out.data_ptr() == k.data_ptr()
    _assert_close(q, expected[0], torch.float16)
    _assert_close(k, expected[1], torch.float16)
    assert torch.equal(qkv[:, 4], untouched_v)


def test_packed_documents_restart_rotation():
    """The same vector at the same in-document position rotates identically in every document."""
    positions = _positions_of_documents([3, 3])
    row = torch.randn(1, 2, 8)
    q = row.expand(6, 2, 8).contiguous()
    with transfusion_fast.use_backend("reference"):
        q_rot, _ = apply_rope(q, q, positions)
    torch.testing.assert_close(q_rot[:3], q_rot[3:], atol=0, rtol=0)
    assert not torch.allclose(q_rot[0], q_rot[1])


def test_inverse_rotation_undoes_forward(triton_device):
    """The backward kernel (sin negated) is the inverse rotation: applying it to q_rot gives q back."""
    positions = _positions_of_documents([7]).to(triton_device)
    q, k = _random_qk(7, 2, 2, 8, torch.float32, triton_device)
    table = transfusion_fast.ops.rope.rope_inv_freq(8, 10000.0, torch.device(triton_device))
    q_rot, k_rot = rope_kernels.apply_rope(q, k, positions, table)
    q_back, k_back = torch.ops.transfusion_fast.rope(q_rot, k_rot, positions, None, table, False, True)
    torch.testing.assert_close(q_back, q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_back, k, atol=1e-5, rtol=1e-5)


def test_cpu_backend_is_the_reference_composition():
    positions = _positions_of_documents([4, 2])
    q, k = _random_qk(6, 2, 1, 8, torch.float32, "cpu")
    with transfusion_fast.use_backend("auto"):
        got = apply_rope(q, k, positions, 300.0, interleaved=True)
    want = apply_rope_reference(q, k, positions, 300.0, None, True)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    with transfusion_fast.use_backend("auto"):
        q_out, k_out = apply_rope(q, k, positions, 300.0, interleaved=True, inplace=True)
    assert q_out is q and k_out is k
    assert torch.equal(q, want[0]) and torch.equal(k, want[1])


@pytest.mark.parametrize("make_args, message", [
    (lambda: (torch.randn(4, 2, 8, dtype=torch.float16), torch.randn(4, 1, 8), torch.arange(4)), "share a dtype"),
    (lambda: (torch.randn(4, 2, 8), torch.randn(4, 1, 8), torch.arange(5)), "one entry per token"),
    (lambda: (torch.randn(4, 2, 7), torch.randn(4, 1, 7), torch.arange(4)), "head_dim must be even"),
    (lambda: (torch.randn(4, 2, 8), torch.randn(4, 1, 8), torch.arange(4).float()), "int32 or int64"),
    (lambda: (torch.randn(4, 8), torch.randn(4, 1, 8), torch.arange(4)), "packed (tokens, heads, head_dim)"),
])
def test_bad_input_raises(make_args, message):
    q, k, positions = make_args()
    with transfusion_fast.use_backend("triton"), pytest.raises(ValueError, match=re.escape(message)):
        apply_rope(q, k, positions)


def test_bad_axial_input_raises():
    positions = torch.zeros(4, 2, dtype=torch.int64)
    q, k = torch.randn(4, 2, 8), torch.randn(4, 1, 8)
    with transfusion_fast.use_backend("triton"):
        with pytest.raises(ValueError, match="need axial"):
            apply_rope(q, k, positions)
        with pytest.raises(ValueError, match="divisible by 4"):
            apply_rope(q[..., :6], k[..., :6], positions, axial=torch.zeros(4, dtype=torch.bool))
        with pytest.raises(ValueError, match="requires_grad"):
            apply_rope(q.requires_grad_(True), k, positions[:, 0], inplace=True)


def test_torch_compile_fullgraph(triton_device):
    positions, axial = _axial_example([("text", 2), ("image", 2, 2)])
    positions, axial = positions.to(triton_device), axial.to(triton_device)
    q, k = _random_qk(6, 2, 1, 8, torch.float32, triton_device)
    q.requires_grad_(True)

    def rotate(q, k):
        return apply_rope(q, k, positions, 500.0, axial=axial)

    with transfusion_fast.use_backend("triton"):
        compiled = torch.compile(rotate, fullgraph=True, backend="aot_eager")
        q_rot, k_rot = compiled(q, k)
        (dq,) = torch.autograd.grad(q_rot.sum() + k_rot.sum(), q)
        q_eager, k_eager = rotate(q, k)
        (dq_eager,) = torch.autograd.grad(q_eager.sum() + k_eager.sum(), q)
    torch.testing.assert_close(q_rot, q_eager, atol=0, rtol=0)
    torch.testing.assert_close(k_rot, k_eager, atol=0, rtol=0)
    torch.testing.assert_close(dq, dq_eager, atol=0, rtol=0)


def test_aot_compile_every_config_without_spills():
    specs = rope_kernels.aot_specs()
    compile_without_spills(specs)


def test_aot_specs_match_host_block_config():
    """The shipped specs use the blocks the launcher picks for the widest head block."""
    for spec in rope_kernels.aot_specs():
        head_dim = 2 * spec.constexprs["HALF"]
        assert (spec.constexprs["BLOCK_P"], spec.constexprs["BLOCK_H"]) == \
            rope_kernels.block_config(head_dim, rope_kernels.PAIRS_PER_STEP)
        assert spec.constexprs["BLOCK_P"] * spec.constexprs["BLOCK_H"] == rope_kernels.PAIRS_PER_STEP
