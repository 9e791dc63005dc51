"""This package's attention inside Hugging Face ``transformers`` models.

Importing this module registers the attention implementation ``"transfusion_fast"`` with
``transformers.AttentionInterface`` (and a mask function with ``AttentionMaskInterface``, so the
model never builds a dense 4-D mask for it). Every model class that dispatches its attention
through the interface (Llama, Mistral, Qwen2/Qwen3, Phi-3, ...) then runs
:func:`transfusion_fast.ops.attention` when loaded with ``attn_implementation="transfusion_fast"``::

    import transfusion_fast.hf  # noqa: F401  (registers "transfusion_fast")
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="transfusion_fast")
    layout = Layout.transfusion(cu_seqlens, spans)           # packed documents, bidirectional spans
    out = model(input_ids=ids[None], position_ids=layout.positions[None].long(), layout=layout)

What the registered function computes, per call:

* ``layout=`` given: query row ``i`` of the single packed row sees keys
  ``[layout.kv_start[i], layout.kv_end[i])``. The batch size must be 1 and the row lengths must be
  the layout's (``num_queries`` queries, ``num_keys`` keys). RoPE stays the model's: pass
  ``position_ids`` restarting at 0 per document (``layout.positions``).
* no layout: the model's causal attention. When queries and keys have the same length (training,
  prefill) the documents of each batch row are read from ``position_ids`` exactly as transformers
  does for packed sequences (a new document wherever the position does not continue by +1), or from
  ``cu_seq_lens_q``/``cu_seq_lens_k`` when those are passed; batch rows never see each other.
  With fewer queries than keys (decoding with a KV cache) the queries are the last keys of their
  batch row and each batch row is one document.
* GQA as the model has it: key/value heads are not repeated.

Refused with an error naming the argument: padded batches (an ``attention_mask`` with zeros; pack
the sequences instead), dense 4-D masks, attention dropout, sliding windows shorter than a
document, logit soft-capping, attention sinks, non-causal modules without a layout, a layout whose
length differs from the input, and head dims the kernels lack.
"""
from __future__ import annotations

import weakref

import torch

try:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
except ImportError as error:   # the optional "hf" extra
    raise ImportError("transfusion_fast.hf needs transformers (pip install 'transfusion_fast[hf]')") from error

from . import ops
from .layout import Layout

__all__ = ["ATTN_IMPLEMENTATION", "attention_forward", "attention_mask", "packed_layout", "register"]

#: the name to pass as ``attn_implementation``
ATTN_IMPLEMENTATION = "transfusion_fast"


# --------------------------------------------------------------------------------- layouts
def packed_layout(position_ids: torch.Tensor | None, batch_size: int, seq_len: int,
                  device: torch.device | str) -> Layout:
    """The causal document layout of ``batch_size`` rows of ``seq_len`` tokens flattened into one
    packed sequence: a new document at the start of every row and wherever ``position_ids`` does
    not continue by +1 (transformers' packed-sequence rule). ``position_ids`` is ``(B, L)`` or
    ``(1, L)`` (shared by every row), or ``None`` (each row one document)."""
    if position_ids is None:
        cu = torch.arange(0, (batch_size + 1) * seq_len, seq_len, device=device, dtype=torch.int32)
        return Layout.causal(cu)
    if position_ids.dim() != 2 or position_ids.shape[-1] != seq_len or \
            position_ids.shape[0] not in (1, batch_size):
        raise ValueError(f"position_ids must have shape ({batch_size}, {seq_len}) (or (1, {seq_len})), "
                         f"got {tuple(position_ids.shape)}")
    pos = position_ids.to(device).expand(batch_size, seq_len)
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = (pos[:, 1:] - pos[:, :-1]) != 1
    first = torch.nonzero(starts.reshape(-1)).flatten()
    cu = torch.cat([first, first.new_full((1,), batch_size * seq_len)]).to(torch.int32)
    return Layout.causal(cu)


class _OneForwardCache:
    """The implicit layout of the current forward pass, rebuilt when its source changes.

    Every layer of one forward pass receives the same ``position_ids`` (or ``cu_seq_lens_q``)
    tensor object; keying on that object (by weak reference and version counter) builds the
    layout and its tile tables once per forward instead of once per layer.
    """

    def __init__(self):
        self._key = None
        self._ref = None
        self._layout = None

    def get(self, source: torch.Tensor | None, key: tuple, build):
        ref = None if source is None else weakref.ref(source)
        full_key = key + (None if source is None else source._version,)
        if (self._layout is not None and self._key == full_key
                and (self._ref is None) == (ref is None)
                and (ref is None or self._ref() is source)):
            return self._layout
        layout = build()
        self._key, self._ref, self._layout = full_key, ref, layout
        return layout


_implicit = _OneForwardCache()


def _implicit_layout(batch: int, q_len: int, k_len: int, device: torch.device, kwargs: dict) -> Layout:
    if q_len > k_len:
        raise ValueError(f"attn_implementation='{ATTN_IMPLEMENTATION}': {q_len} query rows but only "
                         f"{k_len} keys; queries must be the last keys of each row")
    if q_len < k_len:   # decoding with a KV cache: each batch row is one document
        cu = torch.arange(0, (batch + 1) * k_len, k_len, device=device, dtype=torch.int32)
        q_lens = torch.full((batch,), q_len, device=device, dtype=torch.int32)
        return _implicit.get(None, ("decode", batch, q_len, k_len, str(device)),
                             lambda: Layout.decode(cu, q_lens))
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None or cu_k is not None:
        if cu_q is None or cu_k is None or not torch.equal(cu_q, cu_k):
            raise ValueError("cu_seq_lens_q and cu_seq_lens_k must both be given and equal (packed "
                             "self-attention over one row)")
        if batch != 1 or int(cu_q[-1]) != q_len:
            raise ValueError(f"cu_seq_lens_q must describe one packed row of {q_len} tokens (batch 1), "
                             f"got batch {batch} and cu_seq_lens_q ending at {int(cu_q[-1])}")
        return _implicit.get(cu_q, ("cu", q_len, str(device)),
                             lambda: Layout.causal(cu_q.to(device)))
    position_ids = kwargs.get("position_ids")
    return _implicit.get(position_ids, ("packed", batch, q_len, str(device)),
                         lambda: packed_layout(position_ids, batch, q_len, device))


# --------------------------------------------------------------------------------- checks
def _check_call(module, mask, dropout: float, layout, kwargs: dict) -> None:
    name = f"attn_implementation='{ATTN_IMPLEMENTATION}'"
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"{name} takes no {type(mask).__name__} attention_mask: describe the mask with "
                            f"layout=transfusion_fast.Layout(...) instead")
        if mask.dim() == 4:
            raise ValueError(f"{name} never uses a dense 4-D attention_mask (got shape {tuple(mask.shape)}): "
                             f"describe the mask with layout=transfusion_fast.Layout(...) instead")
        if not bool(mask.bool().all()):
            raise ValueError(_PADDING_MESSAGE.format(shape=tuple(mask.shape)))
    if dropout:
        raise ValueError(f"{name} has no attention dropout, got dropout={dropout} (set the config's "
                         f"attention_dropout to 0)")
    for key in ("softcap", "s_aux"):
        if kwargs.get(key) is not None:
            raise ValueError(f"{name} does not implement {key}, got {key}={kwargs[key]!r}")
    if layout is None:
        config = getattr(module, "config", None)
        if kwargs.get("is_causal") is False or getattr(module, "is_causal", True) is False or \
                getattr(config, "is_causal", True) is False:
            raise ValueError(f"{name} without layout= is causal attention, but this module is not causal "
                             f"(is_causal=False): pass layout=Layout.bidirectional(...) or another layout")


_PADDING_MESSAGE = (
    f"attn_implementation='{ATTN_IMPLEMENTATION}' does not take padded batches: attention_mask of shape "
    "{shape} has zeros. Pack the sequences into one row instead (batch 1, position_ids restarting at 0 "
    "per document, or layout=transfusion_fast.Layout.causal(cu_seqlens)): no token is wasted on padding")


# --------------------------------------------------------------------------------- interface
def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      layout: Layout | None = None, sliding_window: int | None = None, **kwargs):
    """The attention function registered as ``"transfusion_fast"`` (see the module docstring).

    Args:
        module: the calling attention module (read for ``is_causal`` only).
        query: ``(B, Hq, Lq, D)``; key, value: ``(B, Hkv, Lk, D)`` with ``Hq % Hkv == 0``, RoPE applied.
        attention_mask: ``None`` or a 2-D mask of ones (this module's mask function returns
            ``None``); zeros (padding) and 4-D masks are refused.
        scaling: softmax scale (default ``1/sqrt(D)``).
        layout: the packed mask (batch 1); ``None`` for the model's causal attention.
        sliding_window: accepted only where no document is longer than the window.
    Returns:
        ``(out, None)`` with ``out`` of shape ``(B, Lq, Hq, D)``, as transformers expects.
    """
    _check_call(module, attention_mask, dropout, layout, kwargs)
    batch, hq, q_len, d = query.shape
    hkv, k_len = key.shape[1], key.shape[2]
    if layout is not None:
        if not isinstance(layout, Layout):
            raise TypeError(f"layout must be a transfusion_fast.Layout, got {type(layout).__name__}")
        if batch != 1:
            raise ValueError(f"layout= describes one packed row: the batch size must be 1, got {batch} "
                             f"(concatenate the documents into one row)")
        if q_len != layout.num_queries or k_len != layout.num_keys:
            raise ValueError(f"layout has {layout.num_queries} query rows and {layout.num_keys} keys but the "
                             f"model's input has {q_len} tokens ({k_len} keys): build the layout for the "
                             f"packed input_ids")
    else:
        layout = _implicit_layout(batch, q_len, k_len, query.device, kwargs)
    if sliding_window is not None and layout.max_seqlen > sliding_window:
        raise ValueError(f"attn_implementation='{ATTN_IMPLEMENTATION}' has no sliding window: a document "
                         f"of {layout.max_seqlen} tokens exceeds sliding_window={sliding_window}")
    # (B, H, L, D) → packed (B·L, H, D): a view whenever the projections were (B, L, H·D) contiguous.
    q = query.transpose(1, 2).reshape(batch * q_len, hq, d)
    k = key.transpose(1, 2).reshape(batch * k_len, hkv, d)
    v = value.transpose(1, 2).reshape(batch * k_len, hkv, d)
    o = ops.attention(q, k, v, layout, scale=scaling)                  # (B·Lq, Hq, D)
    return o.view(batch, q_len, hq, d), None


def attention_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                   mask_function=None, attention_mask: torch.Tensor | None = None, **kwargs):
    """The mask function registered as ``"transfusion_fast"``: builds nothing (returns ``None``);
    the attention reads its documents from ``position_ids`` or ``layout=``. Refuses a 2-D padding
    mask with zeros, which this attention cannot honour."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError(_PADDING_MESSAGE.format(shape=tuple(attention_mask.shape)))
    return None


def register() -> None:
    """Register ``"transfusion_fast"`` with transformers' attention and mask interfaces (idempotent;
    done on import)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, attention_mask)


register()
