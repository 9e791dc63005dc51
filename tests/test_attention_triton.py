"""The Triton block-sparse attention kernels against the reference path: forward output, LSE and
dq/dk/dv on generated and hand-picked layouts, GQA, every head_dim, strided q/k/v, decode; the work
counter (tiles computed == minimal tiles); determinism; torch.compile through the custom op.

On a CPU-only machine the kernels run under TRITON_INTERPRET=1 (set by conftest.py) with 16×16
tiles so that tiny layouts still span many tiles (full, partial, ragged); on a CUDA machine the same
tests run compiled on the GPU (``triton_device``). bf16 runs on the GPU only: the interpreter's
bf16 ``tl.dot`` is wrong (a Triton 3.8 interpreter bug, not a kernel bug).
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import layouts

import transfusion_fast
import transfusion_fast.kernels.attention as kernels_attention
import transfusion_fast.kernels.launch as kernels_launch
from transfusion_fast import Layout
from transfusion_fast.kernels.attention import forced_tile_sizes, tile_config, triton_attention
from transfusion_fast.kernels.attention_diagnostics import count_computed_tiles
from transfusion_fast.ops import attention, attention_reference
from transfusion_fast.ops.attention import SUPPORTED_HEAD_DIMS
from transfusion_fast.testing import TOLERANCES, transfusion_example

# (atol, rtol) per dtype, each against the reference computed in fp32 from the same inputs.
# * o: testing.TOLERANCES. fp32 differs by accumulation order only; fp16 inputs give exact fp32
#   products, the error comes from rounding P to fp16 before P·V and o to fp16 (2^-11 relative
#   each, about 1e-3 on unit-scale outputs): 2e-3 leaves a 2-4x margin.
# * lse: fp32 in both cases and QK^T products are exact in fp32 for fp16 inputs, so only the
#   summation order differs (~1e-6 measured): 1e-4 is a wide but still bug-catching bound.
# * gradients: fp32 is accumulation order over up to ~40 keys × 3 products (<= 1.5e-6 measured on
#   gradients of magnitude up to 5): testing.TOLERANCES' 2e-5. fp16 rounds P and dS to fp16
#   before the dV, dK and dQ products (2^-11 relative per term) and stores the gradient in fp16:
#   <= 2.7e-3 measured over 15 generated layouts on gradients up to 5 in magnitude, and the error
#   grows like sqrt(head_dim) up to D = 256: 2e-2 absolute + 2e-2 relative.
OUT_TOL = {dtype: TOLERANCES[dtype] for dtype in (torch.float16, torch.float32, torch.bfloat16)}
LSE_TOL = {torch.float16: (1e-4, 1e-5), torch.float32: (1e-4, 1e-5), torch.bfloat16: (1e-3, 1e-4)}
GRAD_TOL = {torch.float16: (2e-2, 2e-2), torch.float32: (2e-5, 2e-5), torch.bfloat16: (1e-1, 5e-2)}
SMALL_TILES = (16, 16)
# Hypothesis tests cannot take the function-scoped ``triton_device`` fixture: same rule, inline.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(layout, hq, hkv, head_dim, dtype, device, seed=0, fused=False):
    """q, k, v leaves (views of one fused qkv tensor when ``fused``), and random loss weights."""
    g = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    if fused:
        assert layout.num_queries == layout.num_keys
        qkv = randn(layout.num_keys, hq + 2 * hkv, head_dim).to(device, dtype).requires_grad_()
        q, k, v = qkv[:, :hq], qkv[:, hq:hq + hkv], qkv[:, hq + hkv:]
        leaves = (qkv,)
    else:
        q = randn(layout.num_queries, hq, head_dim).to(device, dtype).requires_grad_()
        k = randn(layout.num_keys, hkv, head_dim).to(device, dtype).requires_grad_()
        v = randn(layout.num_keys, hkv, head_dim).to(device, dtype).requires_grad_()
        leaves = (q, k, v)
    weights_o = randn(layout.num_queries, hq, head_dim).to(device)
    weights_lse = randn(hq, layout.num_queries).to(device)
    return (q, k, v), leaves, weights_o, weights_lse


def _loss(o, lse, weights_o, weights_lse):
    # The lse term checks the dLSE path of the backward too.
    return (o.float() * weights_o).sum() + (lse * weights_lse).sum()


def check_against_reference(layout, hq, hkv, head_dim, dtype, device, *, fused=False, seed=0,
                            what=""):
    """Run the kernels forward and backward and compare everything with the reference path."""
    layout = layout.to(device)
    (q, k, v), leaves, w_o, w_lse = _inputs(layout, hq, hkv, head_dim, dtype, device, seed, fused)
    scale = head_dim ** -0.5
    o, lse = triton_attention(q, k, v, layout, scale)
    _loss(o, lse, w_o, w_lse).backward()

    ref_leaves = [t.detach().float().requires_grad_() for t in leaves]
    if fused:
        qkv = ref_leaves[0]
        ref_q, ref_k, ref_v = qkv[:, :hq], qkv[:, hq:hq + hkv], qkv[:, hq + hkv:]
    else:
        ref_q, ref_k, ref_v = ref_leaves
    ref_o, ref_lse = attention_reference(ref_q, ref_k, ref_v, layout, scale, return_lse=True)
    _loss(ref_o, ref_lse, w_o, w_lse).backward()

    assert o.dtype == dtype and o.shape == (layout.num_queries, hq, head_dim)
    assert lse.dtype == torch.float32 and lse.shape == (hq, layout.num_queries)
    atol, rtol = OUT_TOL[dtype]
    torch.testing.assert_close(o.float(), ref_o, atol=atol, rtol=rtol,
                               msg=lambda m: f"o {what}: {m}")
    atol, rtol = LSE_TOL[dtype]
    torch.testing.assert_close(lse, ref_lse, atol=atol, rtol=rtol, msg=lambda m: f"lse {what}: {m}")
    atol, rtol = GRAD_TOL[dtype]
    names = ("dqkv",) if fused else ("dq", "dk", "dv")
    for name, leaf, ref in zip(names, leaves, ref_leaves):
        assert leaf.grad.dtype == dtype
        torch.testing.assert_close(leaf.grad.float(), ref.grad, atol=atol, rtol=rtol,
                                   msg=lambda m, name=name: f"{name} {what}: {m}")


def check_work_counter(layout, hq, hkv, device, block):
    """Every kernel computes exactly the minimal tiles of the layout (ratio 1.00)."""
    with forced_tile_sizes(*block):
        counts = count_computed_tiles(layout.to(device), head_dim=16, num_q_heads=hq,
                                      num_kv_heads=hkv, dtype=torch.float32, device=device)
    minimal = layout.tile_counts(*block)["computed"] * hq
    for kernel in ("fwd", "dkdv", "dq"):
        assert counts[kernel]["block"] == block
        assert counts[kernel]["computed"] == minimal, (kernel, counts, layout)
        assert counts[kernel]["computed"] / minimal == 1.0
        assert counts[kernel]["unmasked"] == _full_tiles_without_ragged_edge(
            layout, block, by_rows=kernel != "dkdv") * hq, (kernel, counts, layout)


def _full_tiles_without_ragged_edge(layout, block, by_rows):
    """Full tiles, less those in the ragged last key tile (fwd/dQ walk key tiles) or the ragged
    last query tile (dK/dV walks query tiles): the tiles that must skip all mask arithmetic."""
    table = layout.tile_table(*block)
    full = table.counts()["full"]
    if by_rows:
        lo, hi, ragged = table.kv_full_lo, table.kv_full_hi, layout.num_keys % block[1] != 0
        last = table.num_n_tiles - 1
    else:
        lo, hi, ragged = table.q_full_lo, table.q_full_hi, layout.num_queries % block[0] != 0
        last = table.num_m_tiles - 1
    if not ragged:
        return full
    return full - int(((lo <= last) & (last < hi)).sum())


# ------------------------------------------------------------------------- generated layouts
@settings(max_examples=10)
@given(drawn=layouts(max_docs=3, max_len=40), dtype=st.sampled_from([torch.float16, torch.float32]),
       group=st.sampled_from([1, 2, 4]), fused=st.booleans())
def test_matches_reference_on_generated_layouts(drawn, dtype, group, fused):
    layout, desc = drawn
    fused = fused and desc["kind"] != "decode"
    with forced_tile_sizes(*SMALL_TILES):
        check_against_reference(layout, group, 1, 16, dtype, DEVICE, fused=fused,
                                what=f"{desc} group={group} fused={fused}")


@settings(max_examples=6)
@given(drawn=layouts(max_docs=4, max_len=40),
       block=st.sampled_from([(16, 16), (16, 32), (32, 16)]))
def test_work_counter_is_minimal_on_generated_layouts(drawn, block):
    layout, _ = drawn
    check_work_counter(layout, 4, 2, DEVICE, block)


# ------------------------------------------------------------------------- hand-picked layouts
def _special_layouts():
    i32 = lambda values: torch.tensor(values, dtype=torch.int32)  # noqa: E731
    return {
        "pure_causal": Layout.causal(i32([0, 45])),
        "whole_document_span": Layout.transfusion(i32([0, 7, 40]), i32([[7, 40]])),
        "bidirectional": Layout.bidirectional(i32([0, 33, 50])),
        "single_token_documents": Layout.transfusion(i32([0, 1, 2, 20, 21, 37]), i32([[5, 12]])),
        "spans_at_document_edges": Layout.transfusion(i32([0, 17, 40]),
                                                      i32([[0, 5], [12, 17], [17, 19], [33, 40]])),
        "decode_one_token": Layout.decode(i32([0, 20, 39, 47]), i32([1, 1, 1])),
        "decode_prefix": Layout.decode(i32([0, 20, 39, 47]), i32([5, 17, 8]),
                                       spans=i32([[3, 9], [30, 39]])),
    }


SPECIAL = _special_layouts()


@pytest.mark.parametrize("name", sorted(SPECIAL))
def test_special_layouts_gqa(triton_device, name):
    layout = SPECIAL[name]
    with forced_tile_sizes(*SMALL_TILES):
        check_against_reference(layout, 4, 1, 16, torch.float32, triton_device, what=name)
    check_work_counter(layout, 4, 2, triton_device, (32, 16))


@pytest.mark.parametrize("head_dim", SUPPORTED_HEAD_DIMS)
def test_every_head_dim(triton_device, head_dim):
    layout = Layout.transfusion(torch.tensor([0, 11, 37], dtype=torch.int32),
                                torch.tensor([[14, 30]], dtype=torch.int32))
    with forced_tile_sizes(*SMALL_TILES):
        check_against_reference(layout, 2, 1, head_dim, torch.float16, triton_device,
                                what=f"head_dim={head_dim}")


def test_shipped_tile_sizes(triton_device):
    """The heuristic tiles (not forced) on a layout longer than one tile with ragged ends."""
    layout = transfusion_example(num_images=2, patches_per_image=23, text_between=9)
    config = tile_config(32, torch.float32)
    assert layout.tile_table(config.fwd_block_m, config.fwd_block_n).num_m_tiles > 1
    check_against_reference(layout, 2, 2, 32, torch.float32, triton_device, what="shipped tiles")


def test_gradients_are_deterministic(triton_device):
    layout = SPECIAL["spans_at_document_edges"].to(triton_device)
    grads = []
    for _ in range(2):
        (q, k, v), leaves, w_o, w_lse = _inputs(layout, 4, 2, 32, torch.float16, triton_device)
        with forced_tile_sizes(*SMALL_TILES):
            o, lse = triton_attention(q, k, v, layout, 0.2)
        _loss(o, lse, w_o, w_lse).backward()
        grads.append([t.grad for t in leaves])
    for first, second in zip(*grads):
        assert torch.equal(first, second)


# ------------------------------------------------------------------------- front and compile
def test_front_dispatches_to_triton_and_compiles_without_graph_break(triton_device, monkeypatch):
    launches = {"forward": 0, "backward": 0}

    def counted(name, launch):
        def wrapper(*args, **kwargs):
            launches[name] += 1
            return launch(*args, **kwargs)
        return wrapper

    for name in launches:
        attribute = f"launch_{name}"
        monkeypatch.setattr(kernels_attention, attribute,
                            counted(name, getattr(kernels_attention, attribute)))
    layout = SPECIAL["single_token_documents"].to(triton_device)
    (q, k, v), leaves, w_o, w_lse = _inputs(layout, 2, 1, 32, torch.float32, triton_device, seed=3)

    def step(q, k, v):
        o, lse = attention(q, k, v, layout, return_lse=True)
        return _loss(o, lse, w_o, w_lse)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    with transfusion_fast.use_backend("triton"), forced_tile_sizes(*SMALL_TILES):
        loss = compiled(q, k, v)
        grads = torch.autograd.grad(loss, (q, k, v))
    with transfusion_fast.use_backend("reference"):
        ref_loss = step(q, k, v)
        ref_grads = torch.autograd.grad(ref_loss, (q, k, v))
    assert launches == {"forward": 1, "backward": 1}   # the kernels ran, not a fallback
    torch.testing.assert_close(loss, ref_loss, atol=1e-3, rtol=1e-5)
    for got, ref in zip(grads, ref_grads):
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_custom_ops_are_registered():
    assert hasattr(torch.ops.transfusion_fast, "triton_attention_fwd")
    assert hasattr(torch.ops.transfusion_fast, "triton_attention_bwd")


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
def test_bf16_with_shipped_tiles_on_gpu(head_dim):
    """bf16 with the shipped tiles; CPU twin: test_every_head_dim (fp16 in the interpreter)."""
    layout = transfusion_example(num_images=2, patches_per_image=100, text_between=37,
                                 num_sequences=2)
    check_against_reference(layout, 4, 2, head_dim, torch.bfloat16, "cuda", what="bf16")


# ------------------------------------------------------------------------- kernel-specific input
def test_rejects_float64_before_launch():
    layout = SPECIAL["pure_causal"]
    q = torch.randn(layout.num_queries, 2, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="float64"):
        triton_attention(q, q, q, layout, 0.25)


def test_rejects_bad_forced_tiles_and_unknown_head_dim():
    with pytest.raises(ValueError, match="block_m must be a power of two >= 16.*got 8"):
        with forced_tile_sizes(8, 16):
            pass
    with pytest.raises(ValueError, match="head_dim=48"):
        tile_config(48, torch.float16, 90)


# ------------------------------------------------------------------------- launches
def test_specialization_key_is_at_least_as_fine_as_tritons():
    spec = kernels_launch.specialization
    # ints: Triton specializes 1, multiples of 16 and the width
    assert len({spec(1), spec(2), spec(16)}) == 3
    assert spec(32) == spec(48) and spec(3) == spec(5) == spec(17)
    assert len({spec(2**31 - 16), spec(2**31), spec(2**63)}) == 3
    # tensors: dtype and 16-byte alignment of the data pointer
    base = torch.zeros(64, dtype=torch.float16)
    assert spec(base) == spec(base[8:]) != spec(base[1:])
    assert spec(base) != spec(base.float())


def test_launcher_reuses_a_binary_only_for_the_same_specialization(monkeypatch):
    """The cached launch path (a GPU runs it; the interpreter compiles nothing): a second call with
    the same argument properties launches the kept binary with every parameter in order; a call
    with another alignment, int property or constexpr goes through the JIT again."""
    jit_calls, binary_calls = [], []

    class Binary:
        def __getitem__(self, grid):
            assert len(grid) == 3    # a CompiledKernel reads grid[0], grid[1] and grid[2]
            return lambda *args: binary_calls.append((grid, args))

    class Kernel:   # a JITFunction's surface: kernel[grid](*args, **options)
        arg_names = ["X", "n", "BLOCK"]

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                jit_calls.append((grid, args, kwargs))
                return Binary()
            return run

    monkeypatch.setattr(kernels_launch, "CompiledKernel", Binary)
    launch = kernels_launch.Launcher(Kernel())
    x = torch.zeros(64, dtype=torch.float16)
    launch((4,), x, 64, num_warps=4, num_stages=2, BLOCK=32)
    launch((8,), x, 64, num_warps=4, num_stages=2, BLOCK=32)
    assert len(jit_calls) == 1 and binary_calls == [((8, 1, 1), (x, 64, 32))]
    launch((8,), x[1:], 64, num_warps=4, num_stages=2, BLOCK=32)    # misaligned pointer
    launch((8,), x, 65, num_warps=4, num_stages=2, BLOCK=32)        # not a multiple of 16
    launch((8,), x, 64, num_warps=4, num_stages=2, BLOCK=64)        # another constexpr
    launch((8,), x, 64, num_warps=8, num_stages=2, BLOCK=32)        # other options
    assert len(jit_calls) == 5 and len(binary_calls) == 1
