"""The attention layout of a packed batch: one key interval per query row, one query interval per key.

A packed sequence concatenates documents (``cu_seqlens`` marks their starts). Query row ``i`` sees
exactly the keys ``[kv_start[i], kv_end[i])``:

* ``kv_start[i]`` is the first key of ``i``'s document;
* ``kv_end[i]`` is ``pos(i) + 1`` for a text token and ``span_end`` for a token inside a continuous
  span ``[s, e)`` (image patches, time-series frames), which is therefore bidirectional.

Both vectors are non-decreasing over the whole packed batch, so every key ``j`` is also seen by one
contiguous run of rows ``[q_start[j], q_end[j])``, and the set of (row tile, key tile) pairs that
hold any visible element is one contiguous key-tile range per row tile (and one query-tile range
per key tile). ``tile_table`` turns that into the tables every kernel walks; this module is the only
place where the mask is defined: the Triton kernels, the CPU kernels and the reference path read it.

Query rows may be a suffix of each document's keys (``q_lens``): that is the decode / prefix form
used by generation with a KV cache.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .checks import MAX_SIZE, check_bool, check_int, describe

__all__ = ["Layout", "TileTable"]


def _cdiv(a: torch.Tensor | int, b: int):
    return (a + b - 1) // b


@dataclass(frozen=True)
class TileTable:
    """Per-tile walk tables for one (block_m, block_n).

    Row tile ``m`` must visit key tiles ``[kv_lo[m], kv_hi[m])``; inside it, tiles
    ``[kv_full_lo[m], kv_full_hi[m])`` are full (no mask arithmetic), the rest are partial.
    Key tile ``n`` must visit query tiles ``[q_lo[n], q_hi[n])`` with full sub-range
    ``[q_full_lo[n], q_full_hi[n])``. An empty full range is stored as ``full_lo == full_hi == hi``.
    ``m_order`` lists the row tiles by decreasing number of key tiles to visit, ``n_order`` the key
    tiles by decreasing number of query tiles (ties in index order): a kernel whose programs take
    their tiles in that order starts the longest ones first, so the short ones fill the last wave
    instead of the longest ones running alone at the end (causal layouts: the last row tiles).
    All tensors are int32 on the layout's device.
    """

    block_m: int
    block_n: int
    num_m_tiles: int
    num_n_tiles: int
    kv_lo: torch.Tensor
    kv_hi: torch.Tensor
    kv_full_lo: torch.Tensor
    kv_full_hi: torch.Tensor
    q_lo: torch.Tensor
    q_hi: torch.Tensor
    q_full_lo: torch.Tensor
    q_full_hi: torch.Tensor
    m_order: torch.Tensor
    n_order: torch.Tensor

    def counts(self) -> dict:
        """Number of skip / full / partial tiles (identical from the row and the column side)."""
        visited = int((self.kv_hi - self.kv_lo).sum())
        full = int((self.kv_full_hi - self.kv_full_lo).sum())
        total = self.num_m_tiles * self.num_n_tiles
        return {"total": total, "skip": total - visited, "full": full, "partial": visited - full,
                "computed": visited}


def _tile_ranges(start: torch.Tensor, end: torch.Tensor, block_rows: int, block_cols: int,
                 num_cols: int):
    """Tile ranges for monotone per-row intervals ``[start, end)`` over ``num_cols`` columns.

    Rows are tiled by ``block_rows``, columns by ``block_cols``. The union of the intervals of a
    row tile is ``[start[first row], end[last row])`` (both vectors are non-decreasing); the
    intersection is ``[start[last row], end[first row])``: a column tile is full iff it lies in it.
    """
    n_rows = start.numel()
    n_row_tiles = _cdiv(n_rows, block_rows)
    n_col_tiles = _cdiv(num_cols, block_cols)
    first = torch.arange(n_row_tiles, device=start.device, dtype=torch.int64) * block_rows
    last = torch.clamp(first + block_rows, max=n_rows) - 1
    s_first, s_last = start[first].long(), start[last].long()
    e_first, e_last = end[first].long(), end[last].long()

    lo = s_first // block_cols
    hi = _cdiv(e_last, block_cols)
    hi = torch.where(e_last > s_first, hi, lo)  # a tile whose rows see nothing visits nothing
    full_lo = _cdiv(s_last, block_cols)
    # The ragged last column tile is full when the intersection reaches the end of the columns.
    full_hi = torch.where(e_first >= num_cols, torch.full_like(e_first, n_col_tiles),
                          e_first // block_cols)
    empty = full_lo >= full_hi
    full_lo = torch.where(empty, hi, full_lo)
    full_hi = torch.where(empty, hi, full_hi)
    as32 = lambda t: t.to(torch.int32).contiguous()  # noqa: E731
    return n_row_tiles, n_col_tiles, as32(lo), as32(hi), as32(full_lo), as32(full_hi)


def _longest_first(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Tile indices by decreasing walk length ``hi - lo``, ties in index order (int32)."""
    return torch.argsort(hi - lo, descending=True, stable=True).to(torch.int32)


#: the tensors of a Layout and of a TileTable, in the order Layout.to packs them
_VECTORS = ("cu_seqlens", "q_cu_seqlens", "spans", "q_positions", "positions", "kv_start", "kv_end",
            "q_start", "q_end")
_TABLE_TENSORS = ("kv_lo", "kv_hi", "kv_full_lo", "kv_full_hi", "q_lo", "q_hi", "q_full_lo", "q_full_hi",
                  "m_order", "n_order")


class Layout:
    """The mask of a packed batch as O(T) interval vectors; see the module docstring.

    Use the constructors: :meth:`causal`, :meth:`bidirectional`, :meth:`transfusion` and
    :meth:`decode`. All take ``cu_seqlens`` (int, shape ``(num_docs + 1,)``, starting at 0, strictly
    increasing) on the device the kernels will run on.
    """

    def __init__(self, cu_seqlens: torch.Tensor, spans: torch.Tensor | None = None, *,
                 bidirectional: bool = False, q_lens: torch.Tensor | None = None):
        bidirectional = check_bool("bidirectional", bidirectional)
        cu = _check_cu_seqlens(cu_seqlens)
        device = cu.device
        num_docs = cu.numel() - 1
        total = int(cu[-1])
        doc_len = cu[1:] - cu[:-1]
        spans = _check_spans(spans, cu, bidirectional)

        # Per key position: its document, and the end of what a query at that position sees.
        pos = torch.arange(total, device=device, dtype=torch.int64)
        doc_of_pos = torch.repeat_interleave(torch.arange(num_docs, device=device), doc_len)
        doc_start = cu[doc_of_pos]
        doc_end = cu[doc_of_pos + 1]
        if bidirectional:
            sees_until = doc_end
        elif spans.shape[0] == 0:
            sees_until = pos + 1
        else:
            span_idx = torch.searchsorted(spans[:, 0].contiguous(), pos, right=True) - 1
            span_end = spans[span_idx.clamp(min=0), 1]
            in_span = (span_idx >= 0) & (pos < span_end)
            sees_until = torch.where(in_span, span_end, pos + 1)

        # Query rows: every position, or the last q_lens[d] positions of each document.
        if q_lens is None:
            q_cu = cu
            q_pos = pos
        else:
            q_lens = _check_q_lens(q_lens, doc_len)
            q_cu = torch.zeros(num_docs + 1, device=device, dtype=torch.int64)
            q_cu[1:] = torch.cumsum(q_lens, 0)
            q_doc = torch.repeat_interleave(torch.arange(num_docs, device=device), q_lens)
            q_rank = torch.arange(int(q_cu[-1]), device=device) - q_cu[q_doc]
            q_pos = cu[q_doc + 1] - q_lens[q_doc] + q_rank

        self.cu_seqlens = cu.to(torch.int32)
        self.q_cu_seqlens = q_cu.to(torch.int32)
        self.spans = spans.to(torch.int32)
        self.is_bidirectional = bidirectional
        self.max_seqlen = int(doc_len.max())
        #: absolute key index of each query row (== arange for prefill)
        self.q_positions = q_pos.to(torch.int32)
        #: position of each key inside its document (RoPE positions restart at 0 per document)
        self.positions = (pos - doc_start).to(torch.int32)
        self.kv_start = doc_start[q_pos].to(torch.int32).contiguous()
        self.kv_end = sees_until[q_pos].to(torch.int32).contiguous()
        # Column intervals: the first query row whose kv_end passes j, up to its document's end.
        q_start = torch.searchsorted(self.kv_end.long(), pos, right=True)
        q_end = q_cu[doc_of_pos + 1]
        self.q_start = torch.minimum(q_start, q_end).to(torch.int32).contiguous()
        self.q_end = q_end.to(torch.int32).contiguous()
        self._tables: dict[tuple[int, int], TileTable] = {}

    # ----------------------------------------------------------------------------- constructors
    @classmethod
    def causal(cls, cu_seqlens: torch.Tensor) -> "Layout":
        """Causal LM with document masking."""
        return cls(cu_seqlens)

    @classmethod
    def bidirectional(cls, cu_seqlens: torch.Tensor) -> "Layout":
        """Every document fully bidirectional (DiT, time-series TransFusion)."""
        return cls(cu_seqlens, bidirectional=True)

    @classmethod
    def transfusion(cls, cu_seqlens: torch.Tensor, spans: torch.Tensor) -> "Layout":
        """Causal text with bidirectional continuous spans ``spans[k] = [start, end)`` (absolute)."""
        return cls(cu_seqlens, spans)

    @classmethod
    def decode(cls, cu_seqlens: torch.Tensor, q_lens: torch.Tensor,
               spans: torch.Tensor | None = None, *, bidirectional: bool = False) -> "Layout":
        """Queries are the last ``q_lens[d]`` keys of document ``d`` (generation with a KV cache)."""
        return cls(cu_seqlens, spans, bidirectional=bidirectional, q_lens=q_lens)

    # ----------------------------------------------------------------------------- queries
    @property
    def device(self) -> torch.device:
        return self.cu_seqlens.device

    @property
    def num_docs(self) -> int:
        return self.cu_seqlens.numel() - 1

    # The counts are read off the tensors' lengths rather than stored as ints: under torch.compile
    # a length is a symbolic size of a graph input, where a stored int would be a constant that
    # every new batch length recompiles.
    @property
    def num_keys(self) -> int:
        return self.positions.shape[0]

    @property
    def num_queries(self) -> int:
        return self.q_positions.shape[0]

    def to(self, device, *, tile_sizes=()) -> "Layout":
        """The same layout on ``device``, with its tile tables, in one copy.

        The tile tables of ``tile_sizes`` (``(block_m, block_n)`` pairs) are computed here, where
        the layout lives (the host, for a layout from :func:`~transfusion_fast.pack`); then every
        interval vector and every cached table goes into one int32 buffer (pinned when the target
        is a GPU), which one copy sends to ``device``, where the layout's tensors are views of it.
        The device thus runs one copy, whatever the number of documents, spans and tables,
        instead of rebuilding the layout and its tables with dozens of small kernels and host
        syncs. Always returns a new Layout (sharing no memory with this one).
        """
        for pair in tile_sizes:
            self.tile_table(*pair)
        device = torch.device(device)
        vectors = [getattr(self, name) for name in _VECTORS]
        tables = list(self._tables.values())
        parts = self.tensors()
        flat = torch.cat([t.reshape(-1) for t in parts])
        pinned = device.type == "cuda" and flat.device.type == "cpu"
        if pinned:   # an asynchronous copy: the host goes on packing the next batch
            flat = flat.pin_memory()
        flat = flat.to(device, non_blocking=pinned)
        views = iter(flat.split([t.numel() for t in parts]))
        out = Layout.__new__(Layout)
        for name, src in zip(_VECTORS, vectors):
            setattr(out, name, next(views).view(src.shape))
        out.is_bidirectional, out.max_seqlen = self.is_bidirectional, self.max_seqlen
        out._tables = {}
        for table in tables:
            out._tables[(table.block_m, table.block_n)] = TileTable(
                table.block_m, table.block_n, table.num_m_tiles, table.num_n_tiles,
                *(next(views) for _ in _TABLE_TENSORS))
        return out

    def tensors(self) -> list:
        """Every tensor of the layout: the interval vectors, then each cached tile table's."""
        return ([getattr(self, name) for name in _VECTORS]
                + [getattr(t, name) for t in self._tables.values() for name in _TABLE_TENSORS])

    def visible_elements(self) -> int:
        """Number of (query, key) pairs that attend: the work of exact attention."""
        return int((self.kv_end - self.kv_start).long().sum())

    def density(self) -> float:
        """Visible pairs over all ``num_queries × num_keys`` pairs."""
        return self.visible_elements() / float(self.num_queries * self.num_keys)

    def dense_mask(self) -> torch.Tensor:
        """The (num_queries, num_keys) boolean mask. O(T²): for tests and baselines only."""
        j = torch.arange(self.num_keys, device=self.device)
        return (j[None, :] >= self.kv_start[:, None]) & (j[None, :] < self.kv_end[:, None])

    def tile_table(self, block_m: int, block_n: int) -> TileTable:
        """Walk tables for ``block_m`` query rows × ``block_n`` keys, computed once and cached."""
        block_m = check_int("block_m", block_m, 1, MAX_SIZE)
        block_n = check_int("block_n", block_n, 1, MAX_SIZE)
        key = (block_m, block_n)
        if key not in self._tables:
            nm, nn, kv_lo, kv_hi, kv_flo, kv_fhi = _tile_ranges(
                self.kv_start, self.kv_end, block_m, block_n, self.num_keys)
            _, _, q_lo, q_hi, q_flo, q_fhi = _tile_ranges(
                self.q_start, self.q_end, block_n, block_m, self.num_queries)
            self._tables[key] = TileTable(block_m, block_n, nm, nn, kv_lo, kv_hi, kv_flo, kv_fhi,
                                          q_lo, q_hi, q_flo, q_fhi, _longest_first(kv_lo, kv_hi),
                                          _longest_first(q_lo, q_hi))
        return self._tables[key]

    def tile_counts(self, block_m: int, block_n: int) -> dict:
        """``{"total", "skip", "full", "partial", "computed"}`` tile counts for that tiling."""
        return self.tile_table(block_m, block_n).counts()

    def __repr__(self) -> str:
        return (f"Layout(docs={self.num_docs}, queries={self.num_queries}, keys={self.num_keys}, "
                f"spans={self.spans.shape[0]}, bidirectional={self.is_bidirectional}, "
                f"density={self.density():.3f})")


# --------------------------------------------------------------------------------- validation
def _as_int_tensor(name: str, values, device) -> torch.Tensor:
    """A nested list of Python ints as an int64 tensor; floats and bools are refused, not truncated."""
    try:
        tensor = torch.as_tensor(values, device=device)
    except (TypeError, ValueError, RuntimeError, OverflowError) as error:
        raise ValueError(f"{name} must be an integer tensor or a nested list of ints, got {describe(values)} "
                         f"({error})") from None
    if tensor.numel() and tensor.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must hold ints, got {tensor.dtype} values (floats and bools are not "
                         f"truncated): {describe(values)}")
    return tensor.long()


def _check_cu_seqlens(cu: torch.Tensor) -> torch.Tensor:
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be int32 or int64, got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries (num_docs + 1), "
                         f"got shape {tuple(cu.shape)}")
    cu = cu.long()
    if int(cu[0]) != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {int(cu[0])}")
    if int(cu[-1]) > MAX_SIZE:
        raise ValueError(f"cu_seqlens: the packed length must be at most {MAX_SIZE} tokens (the kernels index "
                         f"rows and keys with int32), got {int(cu[-1])}")
    lengths = cu[1:] - cu[:-1]
    if bool((lengths <= 0).any()):
        bad = int(torch.nonzero(lengths <= 0)[0, 0])
        raise ValueError(f"cu_seqlens must be strictly increasing (no empty documents): document "
                         f"{bad} spans [{int(cu[bad])}, {int(cu[bad + 1])})")
    return cu


def _check_spans(spans, cu: torch.Tensor, bidirectional: bool) -> torch.Tensor:
    if spans is None:
        return torch.zeros(0, 2, dtype=torch.int64, device=cu.device)
    if not isinstance(spans, torch.Tensor):
        spans = _as_int_tensor("spans", spans, cu.device)
    if spans.numel() == 0:
        return torch.zeros(0, 2, dtype=torch.int64, device=cu.device)
    if spans.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"spans must be int32 or int64, got {spans.dtype}")
    if spans.device != cu.device:
        raise ValueError(f"spans must be on the device of cu_seqlens ({cu.device}), got {spans.device}")
    if spans.dim() != 2 or spans.shape[1] != 2:
        raise ValueError(f"spans must have shape (num_spans, 2) of [start, end), got {tuple(spans.shape)}")
    if bidirectional:
        raise ValueError("spans are meaningless in a bidirectional layout (every document is one span)")
    spans = spans.long()
    start, end = spans[:, 0], spans[:, 1]
    if bool((end <= start).any()):
        k = int(torch.nonzero(end <= start)[0, 0])
        raise ValueError(f"span {k} is empty or reversed: [{int(start[k])}, {int(end[k])})")
    if spans.shape[0] > 1:
        unsorted = start[1:] < start[:-1]
        if bool(unsorted.any()):
            k = int(torch.nonzero(unsorted)[0, 0]) + 1
            raise ValueError(f"spans must be sorted by start: span {k} starts at {int(start[k])} "
                             f"before span {k - 1} at {int(start[k - 1])}")
        overlap = start[1:] < end[:-1]
        if bool(overlap.any()):
            k = int(torch.nonzero(overlap)[0, 0]) + 1
            raise ValueError(f"spans overlap: span {k - 1} [{int(start[k - 1])}, {int(end[k - 1])}) "
                             f"and span {k} [{int(start[k])}, {int(end[k])})")
    total = int(cu[-1])
    if int(start.min()) < 0 or int(end.max()) > total:
        raise ValueError(f"spans must lie inside [0, {total}), got a span from {int(start.min())} "
                         f"to {int(end.max())}")
    doc_of_start = torch.searchsorted(cu, start.contiguous(), right=True) - 1
    outside = end > cu[doc_of_start + 1]
    if bool(outside.any()):
        k = int(torch.nonzero(outside)[0, 0])
        d = int(doc_of_start[k])
        raise ValueError(f"span {k} [{int(start[k])}, {int(end[k])}) crosses the end of its document "
                         f"{d} [{int(cu[d])}, {int(cu[d + 1])})")
    return spans


def _check_q_lens(q_lens, doc_len: torch.Tensor) -> torch.Tensor:
    if not isinstance(q_lens, torch.Tensor):
        q_lens = _as_int_tensor("q_lens", q_lens, doc_len.device)
    if q_lens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"q_lens must be int32 or int64, got {q_lens.dtype}")
    if q_lens.shape != doc_len.shape:
        raise ValueError(f"q_lens must have one entry per document, shape {tuple(doc_len.shape)}, "
                         f"got {tuple(q_lens.shape)}")
    q_lens = q_lens.to(doc_len.device).long()
    # A document without query rows would leave its keys seen by nobody and break the contiguity
    # of the per-tile key ranges: drop finished documents from the batch instead.
    if bool((q_lens < 1).any()) or bool((q_lens > doc_len).any()):
        raise ValueError(f"q_lens must satisfy 1 <= q_lens <= document length (drop documents that "
                         f"have no query rows); got {q_lens.tolist()} for lengths {doc_len.tolist()}")
    return q_lens
