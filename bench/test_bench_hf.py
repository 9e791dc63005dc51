"""Hugging Face suite: one training step (forward + backward) of a transformers Llama on a packed
Transfusion sequence, with ``attn_implementation="transfusion_fast"`` and ``layout=`` against the
ways HF-based Transfusion trainers express that mask today: a dense 4-D mask with ``sdpa`` and with
``eager`` attention, and (on CUDA, where FlexAttention has a backward) a FlexAttention BlockMask.

Same model weights, same packed input and RoPE positions; only the attention implementation and
the form of the mask differ. Needs the optional ``transformers``; recorded as unavailable without.
"""
from __future__ import annotations

import copy
import functools

import pytest
import torch

import benchlib
from benchlib import CONFIG, RECORD, Compare, measure

SUITE = "hf"
THREADS = 2
IMPLS = ("transfusion_fast", "sdpa", "eager", "flex_attention")

if CONFIG.full:
    if CONFIG.on_gpu:
        LLAMA = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                     num_key_value_heads=8)
        IMAGES, PATCHES, TEXT, DOCS = 4, 256, 128, 8
    else:
        LLAMA = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2)
        IMAGES, PATCHES, TEXT, DOCS = 3, 256, 128, 2
else:
    LLAMA = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2)
    IMAGES, PATCHES, TEXT, DOCS = 1, 8, 8, 2


def _case() -> str:
    return (f"llama train step dim={LLAMA['hidden_size']} depth={LLAMA['num_hidden_layers']} "
            f"heads={LLAMA['num_attention_heads']}/{LLAMA['num_key_value_heads']} {DOCS} docs x "
            f"(text {TEXT} + {IMAGES} x (image {PATCHES}, text {TEXT}))")


@functools.lru_cache(maxsize=None)
def _setup():
    """(base HF model, input ids, position ids, layout) or raise ImportError."""
    import transfusion_fast.hf  # noqa: F401  (registers the attention)
    from transformers import LlamaConfig, LlamaForCausalLM

    from transfusion_fast.testing import transfusion_example

    layout = transfusion_example(IMAGES, PATCHES, TEXT, DOCS, device=CONFIG.device)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, max_position_embeddings=8192, **LLAMA)
    model = LlamaForCausalLM(config).to(benchlib.device())
    ids = torch.randint(0, 1024, (1, layout.num_keys), device=benchlib.device())
    return model, ids, layout.positions[None].long(), layout


def _mask_kwargs(impl: str, layout) -> dict:
    if impl == "transfusion_fast":
        return {"layout": layout}
    allowed = layout.dense_mask()
    if impl == "sdpa":
        return {"attention_mask": allowed[None, None]}            # boolean, True = attend
    if impl == "eager":
        additive = torch.zeros(allowed.shape, device=allowed.device)
        return {"attention_mask": additive.masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]}
    from torch.nn.attention.flex_attention import create_block_mask

    kv_start, kv_end = layout.kv_start, layout.kv_end

    def mask_mod(b, h, q, kv):
        return (kv >= kv_start[q]) & (kv < kv_end[q])
    return {"attention_mask": create_block_mask(mask_mod, 1, None, layout.num_queries, layout.num_keys,
                                                device=layout.device)}


def _model(impl: str):
    base = _setup()[0]
    model = copy.deepcopy(base)
    model.set_attn_implementation(impl)
    return model


def _step(model, impl: str):
    _, ids, position_ids, layout = _setup()
    out = model(input_ids=ids, position_ids=position_ids, labels=ids, **_mask_kwargs(impl, layout))
    out.loss.backward()
    model.zero_grad(set_to_none=True)
    return out.loss.detach()


@pytest.mark.parametrize("impl", IMPLS)
def test_train_step(benchmark, impl: str):
    case = _case()
    with benchlib.num_threads(THREADS):
        reason = benchlib.probe(_setup)
        if not reason and impl == "flex_attention" and not CONFIG.on_gpu:
            reason = "FlexAttention has no backward on CPU"
        if reason:
            RECORD.mark_unavailable(SUITE, case, impl, reason)
            return
        model = _model(impl)
        first = _step(model, impl)                      # warm-up (and the loss each must agree on)
        compare = (Compare("sdpa"), Compare("eager")) + ((Compare("flex_attention"),) if CONFIG.on_gpu else ())
        loss = measure(benchmark, lambda: _step(model, impl), suite=SUITE, case=case, impl=impl,
                       threads=THREADS, dtype=torch.float32, tokens=_setup()[3].num_keys,
                       compare=compare if impl == "transfusion_fast" else (), rounds=3, warmup=0)
    reference = _step(_model("eager"), "eager")
    assert torch.isfinite(loss) and abs(float(first) - float(reference)) <= 1e-4 * max(1.0, abs(float(reference)))
