"""One NaN / infinity semantics for attention on every backend (ops.attention's docstring,
docs/nan_semantics.md): IEEE arithmetic over the visible pairs only.

A NaN in q, k or v, or a +inf score, reaches exactly the outputs and gradients whose formula
contains it over the pairs (row, key) the layout makes visible: never a row that does not see the
key, never another document, also not a short document that shares a tile with it. The reference
backend (its explicit forward and backward), the compiled CPU kernels on every ISA path this CPU
runs and the Triton kernels (interpreted on a CPU-only machine) must give the same elementwise pattern of non-finite values in o, lse, dq, dk and dv, and the same finite values elsewhere. The issue's
reproductions are also checked against their expected pattern, written out by hand.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F


from transfusion_fast import Layout, backend, ops
from transfusion_fast.ops._cpu_attention import available_cpu_isas, use_cpu_isa

NAN, INF = float("nan"), float("inf")
SCALE = 0.5
# Finite entries against the reference backend computed from the same (fp32-cast) inputs: fp32 is
# summation order; fp16 rounds P and dS to fp16 before the products (tests/test_attention_triton.py).
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (3e-2, 3e-2)}


def _reference(q, k, v, layout, scale):
    with backend.use_backend("reference"):
        return ops.attention(q, k, v, layout, scale, return_lse=True)


def _cpu(isa):
    def run(q, k, v, layout, scale):
        with use_cpu_isa(isa), backend.use_backend("auto"):
            return ops.attention(q, k, v, layout, scale, return_lse=True)
    return run


def _triton(block_m, block_n):
    """The Triton kernels (compiled on a GPU, else interpreted) with forced tiles: 16 x 16 puts
    several short documents, and both ends of a span, in one tile."""
    def run(q, k, v, layout, scale):
        from transfusion_fast.kernels.attention import forced_tile_sizes, triton_attention
        device = "cuda" if torch.cuda.is_available() else "cpu"
        leaves = [t.to(device) for t in (q, k, v)]
        with forced_tile_sizes(block_m, block_n):
            o, lse = triton_attention(*leaves, layout.to(device), scale)
        return o.cpu(), lse.cpu()
    return run


BACKENDS = {**{f"cpu-{isa}": _cpu(isa) for isa in available_cpu_isas()},
            "triton-16x16": _triton(16, 16), "triton-32x16": _triton(32, 16)}


def _run(fn, layout, q, k, v, dtype):
    """o, lse, dq, dk, dv (as fp32) of a loss that weights every o and lse entry."""
    leaves = [t.to(dtype).detach().requires_grad_() for t in (q, k, v)]
    o, lse = fn(*leaves, layout, SCALE)
    g = torch.Generator().manual_seed(7)
    w_o, w_lse = torch.randn(o.shape, generator=g), torch.randn(lse.shape, generator=g)
    ((o.float() * w_o).sum() + (lse.float() * w_lse).sum()).backward()
    return {"o": o.detach().float(), "lse": lse.detach().float(),
            **{name: t.grad.float() for name, t in zip(("dq", "dk", "dv"), leaves)}}


def _inputs(layout, heads=2, kv_heads=2, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(layout.num_queries, heads, d, generator=g),
            torch.randn(layout.num_keys, kv_heads, d, generator=g),
            torch.randn(layout.num_keys, kv_heads, d, generator=g))


def _case_issue_nan_key():
    # The issue: causal layout [0, 4], k[0, 0, 0] = NaN. Every row sees key 0.
    layout = Layout.causal(torch.tensor([0, 4]))
    q, k, v = _inputs(layout)
    k[0, 0, 0] = NAN
    return layout, q, k, v


def _case_issue_inf_score():
    # A +inf score: head 0 of every query is e_0 and k[1, 0, 0] = +inf, so rows 1-3 (those that
    # see key 1) have the score +inf, row 0 does not see it.
    layout = Layout.causal(torch.tensor([0, 4]))
    q, k, v = _inputs(layout)
    q[:, 0] = 0.0
    q[:, 0, 0] = 1.0
    k[1, 0, 0] = INF
    return layout, q, k, v


def _case_issue_nan_value():
    # The issue: a NaN in v[99] of a causal document: rows 99.. see it, rows 96-98 (its tile) not.
    layout = Layout.causal(torch.tensor([0, 150]))
    q, k, v = _inputs(layout)
    v[99, 1, 3] = NAN
    return layout, q, k, v


def _case_short_documents():
    # Several documents inside one tile, each with a different poison: NaN in v, NaN in k, +inf in
    # q (scores +-inf and NaN), and a Transfusion span (bidirectional inside it).
    layout = Layout.transfusion(torch.tensor([0, 3, 5, 9, 12, 20, 25, 40, 70]),
                                torch.tensor([[14, 18], [44, 60]]))
    q, k, v = _inputs(layout, heads=4, kv_heads=2)
    v[10, 0, 3] = NAN
    k[15, 1, 0] = NAN
    q[30, 0, 1] = INF
    v[50, 1, 0] = -INF
    return layout, q, k, v


def _case_bidirectional():
    # Fully bidirectional documents (the portable path runs ATen's kernel forward on these when the
    # inputs are finite): a NaN in q reaches its own row only, one in v its whole document.
    layout = Layout.bidirectional(torch.tensor([0, 20, 33, 60]))
    q, k, v = _inputs(layout)
    q[5, 1, 2] = NAN
    v[40, 0, 7] = NAN
    return layout, q, k, v


def _case_all_scores_minus_inf():
    # Rows 0 and 1 see only keys whose head-0 score is -inf: o = 0/0 = NaN, lse = -inf; the other
    # document is untouched.
    layout = Layout.causal(torch.tensor([0, 4, 40]))
    q, k, v = _inputs(layout)
    q[:, 0] = 0.0
    q[:, 0, 0] = 1.0
    k[0:2, 0, 0] = -INF
    return layout, q, k, v


CASES = {"issue_nan_key": _case_issue_nan_key, "issue_inf_score": _case_issue_inf_score,
         "issue_nan_value": _case_issue_nan_value, "short_documents": _case_short_documents,
         "bidirectional": _case_bidirectional, "all_scores_minus_inf": _case_all_scores_minus_inf}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_non_finite_pattern_matches_the_reference(name, case, dtype):
    layout, q, k, v = CASES[case]()
    want = _run(_reference, layout, q, k, v, dtype)
    got = _run(BACKENDS[name], layout, q, k, v, dtype)
    atol, rtol = TOL[dtype]
    for what in want:
        bad_want, bad_got = ~torch.isfinite(want[what]), ~torch.isfinite(got[what])
        assert bad_want.any() or what in ("lse", "dv"), f"{case}: the case poisons no {what}"
        assert torch.equal(bad_got, bad_want), (
            f"{name} {case} {what}: non-finite at {bad_got.nonzero().tolist()[:12]}, the reference at "
            f"{bad_want.nonzero().tolist()[:12]}")
        torch.testing.assert_close(got[what][~bad_want], want[what][~bad_want], atol=atol, rtol=rtol,
                                   msg=lambda m: f"{name} {case} {what}: {m}")


def _rows(t, head):
    """Sorted row indices whose head ``head`` holds a non-finite value."""
    bad = ~torch.isfinite(t[:, head] if t.dim() == 3 else t[head])
    return (bad.flatten(1).any(1) if bad.dim() > 1 else bad).nonzero()[:, 0].tolist()


@pytest.mark.parametrize("name", ["reference"] + sorted(BACKENDS))
def test_issue_reproductions_give_the_documented_pattern(name):
    fn = _reference if name == "reference" else BACKENDS[name]
    # NaN key 0, head 0: every row of head 0 is NaN (o and lse), head 1 is untouched.
    r = _run(fn, *_case_issue_nan_key(), torch.float32)
    assert _rows(r["o"], 0) == _rows(r["lse"], 0) == [0, 1, 2, 3]
    assert _rows(r["o"], 1) == _rows(r["lse"], 1) == _rows(r["dq"], 1) == []
    # +inf score: exp(inf - inf) = NaN in the rows that see key 1, row 0 stays finite (forward and
    # its dq); dk/dv of key 0 are NaN through rows 1-3, which see it too.
    r = _run(fn, *_case_issue_inf_score(), torch.float32)
    assert _rows(r["o"], 0) == _rows(r["lse"], 0) == _rows(r["dq"], 0) == [1, 2, 3]
    assert _rows(r["dk"], 0) == _rows(r["dv"], 0) == [0, 1, 2, 3]
    assert _rows(r["o"], 1) == []
    # NaN in v[99] (head 1): rows 99.. of head 1, not rows 96-98 of its tile, not row 0; the lse
    # does not read v; dq of the NaN rows (their delta is NaN), dk of every key those rows see;
    # dv only in the NaN's own entry.
    r = _run(fn, *_case_issue_nan_value(), torch.float32)
    assert _rows(r["o"], 1) == _rows(r["dq"], 1) == list(range(99, 150))
    assert _rows(r["lse"], 1) == [] and _rows(r["o"], 0) == []
    assert _rows(r["dk"], 1) == list(range(150))
    assert (~torch.isfinite(r["dv"])).nonzero().tolist() == []


def test_reference_agrees_with_sdpa_on_one_bidirectional_document():
    # Where every pair is visible, IEEE propagation is what SDPA's math does (no mask, so no
    # masked 0 * NaN): the reference backend must give SDPA's pattern, forward and backward.
    layout = Layout.bidirectional(torch.tensor([0, 12]))
    q, k, v = _inputs(layout)
    q[3, 0, 0] = NAN
    k[5, 1, 1] = INF
    v[7, 0, 2] = NAN

    def sdpa(q, k, v, layout, scale):
        o = F.scaled_dot_product_attention(*(t.transpose(0, 1) for t in (q, k, v)), scale=scale)
        scores = (q.transpose(0, 1) @ k.transpose(0, 1).transpose(1, 2)) * scale
        return o.transpose(0, 1), torch.logsumexp(scores, -1)

    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        want = _run(sdpa, layout, q, k, v, torch.float32)
    got = _run(_reference, layout, q, k, v, torch.float32)
    for what in want:
        assert torch.equal(~torch.isfinite(got[what]), ~torch.isfinite(want[what])), what
