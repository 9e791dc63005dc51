"""transfusion_fast.Model: config validation, losses, backends agree, overfitting, torch.compile."""
import pytest
import torch

import transfusion_fast as tf
from transfusion_fast import ModalityConfig, Model, ModelConfig, pack
from transfusion_fast.testing import IMAGE, SERIES



def tiny_config(**overrides) -> ModelConfig:
    base = dict(dim=32, depth=2, n_heads=2, n_kv_heads=1, modalities=(IMAGE, SERIES))
    base.update(overrides)
    return ModelConfig(**base)


def mixed_samples(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [
        [torch.tensor([1, 2, 3]), torch.randn(1, 4, 4, generator=g), torch.tensor([5, 6])],
        [torch.randn(8, 3, generator=g)],
        [torch.tensor([7, 8, 9, 10, 11])],
        [torch.randn(1, 2, 4, generator=g), torch.tensor([12]), torch.randn(1, 4, 2, generator=g)],
    ]


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(batch)
    out["loss"].backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


# ------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("overrides, words", [
    (dict(dim=0), ["dim", "positive int", "0"]),
    (dict(n_heads=4, n_kv_heads=3), ["n_heads (4)", "n_kv_heads (3)"]),
    (dict(head_dim=24), ["head_dim", "24"]),
    (dict(boi_id=999), ["boi_id", "vocab_size=260", "999"]),
    (dict(eoi_id=256), ["distinct"]),
    (dict(prediction="score"), ["prediction", "'score'"]),
    (dict(conditioning="film"), ["conditioning", "'film'"]),
    (dict(schedule="sigmoid"), ["schedule", "'sigmoid'"]),
    (dict(span_positions="3d"), ["span_positions", "'3d'"]),
    (dict(cfg_drop_prob=1.5), ["cfg_drop_prob", "1.5"]),
    (dict(modalities=(ModalityConfig("image", "video"),)), ["kind", "'video'"]),
    (dict(modalities=(ModalityConfig("image", max_size=7, patch_size=2),)), ["max_size (7)", "patch_size (2)"]),
    (dict(modalities=(IMAGE, IMAGE)), ["distinct"]),
    (dict(modalities=(ModalityConfig("image", boi_id=256),)), ["BOI ids [256]", "bos_id=256"]),
    (dict(modalities=(ModalityConfig("image", eoi_id=258),)), ["BOI ids [258]", "EOI ids [258]"]),
])
def test_config_validation_names_field_and_values(overrides, words):
    with pytest.raises(ValueError) as info:
        tiny_config(**overrides)
    for word in words:
        assert word in str(info.value)


def test_config_dict_round_trip():
    config = tiny_config(conditioning="adaln_zero", span_positions="axial", prediction="v")
    assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown fields"):
        ModelConfig.from_dict({**config.to_dict(), "dims": 3})


# ------------------------------------------------------------------------------------- losses
@pytest.mark.parametrize("conditioning", ["patch_add", "adaln_zero"])
@pytest.mark.parametrize("span_positions", ["sequential", "axial"])
def test_forward_losses_are_consistent(conditioning, span_positions):
    config = tiny_config(conditioning=conditioning, span_positions=span_positions)
    torch.manual_seed(0)
    model = Model(config)
    with tf.use_backend("reference"):
        batch = pack(mixed_samples(), config, seed=0, cfg_drop_prob=0.0)
        out, grads = loss_and_grads(model, batch)
    assert out["spans"] == 4 and out["lm_tokens"] == int((batch.targets != -100).sum())
    torch.testing.assert_close(out["loss"], out["lm_loss"] + 5.0 * out["diffusion_loss"])
    # The total diffusion loss is the mean over spans; the breakdown averages each modality's spans.
    per_mod = {"image": 3, "series": 1}
    weighted = sum(out[f"diffusion_loss/{name}"] * n for name, n in per_mod.items()) / 4
    torch.testing.assert_close(out["diffusion_loss"], weighted)
    for value in (out["lm_loss"], out["diffusion_loss"]):
        assert torch.isfinite(value) and value > 0
    # Every trainable tensor receives a gradient from the combined loss.
    assert set(grads) == {n for n, _ in model.named_parameters()}


def test_text_only_batch_has_zero_diffusion_loss():
    config = tiny_config()
    model = Model(config)
    with tf.use_backend("reference"):
        out = model(pack([[torch.tensor([1, 2, 3])], [torch.tensor([4, 5])]], config))
    assert out["spans"] == 0 and float(out["diffusion_loss"]) == 0.0
    torch.testing.assert_close(out["loss"], out["lm_loss"])


def test_lm_loss_matches_a_direct_cross_entropy():
    """The model's LM loss is next-token CE over text rows only, computed independently here."""
    config = tiny_config(depth=1)
    torch.manual_seed(0)
    model = Model(config)
    with tf.use_backend("reference"):
        batch = pack(mixed_samples()[:1], config, seed=0, cfg_drop_prob=0.0)
        out = model(batch)
        spans = {n: (s.rows, s.x_t, s.timesteps) for n, s in batch.spans.items()}
        h, cond, span_rows = model.embed(batch.tokens, spans)
        h = model.forward_hidden(h, batch.positions, batch.axial, batch.layout, cond, span_rows)
    tokens = batch.tokens.tolist()
    # BOS 1 2 3 BOI p p p p EOI 5 6 EOS: rows predicting the next text token.
    rows = [0, 1, 2, 3, 9, 10, 11]
    expected = torch.nn.functional.cross_entropy(model.output(h[rows]).float(),
                                                 torch.tensor([tokens[r + 1] for r in rows]))
    torch.testing.assert_close(out["lm_loss"], expected)


# ------------------------------------------------------------------------------------- backends
def test_default_backend_equals_reference():
    config = tiny_config()
    torch.manual_seed(0)
    model = Model(config)
    with tf.use_backend("reference"):
        batch = pack(mixed_samples(), config, seed=1)
        ref_out, ref_grads = loss_and_grads(model, batch)
    with tf.use_backend("auto"):
        out, grads = loss_and_grads(model, batch)
    for key in ("loss", "lm_loss", "diffusion_loss"):
        torch.testing.assert_close(out[key], ref_out[key], rtol=1e-5, atol=1e-5)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-5, msg=name)


def test_triton_backend_equals_reference_under_interpreter(triton_device):
    config = tiny_config(depth=1, modalities=(IMAGE,))
    torch.manual_seed(0)
    model = Model(config).to(triton_device)
    samples = [[torch.tensor([1, 2]), torch.randn(1, 4, 4), torch.tensor([3])], [torch.tensor([4, 5, 6])]]
    with tf.use_backend("reference"):
        batch = pack(samples, config, seed=0).to(triton_device)
        ref_out, ref_grads = loss_and_grads(model, batch)
    with tf.use_backend("triton"):
        out, grads = loss_and_grads(model, batch)
    for key in ("loss", "lm_loss", "diffusion_loss"):
        torch.testing.assert_close(out[key], ref_out[key], rtol=1e-4, atol=1e-4)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-3, atol=1e-4, msg=name)


# ------------------------------------------------------------------------------------- overfit
def _overfit(config, samples, key, steps, lr, **pack_kwargs):
    torch.manual_seed(0)
    model = Model(config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    with tf.use_backend("reference"):
        batch = pack(samples, config, seed=0, cfg_drop_prob=0.0, **pack_kwargs)
        history = []
        for _ in range(steps):
            out = model(batch)
            opt.zero_grad()
            out["loss"].backward()
            opt.step()
            history.append(float(out[key].detach()))
    return history


def test_overfits_text():
    config = tiny_config(depth=1)
    samples = [[torch.tensor([10, 20, 30, 40, 50, 60])], [torch.tensor([70, 80, 90])]]
    history = _overfit(config, samples, "lm_loss", 15, lr=3e-2)
    assert history[-1] < 0.1 * history[0], history


def test_overfits_images():
    config = tiny_config(depth=1, modalities=(IMAGE,), diffusion_loss_weight=1.0)
    g = torch.Generator().manual_seed(3)
    samples = [[torch.randn(1, 4, 4, generator=g)], [torch.randn(1, 4, 4, generator=g)]]
    history = _overfit(config, samples, "diffusion_loss", 20, lr=2e-2, timesteps=[600, 800])
    assert history[-1] < 0.1 * history[0], history


# ------------------------------------------------------------------------------------- compile
@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("conditioning", ["patch_add", "adaln_zero"])
def test_block_compiles_fullgraph(backend, conditioning):
    torch._dynamo.reset()
    config = tiny_config(depth=1, conditioning=conditioning, span_positions="axial")
    torch.manual_seed(0)
    model = Model(config)
    with tf.use_backend("reference"):
        batch = pack(mixed_samples(), config, seed=0)
    spans = {n: (s.rows, s.x_t, s.timesteps) for n, s in batch.spans.items()}
    h, cond, span_rows = model.embed(batch.tokens, spans)
    block = model.layers[0]
    args = (batch.positions, batch.axial, batch.layout, cond, span_rows)
    with tf.use_backend(backend):
        expected = block(h, *args)
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
        got = compiled(h, *args)
        got.sum().backward()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert block.attention.wqkv.weight.grad is not None
