"""Exact softmax attention over a packed batch with a :class:`~transfusion_fast.Layout` mask.

``attention(q, k, v, layout)`` validates every input, then dispatches on the backend switch:
Triton (``transfusion_fast.kernels.attention``) on CUDA, the compiled block-sparse C++ kernel
(``transfusion_fast.ops._cpu_attention``) on CPU, or :func:`attention_reference`.
"""
from __future__ import annotations

import math

import torch

from .. import backend as _backend
from ..checks import check_bool, check_float, refuse_double_backward
from ..kernels.attention_tiles import SUPPORTED_HEAD_DIMS, tile_config
from ..layout import Layout
from ._cpu_attention import BACKWARD_BLOCKS, FORWARD_BLOCKS, cpu_attention

__all__ = ["attention", "attention_reference", "check_attention_inputs", "attention_tile_sizes",
           "SUPPORTED_HEAD_DIMS"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout,
                           scale: float | None) -> float:
    """Raise a precise error on any bad input; return the softmax scale to use."""
    if not isinstance(layout, Layout):
        raise TypeError(f"layout must be a transfusion_fast.Layout, got {type(layout).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name} must be packed (tokens, heads, head_dim), got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name} must be one of {_DTYPES}, got {t.dtype}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have unit stride on head_dim, got strides {t.stride()}")
        if t.device != q.device:
            raise ValueError(f"q, k and v must be on one device: q is on {q.device}, {name} on {t.device}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k and v must share a dtype: got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if layout.device.type != q.device.type or (
            q.device.type == "cuda" and layout.device != q.device):
        raise ValueError(f"layout is on {layout.device} but q is on {q.device}: build the Layout on "
                         f"the tensors' device (or call layout.to(device))")
    if q.shape[0] != layout.num_queries:
        raise ValueError(f"q has {q.shape[0]} tokens but the layout has {layout.num_queries} query rows")
    for name, t in (("k", k), ("v", v)):
        if t.shape[0] != layout.num_keys:
            raise ValueError(f"{name} has {t.shape[0]} tokens but the layout has {layout.num_keys} keys")
    if k.shape[1:] != v.shape[1:]:
        raise ValueError(f"k and v must have the same (heads, head_dim), got {tuple(k.shape[1:])} and "
                         f"{tuple(v.shape[1:])}")
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[2]
    if k.shape[2] != d:
        raise ValueError(f"q and k must share head_dim, got {d} and {k.shape[2]}")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"the number of query heads ({hq}) must be a multiple of the number of "
                         f"key/value heads ({hkv}) (GQA/MQA)")
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {SUPPORTED_HEAD_DIMS}, got {d}")
    if scale is None:
        return 1.0 / math.sqrt(d)
    return check_float("scale", scale, 0.0, low_open=True)


def attention_tile_sizes(device, head_dim: int) -> tuple[tuple[int, int], ...]:
    """The ``(block_m, block_n)`` tile tables :func:`attention` reads from a Layout on ``device``
    under the ``auto`` backend: the CPU kernels' two, or on a GPU the Triton forward / dK-dV / dQ
    tilings of ``head_dim`` for fp32 and for 16-bit inputs (the device's generation).

    Building these tables where the layout is made (``Layout.to(device, tile_sizes=...)``, which
    :func:`~transfusion_fast.pack` does) keeps their construction off the device and out of a
    compiled model's graph.
    """
    device = torch.device(device)
    if device.type == "cpu":
        return (FORWARD_BLOCKS, BACKWARD_BLOCKS)
    if device.type != "cuda":
        return ()
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {SUPPORTED_HEAD_DIMS}, got {head_dim!r}")
    arch = 90 if torch.cuda.get_device_capability(device)[0] >= 9 else 80
    sizes = []
    for dtype in (torch.float32, torch.bfloat16):
        c = tile_config(head_dim, dtype, arch)
        sizes += [(c.fwd_block_m, c.fwd_block_n), (c.dkdv_block_m, c.dkdv_block_n), (c.dq_block_m, c.dq_block_n)]
    return tuple(dict.fromkeys(sizes))


def _documents(q, k, v, kv_start, kv_end, cu_seqlens, q_cu_seqlens):
    """Per document with query rows: its row/key ranges, q/k/v as (Hq, L, D) in the compute dtype
    (k and v repeated over each GQA group), and its (Lq, Lk) visibility mask."""
    group = q.shape[1] // k.shape[1]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    q_cu, kv_cu = q_cu_seqlens.tolist(), cu_seqlens.tolist()
    for d in range(len(kv_cu) - 1):
        q0, q1, k0, k1 = q_cu[d], q_cu[d + 1], kv_cu[d], kv_cu[d + 1]
        if q1 == q0:
            continue
        qd = q[q0:q1].to(compute).transpose(0, 1)                                   # (Hq, Lq, D)
        kd = k[k0:k1].to(compute).repeat_interleave(group, dim=1).transpose(0, 1)   # (Hq, Lk, D)
        vd = v[k0:k1].to(compute).repeat_interleave(group, dim=1).transpose(0, 1)
        cols = torch.arange(k0, k1, device=q.device)
        visible = (cols[None, :] >= kv_start[q0:q1, None]) & (cols[None, :] < kv_end[q0:q1, None])
        yield (q0, q1, k0, k1), qd, kd, vd, visible


def _visible_matmul(a, visible, b):
    """``Σ_j a[..., i, j] · b[..., j, d]`` over the visible pairs ``(i, j)`` only, each product in IEEE
    arithmetic: ``a @ b`` when every factor is finite; otherwise the products with a non-finite
    factor are summed column by column where they are visible (a plain ``a @ b`` would add
    ``0 · NaN = NaN`` from the invisible pairs, where ``a`` is 0, into every row of the document).
    ``a`` (H, M, N), ``visible`` (M, N) bool, ``b`` (H, N, D) → (H, M, D); O(H·M·N) memory."""
    finite_a, finite_b = torch.isfinite(a), torch.isfinite(b)
    if bool(finite_a.all()) and bool(finite_b.all()):
        return a @ b
    out = torch.where(finite_a, a, 0) @ torch.where(finite_b, b, 0)
    if bool(finite_a.all()):
        columns = (~finite_b).flatten(0, -2).any(0).nonzero()[:, 0].tolist()    # those holding one
    else:
        columns = range(b.shape[-1])
    for d in columns:
        b_d = b[..., d]                                                             # (H, N)
        pairs = visible & (~finite_a | ~torch.isfinite(b_d)[:, None, :])            # a non-finite factor
        out[..., d] += torch.where(pairs, a * b_d[:, None, :], 0).sum(-1)
    return out


def _reference_from_intervals(q, k, v, kv_start, kv_end, cu_seqlens, q_cu_seqlens, scale):
    """The reference computation on the layout's tensors; see :func:`attention_reference` and the
    NaN / infinity semantics of :func:`attention`."""
    outs, lses = [], []
    for _, qd, kd, vd, visible in _documents(q, k, v, kv_start, kv_end, cu_seqlens, q_cu_seqlens):
        scores = (qd @ kd.transpose(1, 2)) * scale                                  # (Hq, Lq, Lk)
        scores = scores.masked_fill(~visible, float("-inf"))
        m = scores.amax(-1, keepdim=True)                                           # NaN if any score is
        # A row whose visible scores are all -inf: weights exp(-inf) = 0, o = 0/0 = NaN, lse = -inf.
        m = m.masked_fill(m == float("-inf"), 0.0)
        e = torch.exp(scores - m)                        # a +inf score: exp(inf - inf) = NaN
        total = e.sum(-1)                                                           # (Hq, Lq)
        outs.append((_visible_matmul(e, visible, vd) / total[..., None]).transpose(0, 1))   # (Lq, Hq, D)
        lses.append(m[..., 0] + torch.log(total))
    return torch.cat(outs, 0).to(q.dtype), torch.cat(lses, 1).float()


def _reference_backward_from_intervals(grad_o, grad_lse, q, k, v, kv_start, kv_end, cu_seqlens,
                                      q_cu_seqlens, scale):
    """The textbook attention backward, one document at a time (recomputes P from scratch).

    dS = P ∘ (dO·Vᵀ − rowsum(dO ∘ O) + dLSE), dQ = scale·dS·K, dK = scale·dSᵀ·Q, dV = Pᵀ·dO, with the
    query heads of a GQA group summed into their shared key/value head.
    """
    hkv, group = k.shape[1], q.shape[1] // k.shape[1]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    dq = torch.zeros(q.shape, dtype=compute, device=q.device)
    dk = torch.zeros(k.shape, dtype=compute, device=k.device)
    dv = torch.zeros(v.shape, dtype=compute, device=v.device)
    for (q0, q1, k0, k1), qd, kd, vd, visible in _documents(q, k, v, kv_start, kv_end, cu_seqlens,
                                                            q_cu_seqlens):
        dod = grad_o[q0:q1].to(compute).transpose(0, 1)                             # (Hq, Lq, D)
        scores = ((qd @ kd.transpose(1, 2)) * scale).masked_fill(~visible, float("-inf"))
        p = torch.softmax(scores, dim=-1).masked_fill(~visible, 0.0)                 # (Hq, Lq, Lk)
        delta = (dod * _visible_matmul(p, visible, vd)).sum(-1, keepdim=True) - grad_lse[:, q0:q1, None].to(compute)
        ds = torch.where(visible, p * (dod @ vd.transpose(1, 2) - delta), 0.0)
        dq[q0:q1] = _visible_matmul(ds, visible, kd).transpose(0, 1) * scale
        dk_d = _visible_matmul(ds.transpose(1, 2), visible.T, qd) * scale            # (Hq, Lk, D)
        dv_d = _visible_matmul(p.transpose(1, 2), visible.T, dod)
        dk[k0:k1] = dk_d.reshape(hkv, group, k1 - k0, -1).sum(1).transpose(0, 1)
        dv[k0:k1] = dv_d.reshape(hkv, group, k1 - k0, -1).sum(1).transpose(0, 1)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout,
                        scale: float, return_lse: bool = False):
    """Plain PyTorch, one document at a time: O(sum of doc²) memory, never O(T²).

    Its forward follows :func:`attention`'s NaN / infinity semantics. Differentiating it directly
    is for finite inputs: through a non-finite one, torch's gradient of ``where`` multiplies the
    hidden branch by 0 and spreads NaN; the ``reference`` backend's explicit backward does not.

    q (Tq, Hq, D), k/v (Tk, Hkv, D) → o (Tq, Hq, D) [, lse (Hq, Tq) float32]
    """
    o, lse = _reference_from_intervals(q, k, v, layout.kv_start, layout.kv_end, layout.cu_seqlens,
                                       layout.q_cu_seqlens, scale)
    return (o, lse) if return_lse else o


# The reference path loops over documents with Python ints, which torch.compile cannot trace. As
# the reference backend it therefore runs as an opaque custom op (forward, and a backward that
# recomputes the reference under autograd), so that a compiled model traces it without a graph
# break while its math stays the plain code above.
@torch.library.custom_op("transfusion_fast::reference_attention", mutates_args=())
def _reference_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            kv_start: torch.Tensor, kv_end: torch.Tensor, cu_seqlens: torch.Tensor,
                            q_cu_seqlens: torch.Tensor, scale: float
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    return _reference_from_intervals(q, k, v, kv_start, kv_end, cu_seqlens, q_cu_seqlens, scale)


@_reference_attention_op.register_fake
def _(q, k, v, kv_start, kv_end, cu_seqlens, q_cu_seqlens, scale):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("transfusion_fast::reference_attention_backward", mutates_args=())
def _reference_attention_backward_op(grad_o: torch.Tensor, grad_lse: torch.Tensor, q: torch.Tensor,
                                     k: torch.Tensor, v: torch.Tensor, kv_start: torch.Tensor,
                                     kv_end: torch.Tensor, cu_seqlens: torch.Tensor,
                                     q_cu_seqlens: torch.Tensor, scale: float
                                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _reference_backward_from_intervals(grad_o, grad_lse, q, k, v, kv_start, kv_end,
                                              cu_seqlens, q_cu_seqlens, scale)


@_reference_attention_backward_op.register_fake
def _(grad_o, grad_lse, q, k, v, kv_start, kv_end, cu_seqlens, q_cu_seqlens, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _reference_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:7])
    ctx.scale = inputs[7]


def _reference_backward(ctx, grad_o, grad_lse):
    q, k, v, kv_start, kv_end, cu_seqlens, q_cu_seqlens = ctx.saved_tensors
    if grad_lse is None:
        grad_lse = torch.zeros((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device)
    dq, dk, dv = _reference_attention_backward_op(grad_o, grad_lse, q, k, v, kv_start, kv_end,
                                                  cu_seqlens, q_cu_seqlens, ctx.scale)
    return dq, dk, dv, None, None, None, None, None


_reference_attention_op.register_autograd(_reference_backward, setup_context=_reference_setup_context)
refuse_double_backward(_reference_attention_backward_op, "attention (reference backend)")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout,
              scale: float | None = None, return_lse: bool = False):
    """Softmax attention where query row ``i`` sees keys ``[layout.kv_start[i], layout.kv_end[i])``.

    Args:
        q: ``(Tq, Hq, D)`` packed queries; k, v: ``(Tk, Hkv, D)`` with ``Hq % Hkv == 0`` (GQA).
            Any stride along tokens and heads; unit stride along ``D``.
        layout: the mask (built on the tensors' device).
        scale: softmax scale, default ``1/sqrt(D)``.
        return_lse: also return the log-sum-exp of each row, ``(Hq, Tq)`` float32.
    Returns:
        ``o`` of shape ``(Tq, Hq, D)`` and dtype of q, or ``(o, lse)``.

    NaN and infinities (the same on the reference, CPU and Triton backends, forward and backward;
    see docs/nan_semantics.md):
    IEEE arithmetic over the visible pairs only. Each output and gradient is the softmax formula
    summed over the pairs (row ``i``, key ``j``) the layout makes visible, and the hidden pairs add
    nothing, not even ``0 * NaN``. So a NaN in ``q``, ``k`` or ``v`` reaches exactly the rows
    that see it, inside its document, never another document (also not one sharing a tile); a
    ``+inf`` score makes its row NaN (``exp(inf - inf)``, as SDPA); a row whose visible scores are
    all ``-inf`` gives ``o`` NaN and ``lse = -inf``. Gradients follow the same formulas: a NaN row
    makes ``dq`` of that row and ``dk`` / ``dv`` of the keys it sees NaN.
    """
    scale = check_attention_inputs(q, k, v, layout, scale)
    return_lse = check_bool("return_lse", return_lse)
    impl = _backend.resolve(q, "attention")
    if impl == "triton":
        if q.dtype == torch.bfloat16 and q.device.type != "cuda":
            raise ValueError("attention: backend 'triton' runs bf16 on a GPU only; under TRITON_INTERPRET=1 "
                             "(CPU tensors) tl.dot on bf16 inputs gives wrong results. Got bf16 q on "
                             f"{q.device}: use float16/float32 inputs (autocast dtype=torch.float16) or "
                             "the 'auto' backend")
        # Imported on first use, not at the top: the Triton path loads torch._dynamo (for its
        # torch.compile support), which would add seconds to `import transfusion_fast` on machines
        # that only ever run the CPU kernels. It is a downward import (ops <- kernels): no cycle.
        from ..kernels.attention import triton_attention
        o, lse = triton_attention(q, k, v, layout, scale)
    elif impl == "cpu":
        o, lse = cpu_attention(q, k, v, layout, scale)
    else:
        o, lse = _reference_attention_op(q, k, v, layout.kv_start, layout.kv_end, layout.cu_seqlens,
                                         layout.q_cu_seqlens, scale)
    return (o, lse) if return_lse else o
