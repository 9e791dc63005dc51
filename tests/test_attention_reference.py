"""The attention reference path against an independent oracle (SDPA with the dense mask), its
gradients in float64, and the validation of the public front (shared by every backend)."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import layouts

from transfusion_fast import Layout, use_backend
from transfusion_fast.ops import attention, attention_reference
from transfusion_fast.testing import dense_attention_oracle, random_qkv, transfusion_example


@given(layouts(), st.sampled_from([(2, 2), (4, 2), (4, 1)]), st.sampled_from([16, 32]))
def test_reference_equals_dense_sdpa(drawn, heads, head_dim):
    layout, desc = drawn
    hq, hkv = heads
    q, k, v = random_qkv(layout.num_queries, layout.num_keys, hq, hkv, head_dim, torch.float64)
    scale = head_dim ** -0.5
    o, lse = attention_reference(q, k, v, layout, scale, return_lse=True)
    expected = dense_attention_oracle(q, k, v, layout, scale)
    torch.testing.assert_close(o, expected, atol=1e-10, rtol=1e-10, msg=str(desc))
    # LSE against its definition on the dense score matrix.
    scores = torch.einsum("qhd,khd->hqk", q, k.repeat_interleave(hq // hkv, 1)) * scale
    scores = scores.masked_fill(~layout.dense_mask()[None], float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1).float(), atol=1e-5, rtol=1e-5)
    assert lse.dtype == torch.float32 and lse.shape == (hq, layout.num_queries)


def test_reference_gradcheck_float64():
    cu = torch.tensor([0, 5, 9], dtype=torch.int32)
    layout = Layout.transfusion(cu, torch.tensor([[1, 4], [6, 9]], dtype=torch.int32))
    q, k, v = random_qkv(9, 9, 4, 2, 16, torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v: attention_reference(q, k, v, layout, 0.25), (q, k, v))


def test_reference_is_per_document_and_handles_strided_views():
    layout = transfusion_example(num_images=2, patches_per_image=16, text_between=8, num_sequences=3)
    qkv = torch.randn(layout.num_keys, 3 * 4, 32)          # one fused projection
    q, k, v = qkv[:, 0:4], qkv[:, 4:8], qkv[:, 8:12]      # strided views
    o = attention_reference(q, k, v, layout, 32 ** -0.5)
    torch.testing.assert_close(o, dense_attention_oracle(q, k, v, layout, 32 ** -0.5), atol=2e-6, rtol=2e-6)


def test_front_reference_backend_and_default_scale():
    layout = Layout.causal(torch.tensor([0, 6, 10], dtype=torch.int32))
    q, k, v = random_qkv(10, 10, 2, 2, 64)
    with use_backend("reference"):
        o, lse = attention(q, k, v, layout, return_lse=True)
    torch.testing.assert_close(o, dense_attention_oracle(q, k, v, layout, 64 ** -0.5), atol=2e-6, rtol=2e-6)


def _inputs(t=10, hq=4, hkv=2, d=32, dtype=torch.float32):
    layout = Layout.causal(torch.tensor([0, t], dtype=torch.int32))
    return (*random_qkv(t, t, hq, hkv, d, dtype), layout)


@pytest.mark.parametrize("mutate, error, message", [
    (lambda q, k, v, l: (q[:-1], k, v, l), ValueError, "q has 9 tokens but the layout has 10"),
    (lambda q, k, v, l: (q, k[:-1], v, l), ValueError, "k has 9 tokens but the layout has 10 keys"),
    (lambda q, k, v, l: (q[:, :3], k, v, l), ValueError, r"query heads \(3\) must be a multiple"),
    (lambda q, k, v, l: (q.flatten(1), k, v, l), ValueError, "must be packed"),
    (lambda q, k, v, l: (q[..., :24], k[..., :24], v[..., :24], l), ValueError, "head_dim must be one of"),
    (lambda q, k, v, l: (q.half(), k, v, l), ValueError, "share a dtype"),
    (lambda q, k, v, l: (q.int(), k.int(), v.int(), l), ValueError, "must be one of"),
    (lambda q, k, v, l: (q.transpose(1, 2).contiguous().transpose(1, 2), k, v, l), ValueError,
     "unit stride on head_dim"),
    (lambda q, k, v, l: (q, k, v[:, :1], l), ValueError, "same \\(heads, head_dim\\)"),
    (lambda q, k, v, l: (q, k, v, "causal"), TypeError, "must be a transfusion_fast.Layout"),
])
def test_front_rejects_bad_input(mutate, error, message):
    args = mutate(*_inputs())
    with pytest.raises(error, match=message):
        attention(*args)


def test_front_rejects_bad_scale_and_device():
    q, k, v, layout = _inputs()
    with pytest.raises(ValueError, match="scale must be a positive finite float"):
        attention(q, k, v, layout, scale=-1.0)
    meta_q = torch.empty(10, 4, 32, device="meta")
    with pytest.raises(ValueError, match="one device"):
        attention(meta_q, k, v, layout)


def test_reference_backend_gradients_and_compile():
    # The reference backend runs as an opaque custom op: same values and gradients as the plain
    # function, and torch.compile(fullgraph=True) traces a caller without a graph break.
    layout = Layout.transfusion(torch.tensor([0, 7, 12], dtype=torch.int32),
                                torch.tensor([[2, 5], [8, 12]], dtype=torch.int32))
    q, k, v = random_qkv(12, 12, 4, 2, 16, torch.float64, requires_grad=True)
    plain = attention_reference(q, k, v, layout, 0.25, return_lse=True)
    grads_plain = torch.autograd.grad(plain[0].sum() + plain[1].sum(), (q, k, v))

    def run(q, k, v):
        o, lse = attention(q, k, v, layout, scale=0.25, return_lse=True)
        return o.sum() + lse.sum()

    with use_backend("reference"):
        grads_op = torch.autograd.grad(run(q, k, v), (q, k, v))
        compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
        grads_compiled = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    for a, b, c in zip(grads_plain, grads_op, grads_compiled):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(a, c, atol=1e-12, rtol=1e-12)
