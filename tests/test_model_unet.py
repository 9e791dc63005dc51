"""encoder="unet" in the model: the U-Net patch coder as a modality's encoder/decoder (config checks,
shapes, the skip state carried across the transformer, gradients to every parameter, reference and
compiled backends agree, generation with both objectives)."""
import pytest
import torch

import transfusion_fast as tf
from transfusion_fast import ModalityConfig, Model, ModelConfig, pack
from transfusion_fast.encoders import UNetPatchCoder, UNetState
from transfusion_fast.testing import SERIES, BOI

UNET = ModalityConfig("image", "image", channels=2, patch_size=2, max_size=8, encoder="unet", unet_channels=8)


def config(**overrides) -> ModelConfig:
    base = dict(dim=32, depth=1, n_heads=2, n_kv_heads=1, modalities=(UNET, SERIES))
    base.update(overrides)
    return ModelConfig(**base)


def samples(seed=0):
    """Images of three sizes (three U-Net groups), a series, text."""
    g = torch.Generator().manual_seed(seed)
    return [[torch.tensor([1, 2]), torch.randn(2, 4, 4, generator=g), torch.tensor([5])],
            [torch.randn(2, 8, 4, generator=g), torch.randn(8, 3, generator=g)],
            [torch.randn(2, 4, 4, generator=g)],
            [torch.tensor([7]), torch.randn(2, 4, 8, generator=g)]]


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(batch)
    out["loss"].backward()
    return out, {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("field, value, words", [
    ("encoder", "conv", ["encoder", "('linear', 'unet')", "'conv'"]),
    ("kind", "sequence", ["encoder='unet' needs kind='image'", "'sequence'"]),
    ("patch_size", 6, ["power of two", "6"]),
    ("unet_channels", 12, ["unet_channels", "multiple of 8", "12"]),
    ("unet_res_blocks", 0, ["unet_res_blocks", "positive int", "0"]),
])
def test_config_validation(field, value, words):
    fields = dict(name="image", kind="image", channels=2, patch_size=2, max_size=12 if field == "patch_size" else 8,
                  encoder="unet", unet_channels=8)
    fields[field] = value
    with pytest.raises(ValueError) as info:
        ModelConfig(dim=32, depth=1, n_heads=2, modalities=(ModalityConfig(**fields),))
    for word in words:
        assert word in str(info.value)


def test_the_head_holds_a_unet_and_no_linear_layers():
    model = Model(config())
    head = model.heads["image"]
    assert isinstance(head.coder, UNetPatchCoder) and not hasattr(head, "encoder")
    assert head.coder.widths == [8, 16] and head.coder.dim == 32
    assert ModelConfig.from_dict(model.config.to_dict()) == model.config


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
@pytest.mark.parametrize("conditioning", ["patch_add", "adaln_zero"])
def test_shapes_state_and_gradients_to_every_parameter(objective, conditioning):
    cfg = config(objective=objective, conditioning=conditioning)
    torch.manual_seed(0)
    model = Model(cfg)
    with tf.use_backend("reference"):
        batch = pack(samples(), cfg, seed=0, cfg_drop_prob=0.0)
        assert batch.spans["image"].shapes == [(2, 4, 4), (2, 8, 4), (2, 4, 4), (2, 4, 8)]
        out, grads = loss_and_grads(model, batch)
        spans = {n: (s.rows, s.x_t, s.timesteps, s.shapes) for n, s in batch.spans.items()}
        states = {}
        h, cond, span_rows = model.embed(batch.tokens, spans, states)
        h = model.forward_hidden(h, batch.positions, batch.axial, batch.layout, cond, span_rows)
        pred = model.decode_spans(h, "image", batch.spans["image"].rows, states["image"])
    assert set(states) == {"image"} and isinstance(states["image"], UNetState)
    assert len(states["image"].groups) == 3                        # 4x4 (twice), 8x4, 4x8
    assert pred.shape == batch.spans["image"].x0.shape == (4 + 8 + 4 + 8, 8)
    assert torch.isfinite(out["loss"]) and out["spans"] == 5
    assert set(grads) == {n for n, _ in model.named_parameters()}
    coder_grads = [g for n, g in grads.items() if n.startswith("heads.image.coder.")]
    assert len(coder_grads) > 20 and all(bool(g.abs().sum() > 0) for g in coder_grads)


def test_decoding_without_the_state_is_refused():
    model = Model(config())
    with pytest.raises(ValueError, match=r"encoder='unet'.*state=None"):
        model.decode_spans(torch.randn(6, 32), "image", torch.arange(4))
    with pytest.raises(ValueError, match=r"encoder='unet'.*shapes"):
        model.embed(torch.zeros(4, dtype=torch.long), {"image": (torch.arange(4), torch.randn(4, 8),
                                                                 torch.zeros(4, dtype=torch.long))})


def test_the_timestep_conditions_the_unet():
    cfg = config(objective="flow")
    torch.manual_seed(0)
    model = Model(cfg)
    with tf.use_backend("reference"):
        a = model(pack(samples(), cfg, seed=0, timesteps=[0.2] * 5))["diffusion_loss/image"]
        b = pack(samples(), cfg, seed=0, timesteps=[0.2] * 5)
        b.spans["image"].timesteps = torch.full_like(b.spans["image"].timesteps, 0.9)   # same x_t, other t
        assert not torch.allclose(model(b)["diffusion_loss/image"], a)


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_default_backend_equals_reference(objective):
    cfg = config(objective=objective)
    torch.manual_seed(0)
    model = Model(cfg)
    with tf.use_backend("reference"):
        batch = pack(samples(), cfg, seed=1, cfg_drop_prob=0.0)
        ref_out, ref_grads = loss_and_grads(model, batch)
    with tf.use_backend("auto"):
        out, grads = loss_and_grads(model, batch)
    for key in ("loss", "lm_loss", "diffusion_loss"):
        torch.testing.assert_close(out[key], ref_out[key], rtol=1e-5, atol=1e-5)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("objective, sampler", [("ddpm", "ddim"), ("flow", "heun")])
def test_generation_with_a_unet_modality(objective, sampler):
    model = Model(config(objective=objective)).eval()
    prompts = [[torch.tensor([1, BOI])], [torch.tensor([2]), torch.randn(2, 4, 8), torch.tensor([BOI])]]
    kwargs = dict(max_new_tokens=2, num_inference_steps=2, sampler=sampler, cfg_scale=2.0, span_shape=(8, 4),
                  progress=False, stop_at_eos=False, seed=0)
    with tf.use_backend("reference"):
        out = model.generate(prompts, **kwargs)
    with tf.use_backend("auto"):
        auto = model.generate(prompts, **kwargs)
    for items, auto_items in zip(out, auto):
        assert items[0].shape == (2, 8, 4) and torch.isfinite(items[0]).all()
        torch.testing.assert_close(auto_items[0], items[0], rtol=1e-4, atol=1e-4)


def test_generation_carries_the_skip_state_of_each_step():
    """One Euler step from t = 1 to 0 through generate (KV cache, the U-Net state of the step's own
    forward) equals ε − v(ε, 1) from one uncached forward of the whole document."""
    from transfusion_fast.layout import Layout

    model = Model(config(objective="flow", modalities=(UNET,))).eval()
    seed = 3
    with tf.use_backend("reference"):
        out = model.generate([[torch.tensor([5, BOI])]], max_new_tokens=0, num_inference_steps=1, sampler="euler",
                             cfg_scale=1.0, seed=seed, span_shape=(4, 8), progress=False)
        noise = torch.randn(8, UNET.patch_dim, generator=torch.Generator().manual_seed(seed))
        tokens = torch.cat([torch.tensor([model.config.bos_id, 5, BOI]), torch.zeros(8, dtype=torch.long)])
        layout = Layout.transfusion(torch.tensor([0, 11]), torch.tensor([[3, 11]]))
        rows, states = torch.arange(3, 11), {}
        with torch.no_grad():
            h, cond, span_rows = model.embed(tokens, {"image": (rows, noise, torch.ones(8), [(2, 4, 8)])}, states)
            h = model.forward_hidden(h, layout.positions, None, layout, cond, span_rows)
            velocity = model.decode_spans(h, "image", rows, states["image"])
    expected = tf.ops.unpatchify((noise - velocity)[None], 2, 4, 8)[0]
    torch.testing.assert_close(out[0][0], expected, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------- training at scale
@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_autocast_keeps_the_unet_in_fp32_and_matches_fp32(objective):
    """Under bf16 autocast the U-Net heads run outside autocast (fp32, like the linear heads):
    the loss stays within bf16's tolerance of the fp32 loss, every gradient is finite and fp32 and
    close to the fp32 one."""
    cfg = config(objective=objective)
    torch.manual_seed(0)
    model = Model(cfg)
    batch = pack(samples(), cfg, seed=0, cfg_drop_prob=0.0)
    want, want_grads = loss_and_grads(model, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, grads = loss_and_grads(model, batch)
        spans = {n: (s.rows, s.x_t, s.timesteps, s.shapes) for n, s in batch.spans.items()}
        tokens, _, state = model.heads["image"].encode(*spans["image"][1:])
    assert tokens.dtype == torch.float32 and all(s.dtype == torch.float32 for g in state.skips for s in g)
    for key in ("loss", "diffusion_loss"):
        assert got[key].dtype == torch.float32
        torch.testing.assert_close(got[key], want[key], rtol=2e-2, atol=1e-3, msg=key)
    assert set(grads) == set(want_grads)
    for name, g in grads.items():
        assert g.dtype == torch.float32 and torch.isfinite(g).all(), name
        # bf16 rounding in the blocks reaches every head gradient; small tensors (biases) most.
        error = (g - want_grads[name]).norm() / want_grads[name].norm().clamp_min(1e-6)
        assert error <= 0.3, (name, float(error))
    flat = torch.cat([g.flatten() for g in grads.values()])
    want_flat = torch.cat([want_grads[name].flatten() for name in grads])
    assert (flat - want_flat).norm() / want_flat.norm() <= 0.05


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_activation_checkpointing_with_a_unet_equals_the_plain_run(objective):
    import dataclasses

    cfg = config(objective=objective, depth=2)
    torch.manual_seed(0)
    plain = Model(cfg)
    ckpt = Model(dataclasses.replace(cfg, activation_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    batch = pack(samples(), cfg, seed=2, cfg_drop_prob=0.0)
    want, want_grads = loss_and_grads(plain, batch)
    got, grads = loss_and_grads(ckpt, batch)
    torch.testing.assert_close(got["loss"], want["loss"], rtol=0, atol=0)
    for name, g in want_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-6, atol=1e-7, msg=name)
