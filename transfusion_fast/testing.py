"""Shared helpers for tests and benchmarks: example layouts, the dense oracle, tolerances.

Nothing here is used by the ops themselves.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .aot import compile_report
from .config import ModalityConfig
from .layout import Layout

__all__ = ["IMAGE", "SERIES", "BOS", "EOS", "BOI", "EOI", "compile_without_spills", "dense_attention_oracle", "transfusion_example", "packed_documents_example",
           "TOLERANCES", "random_qkv"]

#: The small two-modality set-up of the model-level tests: 8 x 8 one-channel images in 2 x 2
#: patches, 3-channel series in patches of 4 steps with their own BOI/EOI, and the special tokens
#: of ModelConfig's defaults after a byte vocabulary.
IMAGE = ModalityConfig("image", "image", channels=1, patch_size=2, max_size=8)
SERIES = ModalityConfig("series", "sequence", channels=3, patch_size=4, max_size=16, boi_id=250, eoi_id=251)
BOS, EOS, BOI, EOI = 256, 257, 258, 259

#: (atol, rtol) for comparing a kernel's output with the reference path computed in float32.
#: fp32: accumulation-order differences only. fp16: inputs carry 11 bits and P is rounded to fp16
#: before the PV product, as in FlashAttention. bf16: 8 bits.
TOLERANCES = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def dense_attention_oracle(q, k, v, layout: Layout, scale: float):
    """``F.scaled_dot_product_attention`` over the whole packed batch with the dense boolean mask."""
    group = q.shape[1] // k.shape[1]
    qt = q.transpose(0, 1)[None]                                     # (1, Hq, Tq, D)
    kt = k.repeat_interleave(group, 1).transpose(0, 1)[None]
    vt = v.repeat_interleave(group, 1).transpose(0, 1)[None]
    o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=layout.dense_mask(), scale=scale)
    return o[0].transpose(0, 1)


def random_qkv(num_queries, num_keys, hq, hkv, d, dtype=torch.float32, device="cpu", seed=0,
               requires_grad=False):
    g = torch.Generator(device="cpu").manual_seed(seed)
    make = lambda t, h: torch.randn(t, h, d, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    q, k, v = make(num_queries, hq), make(num_keys, hkv), make(num_keys, hkv)
    if requires_grad:
        for t in (q, k, v):
            t.requires_grad_(True)
    return q, k, v


def transfusion_example(num_images: int = 4, patches_per_image: int = 256, text_between: int = 128,
                        num_sequences: int = 1, device="cpu") -> Layout:
    """``num_sequences`` documents, each: text, then ``num_images`` × (image span, text)."""
    starts, spans, cursor = [0], [], 0
    for _ in range(num_sequences):
        cursor += text_between
        for _ in range(num_images):
            spans.append((cursor, cursor + patches_per_image))
            cursor += patches_per_image + text_between
        starts.append(cursor)
    cu = torch.tensor(starts, dtype=torch.int32, device=device)
    return Layout.transfusion(cu, torch.tensor(spans, dtype=torch.int32, device=device))


def packed_documents_example(total: int, num_docs: int, seed: int = 0, causal: bool = True,
                             device="cpu") -> Layout:
    """``num_docs`` documents of random lengths summing to ``total``."""
    g = torch.Generator().manual_seed(seed)
    cuts = torch.randperm(total - 1, generator=g)[: num_docs - 1] + 1
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), cuts.sort().values,
                    torch.tensor([total])]).to(torch.int32).to(device)
    return Layout.causal(cu) if causal else Layout.bidirectional(cu)


def compile_without_spills(specs) -> list:
    """AOT-compile ``specs`` (:class:`transfusion_fast.aot.KernelSpec`) for sm_80 and sm_90a and assert
    that every config compiled, without register spills, within the 255-register limit."""
    reports = compile_report(specs)
    assert len(reports) == 2 * len(specs)
    bad = [(r.label, r.arch, r.error or f"spills {r.spill_stores}/{r.spill_loads}") for r in reports if not r.ok]
    assert not bad, bad
    assert {r.arch for r in reports} == {"sm_80", "sm_90a"}
    assert all(0 < r.registers <= 255 for r in reports)
    return reports
