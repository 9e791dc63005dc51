"""Fused linear + cross-entropy: the LM loss of ``hidden @ weight.T`` without the full logits.

``linear_cross_entropy(hidden, weight, targets)`` equals ``F.cross_entropy(F.linear(hidden, weight),
targets)`` (plus an optional z-loss) but walks the rows in chunks: per chunk it computes the logits
with one matmul, the loss of each row, and — when a gradient is needed — d(loss)/d(logits) in the
same buffer, then the chunk's hidden gradient (``dlogits @ weight``) and its share of the weight
gradient (``dlogits.T @ hidden_chunk``, accumulated). Memory is O(chunk × vocab) instead of
O(rows × vocab): at 4,096 rows and a 131,072-token vocabulary the fp32 logits alone are 2 GiB (the
unfused loss also keeps their log-softmax and builds their gradient), a default chunk is 64 MiB.

The gradients are computed during the forward and kept (the hidden gradient, the weight and bias
gradients: the size of the inputs, not of the logits); the backward only multiplies them by the
incoming gradient of the loss. With ``reduction="none"`` the incoming gradient is one value per row,
which the weight gradient cannot absorb after the fact, so that forward computes only the losses and
the backward recomputes each chunk's logits (one more matmul per chunk).

Implementations (picked by :func:`transfusion_fast.backend.resolve`), all through one chunk loop
(:func:`_chunked_forward`):

* ``"triton"``: logits by torch matmul (cuBLAS), then the row kernel of
  :mod:`transfusion_fast.kernels.linear_cross_entropy` (online log-sum-exp, loss, gradient in place);
* ``"cpu"``: the same loop with the row math in torch ops (in place on the chunk: max, ``exp``,
  sum, scale), run by ATen's compiled CPU kernels;
* ``"reference"``: :func:`linear_cross_entropy_reference`, ``F.linear`` + ``F.cross_entropy`` on
  the full logits, written for clarity: the ground truth of the tests.

Both chunked implementations run as one opaque custom op with a fake kernel
(``transfusion_fast::linear_cross_entropy``) under an ``autograd.Function``, so that
``torch.compile(fullgraph=True)`` traces a function that calls the op without a graph break.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from transfusion_fast.backend import resolve
from transfusion_fast.checks import check_bool, check_float, check_int, describe
from transfusion_fast.kernels import linear_cross_entropy as lce_kernels

__all__ = ["linear_cross_entropy", "linear_cross_entropy_reference", "check_linear_cross_entropy_inputs",
           "default_chunk_size", "REDUCTIONS", "LOGITS_CHUNK_ELEMENTS"]

REDUCTIONS = ("mean", "sum", "none")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TARGET_DTYPES = (torch.int64, torch.int32)

#: Logits per chunk when ``chunk_size`` is not given: 2**24 (64 MiB in float32), i.e. 128 rows at a
#: 131,072-token vocabulary. Large enough that every matmul of a chunk is a large GEMM; small next
#: to the weight gradient the op returns anyway (vocab × hidden).
LOGITS_CHUNK_ELEMENTS = 1 << 24


def default_chunk_size(rows: int, vocab: int) -> int:
    """Rows per chunk: ``LOGITS_CHUNK_ELEMENTS // vocab`` (at least 1), at most ``rows``."""
    return max(1, min(rows, LOGITS_CHUNK_ELEMENTS // max(vocab, 1)))


# ============================================================================ validation
def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype of the matmuls: the autocast dtype under ``torch.autocast`` on the tensors' device
    (as ``F.linear`` would run; float64 is never downcast), else the inputs' shared dtype."""
    device_type = hidden.device.type
    if hidden.dtype != torch.float64 and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return hidden.dtype


def check_linear_cross_entropy_inputs(hidden, weight, targets, bias, ignore_index, label_smoothing,
                                      z_loss, reduction, chunk_size, return_z_loss) -> tuple[float, float]:
    """Raise a precise error on any bad input (the target range excepted: it needs the values, see
    :func:`_check_target_range`); return ``(label_smoothing, z_loss)`` as floats."""
    for name, t in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {describe(t)}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {describe(bias)}")
    if hidden.dim() < 2:
        raise ValueError(f"hidden must have shape (..., hidden_dim) with at least one leading (row) "
                         f"dimension, got shape {tuple(hidden.shape)}")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"hidden must have one of the dtypes {_FLOAT_DTYPES}, got {hidden.dtype}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(f"weight must have shape (vocab, {hidden.shape[-1]}) with vocab >= 1 (hidden_dim "
                         f"= the last dim of hidden), got shape {tuple(weight.shape)}")
    if weight.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"weight must have one of the dtypes {_FLOAT_DTYPES}, got {weight.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight must be on hidden's device {hidden.device}, got {weight.device}")
    autocast = torch.is_autocast_enabled(hidden.device.type) and torch.float64 not in (hidden.dtype, weight.dtype)
    if weight.dtype != hidden.dtype and not autocast:
        raise ValueError(f"weight must have hidden's dtype {hidden.dtype} (outside torch.autocast), got "
                         f"{weight.dtype}")
    if bias is not None:
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},) (vocab), got shape {tuple(bias.shape)}")
        if bias.device != hidden.device:
            raise ValueError(f"bias must be on hidden's device {hidden.device}, got {bias.device}")
        if bias.dtype != weight.dtype and not (autocast and bias.dtype in _FLOAT_DTYPES):
            raise ValueError(f"bias must have weight's dtype {weight.dtype} (outside torch.autocast), got "
                             f"{bias.dtype}")
    if targets.dtype not in _TARGET_DTYPES:
        raise ValueError(f"targets must hold class indices of dtype torch.int64 or torch.int32, got {targets.dtype}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets must have shape {tuple(hidden.shape[:-1])} (hidden's shape without its last "
                         f"dim), got shape {tuple(targets.shape)}")
    if targets.device != hidden.device:
        raise ValueError(f"targets must be on hidden's device {hidden.device}, got {targets.device}")
    check_int("ignore_index", ignore_index)
    smoothing = check_float("label_smoothing", label_smoothing, 0.0, 1.0)
    if smoothing == 1.0:            # [0, 1): all mass on the uniform part leaves nothing to learn
        raise ValueError(f"label_smoothing must be a finite float in [0, 1), got {describe(label_smoothing)}")
    z_loss = check_float("z_loss", z_loss, 0.0)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if chunk_size is not None:
        check_int("chunk_size", chunk_size, 1)
    check_bool("return_z_loss", return_z_loss)
    return smoothing, z_loss


def _check_target_range(targets: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Every target in ``[0, vocab)`` or equal to ``ignore_index``. Reads the values (a device sync
    on CUDA), so it runs inside the op's implementation, where ``torch.compile`` does not trace."""
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        position = int(bad.reshape(-1).nonzero()[0, 0])
        raise ValueError(f"targets must be class indices in [0, {vocab}) (vocab = weight.shape[0]) or "
                         f"ignore_index ({ignore_index}), got {int(targets.reshape(-1)[position])} at flat "
                         f"position {position}")


# ============================================================================ reference
def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                                   bias: Optional[torch.Tensor] = None, ignore_index: int = -100,
                                   label_smoothing: float = 0.0, z_loss: float = 0.0,
                                   reduction: str = "mean", return_z_loss: bool = False):
    """The plain PyTorch definition, on the full logits.

    ``logits = F.linear(hidden, weight, bias)`` (in the autocast dtype under ``torch.autocast``),
    cast to float32 (float64 stays float64); per row with a target (``targets != ignore_index``)::

        loss_i = F.cross_entropy(logits_i, t_i, label_smoothing=ε) + z_loss · logsumexp(logits_i)²

    and 0 for ignored rows. ``reduction="mean"`` divides the sum by the number of rows with a target
    (0 when there is none: ``F.cross_entropy`` gives NaN there, but a packed batch without text
    targets must contribute nothing); ``"sum"`` sums; ``"none"`` returns the rows in targets' shape.
    With ``return_z_loss`` also the z-loss term alone (``z_loss · lse²``, reduced the same way).
    """
    logits = F.linear(hidden, weight, bias)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)).reshape(-1, weight.shape[0])
    rows_t = targets.reshape(-1).long()
    if not torch.compiler.is_compiling():
        _check_target_range(rows_t, weight.shape[0], ignore_index)
    ce = F.cross_entropy(logits, rows_t, ignore_index=ignore_index, label_smoothing=label_smoothing,
                         reduction="none")
    valid = rows_t != ignore_index
    # (z_loss · lse) · lse like the kernels: z_loss · lse² overflows to 0 · inf = NaN for huge logits.
    lse = torch.logsumexp(logits, dim=-1)
    z_rows = torch.where(valid, z_loss * lse * lse, 0.0)
    loss_rows = ce + z_rows
    if reduction == "none":
        loss, z_term = loss_rows.reshape(targets.shape), z_rows.reshape(targets.shape)
    elif reduction == "sum":
        loss, z_term = loss_rows.sum(), z_rows.sum()
    else:
        count = valid.sum().clamp(min=1)
        loss, z_term = loss_rows.sum() / count, z_rows.sum() / count
    return (loss, z_term.detach()) if return_z_loss else loss


# ============================================================================ chunked implementation
def _accumulation_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if compute_dtype == torch.float64 else torch.float32


def _torch_rows(logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor, loss: torch.Tensor,
                lse_out: torch.Tensor, ignore_index: int, label_smoothing: float, z_loss: float,
                compute_grad: bool) -> None:
    """The CPU twin of ``kernels.linear_cross_entropy.launch_rows``: same outputs, same in-place
    gradient, in torch ops on the chunk (one buffer: the exponentials overwrite the logits)."""
    acc = loss.dtype
    x = logits if logits.dtype == acc else logits.to(acc)
    vocab = x.shape[1]
    valid = targets != ignore_index
    target_col = torch.where(valid, targets, 0)[:, None]
    x_target = x.gather(1, target_col)[:, 0]
    sum_x = x.sum(1) if label_smoothing else None
    m = x.amax(1)
    x.sub_(m[:, None]).exp_()
    s = x.sum(1)
    lse = m + s.log()
    row_loss = lse - (1.0 - label_smoothing) * x_target + z_loss * lse * lse
    if label_smoothing:
        row_loss = row_loss - (label_smoothing / vocab) * sum_x
    loss.copy_(torch.where(valid, row_loss, 0.0))
    lse_out.copy_(torch.where(valid, lse, 0.0))
    if not compute_grad:
        return
    row_scale = torch.where(valid, scale.to(acc).expand(x.shape[0]), 0.0)
    x.mul_((row_scale * (1.0 + 2.0 * z_loss * lse) / s)[:, None])
    if label_smoothing:
        x.sub_((row_scale * (label_smoothing / vocab))[:, None])
    x.scatter_add_(1, target_col, (-(1.0 - label_smoothing) * row_scale)[:, None])
    if x is not logits:
        logits.copy_(x)


def _nothing(like: torch.Tensor) -> torch.Tensor:
    """The placeholder of a gradient that was not requested (a fresh one each: outputs never alias)."""
    return like.new_empty(0)


def _chunked_forward(hidden, weight, bias, targets, scale, ignore_index, label_smoothing, z_loss,
                     chunk_size, compute_dtype, use_triton, grad_hidden, grad_weight, grad_bias):
    """Losses, log-sum-exps and the requested gradients of ``Σ_i scale_i · loss_i``, chunk by chunk.

    hidden (N, D), weight (V, D), bias (V,) or None, targets (N,) int64, scale (1,) or (N,) in the
    accumulation dtype (float32; float64 for float64).
    Matmuls in ``compute_dtype``; the row math, the weight and bias gradient sums in float32
    (float64 for float64). Returns loss (N,), lse (N,) in that accumulation dtype, and the hidden,
    weight and bias gradients in the inputs' dtypes (an empty tensor where not requested).
    """
    rows, vocab = hidden.shape[0], weight.shape[0]
    acc = _accumulation_dtype(compute_dtype)
    device = hidden.device
    _check_target_range(targets, vocab, ignore_index)
    row_math = lce_kernels.launch_rows if use_triton else _torch_rows
    h = hidden.to(compute_dtype)
    w = weight.to(compute_dtype)
    b = bias.to(compute_dtype) if bias is not None else None
    targets = targets.contiguous()
    per_row_scale = scale.numel() != 1
    loss = torch.empty(rows, dtype=acc, device=device)
    lse = torch.empty(rows, dtype=acc, device=device)
    dh = torch.empty((rows, hidden.shape[1]), dtype=hidden.dtype, device=device) if grad_hidden else _nothing(hidden)
    dw = torch.zeros((vocab, weight.shape[1]), dtype=acc, device=device) if grad_weight else _nothing(hidden)
    db = torch.zeros(vocab, dtype=acc, device=device) if grad_bias else _nothing(hidden)
    compute_grad = grad_hidden or grad_weight or grad_bias
    for start in range(0, rows, chunk_size):
        end = min(rows, start + chunk_size)
        h_chunk = h[start:end]
        logits = torch.addmm(b, h_chunk, w.t()) if b is not None else torch.mm(h_chunk, w.t())
        row_math(logits, targets[start:end], scale[start:end] if per_row_scale else scale, loss[start:end],
                 lse[start:end], ignore_index, label_smoothing, z_loss, compute_grad)
        if grad_hidden:
            if dh.dtype == logits.dtype:
                torch.mm(logits, w, out=dh[start:end])
            else:
                dh[start:end] = torch.mm(logits, w)
        if grad_weight:
            if dw.dtype == logits.dtype:
                dw.addmm_(logits.t(), h_chunk)
            else:     # half-precision matmul, then the sum over chunks in float32
                dw.add_(torch.mm(logits.t(), h_chunk))
        if grad_bias:
            db.add_(logits.sum(0, dtype=acc))
        del logits    # freed before the next chunk's logits are allocated
    return (loss, lse, dh, dw.to(weight.dtype) if grad_weight else dw,
            db.to(bias.dtype) if grad_bias else db)


@torch.library.custom_op("transfusion_fast::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy_op(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                             targets: torch.Tensor, scale: torch.Tensor, ignore_index: int,
                             label_smoothing: float, z_loss: float, chunk_size: int,
                             compute_dtype: torch.dtype, use_triton: bool, grad_hidden: bool,
                             grad_weight: bool, grad_bias: bool
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # The matmul dtype is decided by the caller (compute_dtype); autocast stays out of the loop.
    with torch.autocast(hidden.device.type, enabled=False):
        return _chunked_forward(hidden, weight, bias, targets, scale, ignore_index, label_smoothing, z_loss,
                                chunk_size, compute_dtype, use_triton, grad_hidden, grad_weight, grad_bias)


@_linear_cross_entropy_op.register_fake
def _(hidden, weight, bias, targets, scale, ignore_index, label_smoothing, z_loss, chunk_size, compute_dtype,
      use_triton, grad_hidden, grad_weight, grad_bias):
    acc = _accumulation_dtype(compute_dtype)
    return (hidden.new_empty(hidden.shape[0], dtype=acc), hidden.new_empty(hidden.shape[0], dtype=acc),
            hidden.new_empty(hidden.shape) if grad_hidden else _nothing(hidden),
            weight.new_empty(weight.shape) if grad_weight else _nothing(hidden),
            bias.new_empty(bias.shape) if grad_bias else _nothing(hidden))


def _reduce(rows: torch.Tensor, reduction: str, count: torch.Tensor) -> torch.Tensor:
    if reduction == "none":
        return rows
    total = rows.sum()
    return total / count if reduction == "mean" else total


class _LinearCrossEntropy(torch.autograd.Function):
    """(loss, z-loss term) of row-flattened inputs; the z-loss term is for logging (no gradient)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index, label_smoothing, z_loss, reduction,
                chunk_size, compute_dtype, use_triton, grad_hidden, grad_weight, grad_bias):
        ctx.options = (ignore_index, label_smoothing, z_loss, chunk_size, compute_dtype, use_triton)
        ctx.reduction = reduction
        valid = targets != ignore_index
        count = valid.sum().clamp(min=1)
        acc = _accumulation_dtype(compute_dtype)
        if reduction == "none":
            # Per-row incoming gradients: the backward recomputes the chunks with them as the scale.
            scale = torch.ones(1, dtype=acc, device=hidden.device)
            loss_rows, lse, *_ = _linear_cross_entropy_op(
                hidden, weight, bias, targets, scale, ignore_index, label_smoothing, z_loss, chunk_size,
                compute_dtype, use_triton, False, False, False)
            ctx.save_for_backward(hidden, weight, bias, targets)
        else:
            scale = (1.0 / count.to(acc) if reduction == "mean"
                     else torch.ones((), dtype=acc, device=hidden.device)).reshape(1)
            loss_rows, lse, dh, dw, db = _linear_cross_entropy_op(
                hidden, weight, bias, targets, scale, ignore_index, label_smoothing, z_loss, chunk_size,
                compute_dtype, use_triton, grad_hidden, grad_weight, grad_bias)
            ctx.save_for_backward(dh, dw, db)
        z_rows = z_loss * lse * lse          # lse is 0 on ignored rows
        z_term = _reduce(z_rows, reduction, count)
        ctx.mark_non_differentiable(z_term)
        return _reduce(loss_rows, reduction, count), z_term

    @staticmethod
    def backward(ctx, grad_loss, _grad_z):
        needs = ctx.needs_input_grad
        if ctx.reduction == "none":
            hidden, weight, bias, targets = ctx.saved_tensors
            ignore_index, label_smoothing, z_loss, chunk_size, compute_dtype, use_triton = ctx.options
            _, _, dh, dw, db = _linear_cross_entropy_op(
                hidden, weight, bias, targets, grad_loss.to(_accumulation_dtype(compute_dtype)).contiguous(), ignore_index,
                label_smoothing, z_loss, chunk_size, compute_dtype, use_triton, needs[0], needs[1],
                bias is not None and needs[2])
        else:
            dh, dw, db = ctx.saved_tensors
            dh, dw, db = (g * grad_loss if needed else None for g, needed in zip((dh, dw, db), needs[:3]))
        return (dh if needs[0] else None, dw if needs[1] else None, db if needs[2] else None,
                None, None, None, None, None, None, None, None, None, None, None)


# ============================================================================ public op
def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         bias: Optional[torch.Tensor] = None, ignore_index: int = -100,
                         label_smoothing: float = 0.0, z_loss: float = 0.0, reduction: str = "mean",
                         chunk_size: Optional[int] = None, return_z_loss: bool = False):
    """Cross-entropy of ``F.linear(hidden, weight, bias)`` against ``targets``, never holding the
    ``(rows, vocab)`` logits: the rows are processed ``chunk_size`` at a time.

    Args:
        hidden: ``(..., D)`` float16 / bfloat16 / float32 / float64 (float64: CPU and reference
            backends only), any strides. Every position of the leading dims is a row.
        weight: ``(V, D)``, the output projection (``nn.Linear(D, V).weight``, or a tied embedding).
        targets: ``(...)`` = ``hidden.shape[:-1]``, int64 or int32 class indices in ``[0, V)``, or
            ``ignore_index`` for rows without a loss. Checked (a ValueError names the first bad one).
        bias: optional ``(V,)``.
        ignore_index: target value of rows that contribute no loss and no gradient (default -100,
            as ``F.cross_entropy``).
        label_smoothing: ε in ``[0, 1)``: the target distribution is ``(1 − ε)·onehot + ε / V``, as
            in ``F.cross_entropy``.
        z_loss: coefficient ``≥ 0`` of the z-loss ``z_loss · logsumexp(logits)²`` added to each row's
            loss (PaLM's auxiliary loss that keeps the softmax normalizer near 1).
        reduction: ``"mean"`` over the rows with a target (0 when there is none), ``"sum"``, or
            ``"none"`` (the per-row losses in targets' shape, 0 on ignored rows).
        chunk_size: rows per chunk, default :func:`default_chunk_size` (about 2**24 logits).
        return_z_loss: also return the z-loss term alone, reduced the same way, without gradient
            (for logging; it is already included in the loss).

    Returns:
        ``loss`` (a scalar, or ``targets.shape`` with ``reduction="none"``), or ``(loss, z_loss_term)``.

    Dtypes: outside ``torch.autocast``, hidden, weight and bias share one dtype and the matmuls run
    in it. Under ``torch.autocast`` on the tensors' device they run in the autocast dtype (as
    ``F.linear`` would; fp32 parameters with bf16 activations are fine). The logits are the matmul's
    output (rounded to that dtype); softmax, loss and z-loss are computed in float32 and the loss is
    float32 (float64 for float64 inputs). Gradients come back in each input's own dtype; the weight
    and bias gradients are summed over the chunks in float32.

    Differentiable w.r.t. hidden, weight and bias (once). Gradients are computed in the forward when
    any of them requires grad (``reduction="none"``: in the backward), so the forward of a training
    step costs the three matmuls of forward + backward, and a forward under ``torch.no_grad`` only one.
    The target range check reads the targets (one device sync on CUDA).
    """
    label_smoothing, z_loss = check_linear_cross_entropy_inputs(
        hidden, weight, targets, bias, ignore_index, label_smoothing, z_loss, reduction, chunk_size,
        return_z_loss)
    impl = resolve(hidden, "linear_cross_entropy")
    if impl == "reference":
        return linear_cross_entropy_reference(
            hidden, weight, targets, bias=bias, ignore_index=ignore_index, label_smoothing=label_smoothing,
            z_loss=z_loss, reduction=reduction, return_z_loss=return_z_loss)
    compute_dtype = _compute_dtype(hidden, weight)
    if impl == "triton" and compute_dtype not in lce_kernels.SUPPORTED_DTYPES:
        raise ValueError(f"linear_cross_entropy (triton): the matmul dtype must be one of "
                         f"{lce_kernels.SUPPORTED_DTYPES}, got {compute_dtype}; use backend 'reference' "
                         f"(or CPU tensors) for float64")
    vocab, dim = weight.shape
    rows_h = hidden.reshape(-1, dim)
    rows_t = targets.reshape(-1).long()
    chunk = default_chunk_size(rows_h.shape[0], vocab) if chunk_size is None else int(chunk_size)
    grad_enabled = torch.is_grad_enabled()
    needs = (grad_enabled and hidden.requires_grad, grad_enabled and weight.requires_grad,
             grad_enabled and bias is not None and bias.requires_grad)
    loss, z_term = _LinearCrossEntropy.apply(rows_h, weight, bias, rows_t, int(ignore_index), label_smoothing,
                                             z_loss, reduction, chunk, compute_dtype, impl == "triton", *needs)
    if reduction == "none":
        loss, z_term = loss.view(targets.shape), z_term.view(targets.shape)
    return (loss, z_term) if return_z_loss else loss
