"""Layout: intervals equal the mask built the slow way; tile classification is exact; bad input."""
import dataclasses

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from strategies import layouts

from transfusion_fast import Layout


def slow_dense_mask(desc) -> torch.Tensor:
    """The mask from its definition, one token at a time (independent of the Layout code)."""
    cu, kind = desc["cu"], desc["kind"]
    spans = desc.get("spans", []) if kind in ("transfusion", "decode") else []
    total = cu[-1]
    full = torch.zeros(total, total, dtype=torch.bool)
    for d in range(len(cu) - 1):
        for i in range(cu[d], cu[d + 1]):
            end = cu[d + 1] if kind == "bidirectional" else i + 1
            for s, e in spans:
                if s <= i < e:
                    end = e
            full[i, cu[d]:end] = True
    if kind != "decode":
        return full
    rows = [i for d in range(len(cu) - 1) for i in range(cu[d + 1] - desc["q_lens"][d], cu[d + 1])]
    return full[rows]


@given(layouts())
def test_intervals_equal_slow_mask(drawn):
    layout, desc = drawn
    mask = slow_dense_mask(desc)
    assert torch.equal(layout.dense_mask(), mask), desc
    # Column intervals: key j is seen exactly by rows [q_start[j], q_end[j]).
    rows = torch.arange(layout.num_queries)
    by_columns = (rows[:, None] >= layout.q_start[None, :]) & (rows[:, None] < layout.q_end[None, :])
    assert torch.equal(by_columns, mask), desc
    assert layout.visible_elements() == int(mask.sum())


@given(layouts(), st.integers(1, 9), st.integers(1, 9))
def test_tile_classification_is_exact(drawn, block_m, block_n):
    layout, desc = drawn
    mask = layout.dense_mask()
    table = layout.tile_table(block_m, block_n)
    counts = {"skip": 0, "full": 0, "partial": 0}
    for m in range(table.num_m_tiles):
        for n in range(table.num_n_tiles):
            tile = mask[m * block_m:(m + 1) * block_m, n * block_n:(n + 1) * block_n]
            truth = "full" if bool(tile.all()) else "partial" if bool(tile.any()) else "skip"
            counts[truth] += 1
            # Row side: visited iff in [kv_lo, kv_hi); full iff in [kv_full_lo, kv_full_hi).
            visited = int(table.kv_lo[m]) <= n < int(table.kv_hi[m])
            full = int(table.kv_full_lo[m]) <= n < int(table.kv_full_hi[m])
            assert visited == (truth != "skip") and full == (truth == "full"), (desc, m, n, truth)
            # Column side: the same classification from the key tile's query range.
            visited = int(table.q_lo[n]) <= m < int(table.q_hi[n])
            full = int(table.q_full_lo[n]) <= m < int(table.q_full_hi[n])
            assert visited == (truth != "skip") and full == (truth == "full"), (desc, m, n, truth)
    got = layout.tile_counts(block_m, block_n)
    assert {k: got[k] for k in counts} == counts
    assert got["computed"] == counts["full"] + counts["partial"]


def test_tables_are_cached_and_int32():
    layout = Layout.causal(torch.tensor([0, 100, 300], dtype=torch.int32))
    t1, t2 = layout.tile_table(64, 32), layout.tile_table(64, 32)
    assert t1 is t2
    assert all(t.dtype == torch.int32 for t in (t1.kv_lo, t1.kv_hi, t1.q_full_lo, t1.q_full_hi))
    for v in (layout.kv_start, layout.kv_end, layout.q_start, layout.q_end):
        assert v.dtype == torch.int32 and v.is_contiguous()


@given(layouts(), st.sampled_from([16, 32, 64]), st.sampled_from([16, 64]))
def test_tile_orders_are_longest_walk_first(drawn, block_m, block_n):
    table = drawn[0].tile_table(block_m, block_n)
    for order, lo, hi, count in ((table.m_order, table.kv_lo, table.kv_hi, table.num_m_tiles),
                                 (table.n_order, table.q_lo, table.q_hi, table.num_n_tiles)):
        assert order.dtype == torch.int32
        assert sorted(order.tolist()) == list(range(count))      # every tile exactly once
        walks = (hi - lo).tolist()
        ranked = [(walks[tile], tile) for tile in order.tolist()]
        for (w1, t1), (w2, t2) in zip(ranked, ranked[1:]):       # longest first, ties by index
            assert w1 > w2 or (w1 == w2 and t1 < t2)


def test_decode_rows_are_suffix_of_prefill():
    cu = torch.tensor([0, 10, 25], dtype=torch.int32)
    spans = torch.tensor([[3, 7], [15, 25]], dtype=torch.int32)
    full = Layout.transfusion(cu, spans)
    dec = Layout.decode(cu, torch.tensor([2, 10]), spans)
    rows = torch.tensor([8, 9] + list(range(15, 25)))
    assert torch.equal(dec.dense_mask(), full.dense_mask()[rows])
    assert torch.equal(dec.q_positions.long(), rows)
    assert dec.num_queries == 12 and dec.num_keys == 25


def test_positions_restart_per_document_and_density():
    layout = Layout.causal(torch.tensor([0, 3, 5], dtype=torch.int32))
    assert layout.positions.tolist() == [0, 1, 2, 0, 1]
    assert layout.density() == pytest.approx((6 + 3) / 25)
    assert Layout.bidirectional(torch.tensor([0, 4], dtype=torch.int32)).density() == 1.0


def test_large_layout_is_linear_memory_and_fast():
    # 128k tokens: every stored vector is O(T); nothing of size T² exists.
    import time
    cu = torch.arange(0, 131072 + 1, 1024, dtype=torch.int32)
    spans = torch.stack([cu[:-1] + 100, cu[:-1] + 612], 1)
    start = time.perf_counter()
    layout = Layout.transfusion(cu, spans)
    table = layout.tile_table(128, 64)
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0, f"building a 128k-token layout took {elapsed:.2f}s"
    assert layout.kv_end.numel() == 131072 and table.kv_lo.numel() == 1024
    counts = table.counts()
    assert counts["computed"] < counts["total"] / 50  # 128 independent documents


@pytest.mark.parametrize("cu, spans, message", [
    ([1, 5], None, "must start at 0"),
    ([0, 5, 5], None, "strictly increasing"),
    ([0, 5, 3], None, "strictly increasing"),
    ([0], None, "at least 2 entries"),
    ([0, 10], [[2, 5], [4, 8]], "overlap"),
    ([0, 10], [[5, 7], [1, 3]], "sorted"),
    ([0, 5, 10], [[3, 7]], "crosses the end of its document"),
    ([0, 10], [[3, 3]], "empty or reversed"),
    ([0, 10], [[8, 12]], "inside"),
])
def test_bad_layout_input(cu, spans, message):
    spans_t = None if spans is None else torch.tensor(spans, dtype=torch.int32)
    with pytest.raises(ValueError, match=message):
        Layout(torch.tensor(cu, dtype=torch.int32), spans_t)


def test_bad_layout_types():
    with pytest.raises(ValueError, match="int32 or int64"):
        Layout.causal(torch.tensor([0.0, 3.0]))
    with pytest.raises(TypeError, match="torch.Tensor"):
        Layout.causal([0, 3])
    with pytest.raises(ValueError, match="shape"):
        Layout.causal(torch.zeros(2, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="q_lens must satisfy"):
        Layout.decode(torch.tensor([0, 3], dtype=torch.int32), torch.tensor([4]))
    with pytest.raises(ValueError, match="one entry per document"):
        Layout.decode(torch.tensor([0, 3], dtype=torch.int32), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="block_m"):
        Layout.causal(torch.tensor([0, 3], dtype=torch.int32)).tile_table(0, 16)


# ------------------------------------------------------------------------------------- to(device)
class _DeviceOps(TorchDispatchMode):
    """Counts the operators that produce a tensor on ``device``, views (no kernel) apart."""

    def __init__(self, device: str):
        super().__init__()
        self.device = torch.device(device)
        self.ops, self.views = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        if any(isinstance(t, torch.Tensor) and t.device == self.device for t in outputs):
            (self.views if func.is_view else self.ops).append(str(func))
        return out


def _layouts():
    cu = torch.tensor([0, 10, 300, 1000, 1001])
    return [Layout.causal(cu), Layout.bidirectional(cu),
            Layout.transfusion(cu, torch.tensor([[3, 7], [20, 200], [400, 410]])),
            Layout.decode(cu, torch.tensor([1, 5, 1, 1]), torch.tensor([[996, 1000]]))]


@pytest.mark.parametrize("index", range(4))
@pytest.mark.parametrize("tile_sizes", [(), ((128, 64),), ((128, 64), (32, 128), (16, 16))])
def test_to_device_is_one_copy_whatever_the_tables(index, tile_sizes):
    """Moving a layout and its tile tables to another device dispatches one device op (the copy
    of one host buffer), views apart; the meta device stands for a GPU on a CPU-only machine."""
    layout = _layouts()[index]
    with _DeviceOps("meta") as counter:
        moved = layout.to("meta", tile_sizes=tile_sizes)
    assert counter.ops == ["aten._to_copy.default"], counter.ops
    assert moved.device.type == "meta" and set(moved._tables) == set(tile_sizes)
    for name in ("cu_seqlens", "q_cu_seqlens", "spans", "kv_start", "kv_end", "q_start", "q_end",
                 "positions", "q_positions"):
        assert getattr(moved, name).shape == getattr(layout, name).shape
        assert getattr(moved, name).dtype == torch.int32
    assert (moved.num_keys, moved.num_queries, moved.max_seqlen) == \
        (layout.num_keys, layout.num_queries, layout.max_seqlen)
    for pair in tile_sizes:    # cached: reading a table there dispatches nothing
        with _DeviceOps("meta") as counter:
            moved.tile_table(*pair)
        assert counter.ops == []


@pytest.mark.parametrize("index", range(4))
def test_to_copies_every_vector_and_table(index):
    layout = _layouts()[index]
    layout.tile_table(64, 32)
    moved = layout.to("cpu", tile_sizes=[(16, 64)])
    for name, value in vars(layout).items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(getattr(moved, name), value), name
            assert value.numel() == 0 or getattr(moved, name).data_ptr() != value.data_ptr(), name
    for pair, table in layout._tables.items():
        copy = moved.tile_table(*pair)
        for field in dataclasses.fields(table):
            a, b = getattr(copy, field.name), getattr(table, field.name)
            assert torch.equal(a, b) if isinstance(b, torch.Tensor) else a == b, (pair, field.name)
    # The copy answers like a layout built from scratch.
    fresh = Layout(layout.cu_seqlens, None if layout.is_bidirectional else layout.spans,
                   bidirectional=layout.is_bidirectional,
                   q_lens=layout.q_cu_seqlens[1:] - layout.q_cu_seqlens[:-1])
    assert moved.tile_counts(16, 64) == fresh.tile_counts(16, 64)
    assert torch.equal(moved.kv_end, fresh.kv_end)
