"""Hypothesis strategies for packed layouts: ragged documents, single-token documents, spans at
document edges, many small spans, a span covering a whole document, pure causal, decode."""
import torch
from hypothesis import strategies as st

from transfusion_fast import Layout


@st.composite
def documents(draw, max_docs=4, max_len=40):
    lengths = draw(st.lists(st.integers(1, max_len), min_size=1, max_size=max_docs))
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return cu


@st.composite
def spans_in(draw, cu, max_spans_per_doc=3):
    spans = []
    for d in range(len(cu) - 1):
        lo, hi = cu[d], cu[d + 1]
        k = draw(st.integers(0, max_spans_per_doc))
        cuts = sorted(draw(st.lists(st.integers(lo, hi), min_size=2 * k, max_size=2 * k)))
        for a, b in zip(cuts[0::2], cuts[1::2]):
            if b > a and (not spans or a >= spans[-1][1]):
                spans.append((a, b))
        if draw(st.booleans()) and not any(lo <= s < hi for s, _ in spans):
            spans.append((lo, hi))  # the DiT / time-series case: one span is the whole document
    return spans


@st.composite
def layouts(draw, max_docs=4, max_len=40, kinds=("causal", "bidirectional", "transfusion", "decode")):
    """Returns (layout, description) with description a dict of what was drawn (for messages)."""
    kind = draw(st.sampled_from(kinds))
    cu = draw(documents(max_docs, max_len))
    cu_t = torch.tensor(cu, dtype=torch.int32)
    if kind == "causal":
        return Layout.causal(cu_t), {"kind": kind, "cu": cu}
    if kind == "bidirectional":
        return Layout.bidirectional(cu_t), {"kind": kind, "cu": cu}
    spans = draw(spans_in(cu))
    spans_t = torch.tensor(spans, dtype=torch.int32).reshape(-1, 2)
    if kind == "transfusion":
        return Layout.transfusion(cu_t, spans_t), {"kind": kind, "cu": cu, "spans": spans}
    lengths = [b - a for a, b in zip(cu[:-1], cu[1:])]
    q_lens = [draw(st.integers(1, n)) for n in lengths]
    return (Layout.decode(cu_t, torch.tensor(q_lens), spans_t),
            {"kind": kind, "cu": cu, "spans": spans, "q_lens": q_lens})
