"""The Model at training time: activation checkpointing and the whole model under torch.compile.

* ``ModelConfig.activation_checkpointing``: gradients equal the plain run's, and the autograd graph
  keeps less (counted through saved-tensor hooks).
* ``torch.compile(model, fullgraph=True)`` trains on packed batches of varying length with no graph
  break and at most two compilations over 20 batches, with the eager model's losses.
"""
import copy
import dataclasses

import pytest
import torch

import transfusion_fast as tf
from transfusion_fast import ModalityConfig, Model, ModelConfig, pack

IMAGE = ModalityConfig("image", "image", channels=1, patch_size=2, max_size=8)
SERIES = ModalityConfig("series", "sequence", channels=3, patch_size=4, max_size=16, boi_id=250, eoi_id=251)


def config(**overrides) -> ModelConfig:
    base = dict(dim=32, depth=2, n_heads=2, n_kv_heads=1, modalities=(IMAGE, SERIES))
    base.update(overrides)
    return ModelConfig(**base)


def varying_batch(cfg, i: int):
    """Batch ``i`` of a stream whose every length changes: text, image sides, series frames."""
    g = torch.Generator().manual_seed(i)
    text = lambda n: torch.randint(0, 240, (n,), generator=g)  # noqa: E731
    samples = [[text(2 + i), torch.randn(1, 4, 2 + 2 * (i % 3), generator=g), text(1 + i % 3)],
               [torch.randn(4 * (2 + i % 3), 3, generator=g), text(1 + i % 4)],
               [text(3 + i % 7)]]
    return pack(samples, cfg, seed=i, cfg_drop_prob=0.0)


def saved_bytes(model, batch) -> tuple:
    """(loss, gradients, bytes the autograd graph saved for the backward)."""
    total = [0]

    def pack_hook(t):
        total[0] += t.numel() * t.element_size()
        return t

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
        out = model(batch)
    out["loss"].backward()
    return out["loss"].detach(), {n: p.grad for n, p in model.named_parameters()}, total[0]


# ------------------------------------------------------------------------------------- checkpointing
@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("conditioning", ["patch_add", "adaln_zero"])
def test_activation_checkpointing_gradients_equal_plain_run(backend, conditioning):
    cfg = config(conditioning=conditioning, depth=3)
    torch.manual_seed(0)
    plain = Model(cfg)
    ckpt = Model(dataclasses.replace(cfg, activation_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    batch = varying_batch(cfg, 3)
    with tf.use_backend(backend):
        loss, grads, plain_bytes = saved_bytes(plain, batch)
        ckpt_loss, ckpt_grads, ckpt_bytes = saved_bytes(ckpt, batch)
    torch.testing.assert_close(ckpt_loss, loss, rtol=0, atol=0)
    for name, g in grads.items():
        torch.testing.assert_close(ckpt_grads[name], g, rtol=1e-6, atol=1e-7, msg=name)
    # Each block keeps its input only: the graph holds far less than the plain run's.
    assert ckpt_bytes < 0.5 * plain_bytes, (ckpt_bytes, plain_bytes)


def test_activation_checkpointing_under_autocast_and_in_eval():
    cfg = config(activation_checkpointing=True)
    torch.manual_seed(0)
    model = Model(cfg)
    plain = Model(dataclasses.replace(cfg, activation_checkpointing=False))
    plain.load_state_dict(model.state_dict())
    batch = varying_batch(cfg, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads, _ = saved_bytes(model, batch)
        want, want_grads, _ = saved_bytes(plain, batch)
    torch.testing.assert_close(loss, want, rtol=0, atol=0)
    for name, g in want_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6, msg=name)
    model.eval()
    with torch.no_grad():    # generation-time forward: nothing to recompute
        torch.testing.assert_close(model(batch)["loss"], plain.eval()(batch)["loss"], rtol=0, atol=0)


@pytest.mark.parametrize("value", [1, "yes", None])
def test_activation_checkpointing_must_be_a_bool(value):
    with pytest.raises(ValueError, match=f"activation_checkpointing must be a bool, got {value!r}"):
        config(activation_checkpointing=value)


# ------------------------------------------------------------------------------------- compile
def test_whole_model_compiles_fullgraph_on_varying_batches():
    """20 batches, every length different: no graph break, at most one static and one dynamic
    compilation, the eager model's losses and, after 20 AdamW steps each, its weights."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    cfg = config(conditioning="adaln_zero", span_positions="axial")
    torch.manual_seed(0)
    eager = Model(cfg)
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (eager, model)]
    lengths = set()
    for i in range(20):
        batch = varying_batch(cfg, i)      # packed after torch.compile: marked dynamic
        lengths.add(batch.num_tokens)
        for m, opt in zip((eager, compiled), optimizers):
            out = m(batch)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()
            if m is eager:
                want = out["loss"].detach()
            else:
                torch.testing.assert_close(out["loss"].detach(), want, rtol=1e-5, atol=1e-5, msg=f"batch {i}")
    assert len(lengths) > 10
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert 1 <= counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
    for (name, p), q in zip(eager.named_parameters(), model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)
