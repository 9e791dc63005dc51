"""The compiled block-sparse CPU attention (csrc/attention_cpu*, ops/_cpu_attention.py).

Checked against the reference path and the dense-mask SDPA oracle, forward, LSE and gradients, on
the hypothesis layouts of tests/strategies.py, with small tiles so that every run mixes skipped,
full and partial tiles (and ragged last tiles). Tolerances (atol, rtol):

* fp32: outputs/LSE ``testing.TOLERANCES`` (2e-5): only the summation order differs (online
  softmax over tiles, BLAS blocking). Gradients 1e-4: each is a sum over up to ~160 keys or rows of
  products of O(1) terms, and P is recomputed from the LSE, so a few more rounding steps stack up.
* bf16 / fp16: inputs are converted to fp32 once and everything accumulates in fp32, so the only
  error beyond fp32 is the final rounding of o / dq / dk / dv to 8 (bf16) or 11 (fp16) bits; the
  reference runs in fp32 on the same (rounded) inputs: ``TOLERANCES`` of the dtype, atol scaled by
  the magnitude of the tensor.
* fp64: runs in fp64 end to end: 1e-10.

Every ISA path this CPU can run (``available_cpu_isas()``: avx512, avx2, portable) goes through the
same checks: the ``isa`` fixture / parametrization selects it with ``use_cpu_isa``.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from transfusion_fast import Layout, _ext, backend, ops
from transfusion_fast.ops.attention import SUPPORTED_HEAD_DIMS, attention_reference
from transfusion_fast.ops._cpu_attention import (BACKWARD_BLOCKS, CPU_ISA_ENV, CPU_ISAS, FORWARD_BLOCKS,
                                                 available_cpu_isas, cpu_attention, cpu_isa, set_cpu_isa,
                                                 use_cpu_isa)
from transfusion_fast.testing import (TOLERANCES, dense_attention_oracle, packed_documents_example,
                                      random_qkv, transfusion_example)

from strategies import layouts

#: the ISA paths this CPU runs, best first (portable always)
ISAS = available_cpu_isas()

GRAD_TOL = {torch.float64: (1e-10, 1e-8), torch.float32: (1e-4, 1e-4),
            torch.float16: TOLERANCES[torch.float16], torch.bfloat16: TOLERANCES[torch.bfloat16]}
BLOCKS = st.sampled_from([(16, 16), (16, 32), (32, 16), (32, 32), (64, 64), FORWARD_BLOCKS,
                         BACKWARD_BLOCKS])


def _assert_close(actual, expected, tol, what):
    atol, rtol = tol
    actual, expected = actual.detach().double(), expected.detach().double()
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual, expected, atol=atol * scale, rtol=rtol,
                               msg=lambda m: f"{what}: {m}")


def _reference_with_grads(q, k, v, layout, scale, grad_o, grad_lse):
    """Reference path in the compute dtype (fp32, fp64 for fp64) on the same input values."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    qr, kr, vr = (t.detach().to(compute).requires_grad_(True) for t in (q, k, v))
    o, lse = attention_reference(qr, kr, vr, layout, scale, return_lse=True)
    loss = (o * grad_o.to(compute)).sum() + (lse.to(compute) * grad_lse.to(compute)).sum()
    return (o.detach(), lse.detach(), *torch.autograd.grad(loss, (qr, kr, vr)))


def _check_against_reference(layout, hq, hkv, d, dtype, block=FORWARD_BLOCKS, seed=0, qkv=None,
                             backward_block=BACKWARD_BLOCKS):
    scale = 1.0 / math.sqrt(d)
    if qkv is None:
        q, k, v = random_qkv(layout.num_queries, layout.num_keys, hq, hkv, d, dtype=dtype, seed=seed,
                             requires_grad=True)
        leaves = (q, k, v)
    else:
        (q, k, v), leaves = qkv
    o, lse = cpu_attention(q, k, v, layout, scale, block, backward_block)
    assert o.dtype == dtype and o.shape == q.shape and lse.dtype == torch.float32
    assert lse.shape == (q.shape[1], q.shape[0])
    g = torch.Generator().manual_seed(seed + 1)
    grad_o = torch.randn(o.shape, generator=g).to(dtype)
    grad_lse = torch.randn(lse.shape, generator=g)
    grads = torch.autograd.grad((o.float() * grad_o.float()).sum() + (lse * grad_lse).sum(), (q, k, v))
    ref_o, ref_lse, *ref_grads = _reference_with_grads(q, k, v, layout, scale, grad_o, grad_lse)
    _assert_close(o, ref_o, TOLERANCES[dtype], "o")
    _assert_close(lse, ref_lse, TOLERANCES[torch.float32 if dtype != torch.float64 else dtype], "lse")
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert got.dtype == dtype and got.shape == want.shape
        _assert_close(got, want, GRAD_TOL[dtype], name)
    return leaves


@pytest.fixture(params=ISAS)
def isa(request):
    """Each ISA path of the CPU attention this CPU runs: avx512, avx2 (hand-written kernels), portable
    (BLAS products, compiler-vectorized passes: what non-x86 CPUs run)."""
    with use_cpu_isa(request.param):
        yield request.param


# ------------------------------------------------------------------------------ reference path
@settings(max_examples=30)
@given(layout=layouts(), group=st.sampled_from([1, 2, 4]), hkv=st.sampled_from([1, 2]),
       d=st.sampled_from(SUPPORTED_HEAD_DIMS), block=BLOCKS, backward_block=BLOCKS,
       seed=st.integers(0, 2**16))
@pytest.mark.parametrize("isa_name", ISAS)
def test_matches_reference_fp32(isa_name, layout, group, hkv, d, block, backward_block, seed):
    with use_cpu_isa(isa_name):
        _check_against_reference(layout[0], hkv * group, hkv, d, torch.float32, block, seed,
                                 backward_block=backward_block)


@settings(max_examples=15)
@given(layout=layouts(), group=st.sampled_from([1, 2, 4]), d=st.sampled_from((32, 64, 128)),
       dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float64]), block=BLOCKS,
       seed=st.integers(0, 2**16))
@pytest.mark.parametrize("isa_name", ISAS)
def test_matches_reference_other_dtypes(isa_name, layout, group, d, dtype, block, seed):
    with use_cpu_isa(isa_name):
        _check_against_reference(layout[0], 2 * group, 2, d, dtype, block, seed, backward_block=block)


@pytest.mark.parametrize("d", SUPPORTED_HEAD_DIMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_head_dim_on_a_transfusion_layout(isa, d, dtype):
    # 3 images of 37 patches between 20 text tokens: spans straddle 32-row tile edges.
    _check_against_reference(transfusion_example(3, 37, 20), 4, 2, d, dtype, (32, 32),
                             backward_block=(16, 32))


@pytest.mark.parametrize("kind", ["single_token_docs", "span_at_doc_edges", "decode"])
def test_edge_layouts(isa, kind):
    if kind == "single_token_docs":
        layout = Layout.causal(torch.tensor([0, 1, 2, 3, 40, 41, 80]))
    elif kind == "span_at_doc_edges":
        layout = Layout.transfusion(torch.tensor([0, 33, 70, 71]), torch.tensor([[0, 17], [50, 70], [70, 71]]))
    else:
        layout = Layout.decode(torch.tensor([0, 50, 51, 120]), torch.tensor([3, 1, 17]),
                               torch.tensor([[10, 20], [110, 120]]))
    _check_against_reference(layout, 4, 1, 64, torch.float32, (16, 16), backward_block=(16, 16))


# ------------------------------------------------------------------------------ document-aware walk
@pytest.mark.parametrize("blocks", [(FORWARD_BLOCKS, BACKWARD_BLOCKS), ((64, 64), (64, 64)), ((256, 128), (16, 256))])
def test_long_packed_documents(isa, blocks):
    # A 1,100-token document (mask-free runs longer than one 1,024-key GEMM), documents ending
    # inside row and key tiles, a run of short documents that merge into one masked segment, GQA.
    cu = torch.tensor([0, 1100, 1109, 1113, 1114, 1130, 1290, 1300])
    forward_blocks, backward_blocks = blocks
    _check_against_reference(Layout.causal(cu), 4, 2, 32, torch.float32, forward_blocks,
                             backward_block=backward_blocks)


def test_scratch_memory_kept_between_calls_changes_nothing():
    # Each thread keeps its tile buffers and the transposed keys between calls (csrc Scratch, up
    # to 8 MiB per buffer; larger requests get their own). Calls after a larger, a smaller and an
    # over-the-limit call (17,408 tokens in 64-token documents, 2 kv heads: the transposed keys and
    # the backward's buffers are over 8 MiB) must not see what those left behind.
    long_docs = Layout.causal(torch.arange(0, 17_408 + 1, 64))
    for layout in (transfusion_example(3, 37, 20), long_docs, Layout.causal(torch.tensor([0, 100, 170, 300])),
                   transfusion_example(3, 37, 20)):
        _check_against_reference(layout, 4, 2, 64, torch.float32)


@pytest.mark.parametrize("layout", [
    Layout.causal(torch.tensor([0, 100, 170, 300])),
    Layout.transfusion(torch.tensor([0, 100, 170, 300]), torch.tensor([[90, 100], [100, 140], [200, 260]])),
    Layout.bidirectional(torch.tensor([0, 100, 170, 300]))], ids=["causal", "transfusion", "bidirectional"])
@pytest.mark.parametrize("blocks", [(FORWARD_BLOCKS, BACKWARD_BLOCKS), ((64, 64), (64, 64))])
def test_documents_never_read_each_other(isa, layout, blocks):
    # The documents end inside tiles. NaN in every input of the middle document: a row, key or
    # gradient of another document that met it even once (a masked 0 times NaN is NaN) would turn
    # NaN, so finite values elsewhere show that the walk stays inside each document, forward and
    # backward. They must also still match the reference.
    forward_blocks, backward_blocks = blocks
    q, k, v = random_qkv(300, 300, 2, 2, 64, seed=3)
    grad_o = torch.randn(300, 2, 64)
    poisoned = slice(100, 170)
    for t in (q, k, v, grad_o):
        t[poisoned] = float("nan")
    leaves = tuple(t.clone().requires_grad_(True) for t in (q, k, v))
    o, _ = cpu_attention(*leaves, layout, 0.125, forward_blocks, backward_blocks)
    grads = torch.autograd.grad(o, leaves, grad_o)
    clean = torch.ones(300, dtype=torch.bool)
    clean[poisoned] = False
    want = attention_reference(*(t.nan_to_num(0.0).requires_grad_(True) for t in (q, k, v)), layout, 0.125)
    for name, got in zip(("o", "dq", "dk", "dv"), (o, *grads)):
        assert torch.isfinite(got[clean]).all(), f"{name}: another document read the NaN document"
        assert torch.isnan(got[poisoned]).all(), f"{name}: the NaN document itself must stay NaN"
    _assert_close(o[clean], want[clean], TOLERANCES[torch.float32], "o outside the NaN document")


# ------------------------------------------------------------------------------ dense oracle
@settings(max_examples=15)
@given(layout=layouts(), group=st.sampled_from([1, 2, 4]), block=BLOCKS, seed=st.integers(0, 2**16))
@pytest.mark.parametrize("isa_name", ISAS)
def test_matches_dense_sdpa_oracle(isa_name, layout, group, block, seed):
    with use_cpu_isa(isa_name):
        _check_against_dense_oracle(layout[0], group, block, seed)


def _check_against_dense_oracle(layout, group, block, seed):
    q, k, v = random_qkv(layout.num_queries, layout.num_keys, 2 * group, 2, 32, seed=seed,
                         requires_grad=True)
    o, _ = cpu_attention(q, k, v, layout, 0.3, block, block)
    grad_o = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), grad_o)
    want = dense_attention_oracle(q, k, v, layout, 0.3)
    want_grads = torch.autograd.grad(want, (q, k, v), grad_o)
    _assert_close(o, want, TOLERANCES[torch.float32], "o vs dense oracle")
    for name, got, exp in zip(("dq", "dk", "dv"), grads, want_grads):
        _assert_close(got, exp, GRAD_TOL[torch.float32], f"{name} vs dense oracle")


# ------------------------------------------------------------------------------ strides, dispatch
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (4, 1)])
def test_strided_views_of_a_fused_qkv_tensor(isa, hq, hkv):
    layout = transfusion_example(2, 29, 23)
    t = layout.num_keys
    fused = torch.randn(t, hq + 2 * hkv, 64, requires_grad=True)   # one projection output
    q, k, v = fused[:, :hq], fused[:, hq:hq + hkv], fused[:, hq + hkv:]
    assert not q.is_contiguous() and q.stride(0) == (hq + 2 * hkv) * 64
    _check_against_reference(layout, hq, hkv, 64, torch.float32, (32, 32), qkv=((q, k, v), (fused,)),
                             backward_block=(32, 32))
    # heads-major storage (H, T, D) viewed as (T, H, D): token stride D
    heads_major = torch.randn(hq, t, 64).transpose(0, 1).requires_grad_(True)
    kv = torch.randn(2, hkv, t, 64).transpose(1, 2)
    _check_against_reference(layout, hq, hkv, 64, torch.float32, (32, 32), backward_block=(32, 32),
                             qkv=((heads_major, kv[0].requires_grad_(True), kv[1].requires_grad_(True)),
                                  (heads_major,)))


def test_auto_backend_on_cpu_runs_this_kernel():
    layout = transfusion_example(2, 40, 30)
    q, k, v = random_qkv(layout.num_queries, layout.num_keys, 4, 2, 64)
    with backend.use_backend("auto"):
        assert backend.resolve(q, "attention") == "cpu"
        o, lse = ops.attention(q, k, v, layout, return_lse=True)
    direct_o, direct_lse = cpu_attention(q, k, v, layout, 1 / 8)
    assert torch.equal(o, direct_o) and torch.equal(lse, direct_lse)


def test_backward_is_deterministic_for_a_thread_count(isa):
    # MQA (one kv head) on up to 3 threads: the key tiles are split into chunks whose dQ partial sums
    # are added in a fixed order, so a rerun gives the same bits. The chunking follows the thread
    # count, so different thread counts agree to rounding only.
    layout = packed_documents_example(700, 5)
    q, k, v = random_qkv(700, 700, 4, 1, 64, requires_grad=True)
    previous = torch.get_num_threads()
    by_threads = {}
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            runs = []
            for _ in range(2):
                o, _ = cpu_attention(q, k, v, layout, 0.125)
                runs.append((o, *torch.autograd.grad(o.square().sum(), (q, k, v))))
            for a, b in zip(*runs):
                assert torch.equal(a, b), f"two runs on {threads} threads differ"
            by_threads[threads] = runs[0]
    finally:
        torch.set_num_threads(previous)
    for threads in (2, 3):
        for a, b in zip(by_threads[1], by_threads[threads]):
            _assert_close(a, b, GRAD_TOL[torch.float32], f"{threads} threads vs 1")


# ------------------------------------------------------------------------------ ISA paths
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", [transfusion_example(3, 37, 20), Layout.causal(torch.tensor([0, 1100, 1109, 1113, 1130, 1300])),
                                    Layout.bidirectional(torch.tensor([0, 100, 170, 300]))],
                         ids=["transfusion", "packed causal", "bidirectional"])
def test_each_isa_path_matches_reference(isa, layout, dtype):
    # Every path through the same walk: merged mask-free GEMMs, masked sub-blocks, GQA.
    assert cpu_isa() == isa
    _check_against_reference(layout, 4, 2, 64, dtype)


def test_isa_paths_agree_closely():
    # The paths differ only in summation order and in the exp's last bits: on the same inputs they
    # agree far inside the reference tolerance (a path that drops or doubles a tile would not).
    layout = transfusion_example(3, 37, 20)
    q, k, v = random_qkv(layout.num_queries, layout.num_keys, 4, 2, 64, requires_grad=True, seed=5)
    results = {}
    for name in ISAS:
        with use_cpu_isa(name):
            o, lse = cpu_attention(q, k, v, layout, 0.125, (32, 32), (16, 32))
            results[name] = (o, lse, *torch.autograd.grad(o.square().sum() + lse.sum(), (q, k, v)))
    for name in ISAS[:-1]:
        for what, got, want in zip(("o", "lse", "dq", "dk", "dv"), results[name], results["portable"]):
            _assert_close(got, want, (1e-5, 1e-5), f"{name} vs portable {what}")


@pytest.mark.parametrize("cu", [[0, 300], [0, 100, 170, 300]], ids=["one document", "three documents"])
def test_dense_documents_take_the_faster_forward(isa, cu, monkeypatch):
    # A layout dense per document: the paths whose own forward is slower than ATen's flash kernel
    # there hand it the forward (the backward stays this kernel's); values, LSE and gradients (GQA,
    # a differentiated LSE) must match the reference either way.
    from transfusion_fast.ops import _cpu_attention
    calls = []
    original = _cpu_attention._aten_dense_forward
    monkeypatch.setattr(_cpu_attention, "_aten_dense_forward", lambda *a: calls.append(1) or original(*a))
    _check_against_reference(Layout.bidirectional(torch.tensor(cu)), 4, 2, 64, torch.float32)
    assert bool(calls) == (isa in _cpu_attention.ATEN_FORWARD_FOR_DENSE_DOCUMENTS)
    calls.clear()
    _check_against_reference(transfusion_example(2, 40, 20), 4, 2, 64, torch.float32)   # not dense
    assert not calls


def test_isa_selector_rejects_what_the_cpu_cannot_run():
    assert ISAS[-1] == "portable" and set(ISAS) <= set(CPU_ISAS)
    default = cpu_isa()
    assert default == ISAS[0], "the default is the best path this CPU runs"
    for name in CPU_ISAS:
        if name in ISAS:
            with use_cpu_isa(name):
                assert cpu_isa() == name
            assert cpu_isa() == default
        else:   # e.g. avx512 on an AVX2 machine: refused, the selection unchanged
            with pytest.raises(ValueError, match=f"this CPU cannot run the '{name}' path"):
                set_cpu_isa(name)
            with pytest.raises(RuntimeError, match=f"isa='{name}' needs a CPU with"):
                _ext.ops().attention_cpu_set_isa(name)
            assert cpu_isa() == default
    with pytest.raises(ValueError, match=r"must be one of \('avx512', 'avx2', 'portable'\), got 'sse'"):
        set_cpu_isa("sse")
    with pytest.raises(RuntimeError, match="isa must be one of 'avx512', 'avx2', 'portable', got 'sse'"):
        _ext.ops().attention_cpu_set_isa("sse")


_ENV_SCRIPT = textwrap.dedent("""
    import sys, torch
    from transfusion_fast.ops._cpu_attention import cpu_attention, cpu_isa
    from transfusion_fast.testing import transfusion_example, random_qkv
    layout = transfusion_example(1, 8, 8)
    q, k, v = random_qkv(layout.num_keys, layout.num_keys, 2, 2, 32)
    try:
        cpu_attention(q, k, v, layout, 0.2)
    except ValueError as error:
        print("error:", error)
        sys.exit(0)
    print("isa:", cpu_isa())
""")


@pytest.mark.parametrize("value", ["portable", "avx2", "avx512", "sse"])
def test_isa_environment_variable(value):
    env = dict(os.environ, **{CPU_ISA_ENV: value})
    out = subprocess.run([sys.executable, "-c", _ENV_SCRIPT], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    if value in ISAS:
        assert out.stdout.strip() == f"isa: {value}"
    elif value in CPU_ISAS:
        assert f"{CPU_ISA_ENV}='{value}': this CPU cannot run the '{value}' path" in out.stdout
    else:
        assert f"{CPU_ISA_ENV}='sse': the CPU attention ISA must be one of" in out.stdout


# ------------------------------------------------------------------------------ tile product
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (15, 7, 3), (16, 6, 64), (17, 13, 1), (64, 12, 63), (65, 5, 257),
                                   (130, 11, 600), (40, 1, 0)])
def test_tile_product_matches_torch(isa, m, n, k, trans_b):
    # The product every tile of the CPU attention goes through: the register-tiled fp32 kernels of
    # the AVX-512 and AVX2 paths, BLAS on the portable path. Partial vectors of m (16 and 8 lanes),
    # every column remainder of the 6-wide tiles, k across its 256-deep blocks and k = 0, operands with a row stride (leading
    # dimension) larger than their width, beta = 0 over a NaN-filled c (must not be read), beta = 1.
    g = torch.Generator().manual_seed(m * 1000 + n * 10 + k)
    a = torch.randn(k, m + 3, generator=g)[:, :m]
    b = torch.randn(*((k, n + 5) if trans_b else (n, k + 5)), generator=g)
    b = b[:, :n] if trans_b else b[:, :k]
    b_rows = b.t() if trans_b else b                     # op(b): (n, k)
    c = torch.randn(n, m, generator=g)
    for alpha, beta, c_in in ((0.7, 0.0, torch.full_like(c, float("nan"))), (1.3, 1.0, c)):
        got = _ext.ops().attention_cpu_tile_gemm(a, b, c_in, trans_b, alpha, beta)
        want = alpha * (b_rows.double() @ a.double()) + (beta * c_in.double() if beta else 0)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4 * max(1, k) ** 0.5)


def test_tile_product_rejects_bad_shapes():
    a, c = torch.randn(8, 16), torch.randn(4, 16)
    with pytest.raises(RuntimeError, match=r"b must be \[4, 8\], got \[8, 4\]"):
        _ext.ops().attention_cpu_tile_gemm(a, torch.randn(8, 4), c, False, 1.0, 0.0)
    with pytest.raises(RuntimeError, match="a must be a 2-d float32 tensor"):
        _ext.ops().attention_cpu_tile_gemm(a.double(), torch.randn(4, 8), c, False, 1.0, 0.0)


# ------------------------------------------------------------------------------ tile tables
def _fwd_with_tables(q, k, v, mask_layout, table, scale):
    return _ext.ops().attention_cpu_fwd(q, k, v, mask_layout.kv_start, mask_layout.kv_end, table.kv_lo,
                                        table.kv_hi, table.kv_full_lo, table.kv_full_hi, table.block_m,
                                        table.block_n, scale)[0]


def test_kernel_walks_only_the_tiles_of_the_table():
    t, b = 128, 32
    cu = torch.tensor([0, t])
    q, k, v = random_qkv(t, t, 2, 2, 32)
    # The rows' intervals say "see everything", the table says "causal tiles": the skipped tiles
    # above the diagonal must not be read, so every row sees exactly the keys up to its tile's end.
    got = _fwd_with_tables(q, k, v, Layout.bidirectional(cu), Layout.causal(cu).tile_table(b, b), 0.2)
    rows = torch.arange(t)
    block_causal = rows[None, :] < (rows[:, None] // b + 1) * b
    want = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                          attn_mask=block_causal, scale=0.2).transpose(0, 1)
    _assert_close(got, want, TOLERANCES[torch.float32], "block-causal walk")


@pytest.mark.parametrize("d", [20, 36])
def test_head_dim_off_the_vector_width_through_the_raw_op(isa, d):
    # The front only passes SUPPORTED_HEAD_DIMS (multiples of 16), the op itself takes any head_dim:
    # partial vectors in the accumulator rescale, the transposes and the output rows.
    layout = transfusion_example(2, 29, 23)
    t = layout.num_keys
    q, k, v = random_qkv(t, t, 4, 2, d)
    got = _fwd_with_tables(q, k, v, layout, layout.tile_table(32, 32), 0.2)
    want = F.scaled_dot_product_attention(q.transpose(0, 1), k.repeat_interleave(2, 1).transpose(0, 1),
                                          v.repeat_interleave(2, 1).transpose(0, 1),
                                          attn_mask=layout.dense_mask(), scale=0.2).transpose(0, 1)
    _assert_close(got, want, TOLERANCES[torch.float32], f"head_dim {d}")


def test_full_tiles_apply_no_mask():
    t, b = 128, 32
    cu = torch.tensor([0, t])
    q, k, v = random_qkv(t, t, 2, 2, 32)
    # Causal row intervals with an all-full table: a full tile must not look at the mask, so the
    # result is bidirectional attention.
    got = _fwd_with_tables(q, k, v, Layout.causal(cu), Layout.bidirectional(cu).tile_table(b, b), 0.2)
    want = attention_reference(q, k, v, Layout.bidirectional(cu), 0.2)
    _assert_close(got, want, TOLERANCES[torch.float32], "full tiles")


# ------------------------------------------------------------------------------ memory
_MEMORY_SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    from transfusion_fast.testing import transfusion_example
    from transfusion_fast.ops._cpu_attention import cpu_attention
    torch.manual_seed(0)
    layout = transfusion_example(4, 256, 128, num_sequences=20)   # 20 documents, 33,280 tokens
    t, h, d = layout.num_keys, 2, 64
    q, k, v = (torch.randn(t, h, d, requires_grad=True) for _ in range(3))
    grad_o = torch.randn(t, h, d)
    layout.tile_table(128, 128), layout.tile_table(64, 128)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    o, lse = cpu_attention(q, k, v, layout, 0.125)
    o.backward(grad_o)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()
    print(t, h, d, after - before)
""")


def test_peak_memory_is_linear_in_tokens():
    env = dict(os.environ, OMP_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    t, h, d, growth = map(int, out.stdout.split())
    assert t > 32_000
    per_tensor = t * h * d * 4          # one fp32 (T, H, D) tensor: 17 MB here
    # o, lse, dq (+ its buffer), dk, dv, delta, dO*O temporaries, the autograd saves: about a dozen
    # (T, H, D)-sized tensors. A single fp32 T x T score matrix would be 4.4 GB, 260x this bound.
    bound = 16 * per_tensor
    assert growth < bound, f"peak RSS grew by {growth / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB"


# ------------------------------------------------------------------------------ bad input, compile
def test_bad_input_is_rejected_before_the_kernel():
    layout = transfusion_example(1, 20, 10)
    q, k, v = random_qkv(layout.num_queries, layout.num_keys, 2, 2, 32)
    with pytest.raises(ValueError, match=r"q must have one of the dtypes .* got torch.int32"):
        cpu_attention(q.int(), k.int(), v.int(), layout, 0.1)
    with pytest.raises(ValueError, match="block_m must be a positive int <= 2147483647, got int 0"):
        cpu_attention(q, k, v, layout, 0.1, (0, 32))
    table = layout.tile_table(16, 16)
    with pytest.raises(RuntimeError, match=r"kv_lo must be a contiguous int32 vector of 3 entries"):
        _ext.ops().attention_cpu_fwd(q, k, v, layout.kv_start, layout.kv_end, table.kv_lo[:2], table.kv_hi,
                                     table.kv_full_lo, table.kv_full_hi, 16, 16, 0.1)
    with pytest.raises(RuntimeError, match=r"kv_start must be a contiguous int32 vector of 40 entries"):
        _ext.ops().attention_cpu_fwd(q, k, v, layout.kv_start.long(), layout.kv_end, table.kv_lo,
                                     table.kv_hi, table.kv_full_lo, table.kv_full_hi, 16, 16, 0.1)
    with pytest.raises(ValueError, match="head_dim must be one of"):   # the front validates first
        ops.attention(q[..., :24], k[..., :24], v[..., :24], layout)


def test_torch_compile_fullgraph_through_ops_attention():
    layout = transfusion_example(2, 24, 16)
    q, k, v = random_qkv(layout.num_queries, layout.num_keys, 4, 2, 32, requires_grad=True)

    def loss_fn(q, k, v):
        o, lse = ops.attention(q, k, v, layout, return_lse=True)
        return o.square().sum() + lse.sum()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    with backend.use_backend("auto"):
        got = compiled(q, k, v)
        got_grads = torch.autograd.grad(got, (q, k, v))
        want = loss_fn(q, k, v)
        want_grads = torch.autograd.grad(want, (q, k, v))
    _assert_close(got, want, TOLERANCES[torch.float32], "compiled loss")
    for got_g, want_g in zip(got_grads, want_grads):
        _assert_close(got_g, want_g, GRAD_TOL[torch.float32], "compiled grads")
