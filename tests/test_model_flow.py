"""The rectified-flow objective in the model: config, pack (continuous times, fused noise), the loss
(checked by hand), overfitting, and generation with the Euler / Heun samplers and CFG (checked
against a hand-written integration of the model's velocity)."""
import math

import pytest
import torch

import transfusion_fast as tf
from transfusion_fast import ModalityConfig, Model, ModelConfig, ops, pack
from transfusion_fast.layout import Layout
from transfusion_fast.testing import IMAGE, SERIES, BOS, BOI, EOI



pytestmark = pytest.mark.usefixtures("reference_backend")


def flow_config(**overrides) -> ModelConfig:
    base = dict(dim=32, depth=2, n_heads=2, n_kv_heads=1, modalities=(IMAGE, SERIES), objective="flow")
    base.update(overrides)
    return ModelConfig(**base)


def samples(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.tensor([1, 2, 3]), torch.randn(1, 4, 4, generator=g), torch.tensor([5, 6])],
            [torch.randn(8, 3, generator=g)],
            [torch.tensor([7, 8]), torch.randn(1, 2, 4, generator=g)]]


# ------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("overrides, words", [
    (dict(objective="edm"), ["ModelConfig.objective", "('ddpm', 'flow')", "'edm'"]),
    (dict(flow_time_distribution="beta"), ["flow_time_distribution", "('uniform', 'logit_normal')", "'beta'"]),
    (dict(flow_time_std=0.0), ["flow_time_std", "positive finite float", "0.0"]),
    (dict(flow_shift=-1.0), ["flow_shift", "positive finite float", "-1.0"]),
    (dict(flow_time_mean=float("nan")), ["flow_time_mean", "finite", "nan"]),
])
def test_config_validation(overrides, words):
    with pytest.raises(ValueError) as info:
        flow_config(**overrides)
    for word in words:
        assert word in str(info.value)


def test_config_round_trip_and_old_configs_default_to_ddpm():
    config = flow_config(flow_time_distribution="logit_normal", flow_time_std=0.8, flow_shift=3.0)
    assert ModelConfig.from_dict(config.to_dict()) == config and config.is_flow
    old = {k: v for k, v in ModelConfig().to_dict().items() if not k.startswith(("objective", "flow_"))}
    assert ModelConfig.from_dict(old).objective == "ddpm"


# ------------------------------------------------------------------------------------- pack
def test_pack_draws_continuous_times_and_interpolates():
    config = flow_config()
    batch = pack(samples(), config, seed=3, cfg_drop_prob=0.0)
    assert batch.span_timesteps.dtype == torch.float32
    assert bool(((batch.span_timesteps >= 0) & (batch.span_timesteps <= 1)).all())
    for s in batch.spans.values():
        assert s.timesteps.dtype == torch.float32
        torch.testing.assert_close(s.timesteps, batch.span_timesteps[s.span_index])
        t = s.timesteps[:, None]
        torch.testing.assert_close(s.x_t, (1 - t) * s.x0 + t * s.noise, rtol=1e-6, atol=1e-6)
    again = pack(samples(), config, seed=3, cfg_drop_prob=0.0)
    assert torch.equal(again.spans["image"].x_t, batch.spans["image"].x_t)
    other = pack(samples(), config, seed=4, cfg_drop_prob=0.0)
    assert not torch.equal(other.spans["image"].noise, batch.spans["image"].noise)


def test_pack_times_follow_the_configured_distribution():
    """Logit-normal with a shift: the span times are those of ops.sample_flow_timesteps' recipe
    (mean of many draws), and fixed times are taken as given."""
    image_only = [[torch.randn(1, 4, 4)] for _ in range(400)]
    uniform = pack(image_only, flow_config(), seed=0).span_timesteps
    shifted = pack(image_only, flow_config(flow_time_distribution="logit_normal", flow_shift=3.0),
                   seed=0).span_timesteps
    assert abs(float(uniform.mean()) - 0.5) < 0.05
    reference = ops.sample_flow_timesteps(20000, distribution="logit_normal", shift=3.0,
                                          generator=torch.Generator().manual_seed(0))
    assert abs(float(shifted.mean()) - float(reference.mean())) < 0.03 and float(shifted.mean()) > 0.6
    fixed = pack(samples(), flow_config(), timesteps=[0.25, 1.0, 0.0], cfg_drop_prob=0.0)
    assert fixed.span_timesteps.tolist() == [0.25, 1.0, 0.0]
    assert torch.equal(fixed.spans["image"].x_t[4:], fixed.spans["image"].x0[4:])     # t = 0: clean


def test_captioned_spans_get_cleaner_times():
    config = flow_config(modalities=(IMAGE,))
    captioned = [[torch.randn(1, 4, 4), torch.tensor([5])] for _ in range(200)]
    t = pack(captioned, config, seed=0, caption_noise_prob=1.0, caption_max_timestep=300).span_timesteps
    assert float(t.max()) <= 0.3 and float(t.mean()) > 0.1


def test_pack_flow_bad_timesteps():
    with pytest.raises(ValueError, match=r"timesteps\[1\] \(objective='flow'\) must be a finite float in \[0, 1\], "
                                         r"got float 1.5"):
        pack(samples(), flow_config(), timesteps=[0.5, 1.5, 0.1])
    with pytest.raises(ValueError, match=r"timesteps must give one value in \[0, 1\] \(objective='flow'\) per span "
                                         r"\(3 spans\), got 2 values"):
        pack(samples(), flow_config(), timesteps=[0.5, 0.1])


# ------------------------------------------------------------------------------------- loss
def test_flow_loss_equals_a_hand_computation():
    config = flow_config()
    torch.manual_seed(0)
    model = Model(config)
    batch = pack(samples(), config, seed=0, cfg_drop_prob=0.0, timesteps=[0.3, 0.7, 0.9])
    out = model(batch)
    # By hand: the velocity target ε − x0, each span's mean squared error, the mean over spans.
    spans = {n: (s.rows, s.x_t, s.timesteps, s.shapes) for n, s in batch.spans.items()}
    h, cond, span_rows = model.embed(batch.tokens, spans)
    h = model.forward_hidden(h, batch.positions, batch.axial, batch.layout, cond, span_rows)
    per_span = []
    for k in range(3):
        for name, s in batch.spans.items():
            sel = s.span_index == k
            if sel.any():
                pred = model.heads[name].decoder(h[s.rows[sel]])
                per_span.append(((pred - (s.noise[sel] - s.x0[sel])) ** 2).mean())
    expected = torch.stack(per_span).mean()
    torch.testing.assert_close(out["diffusion_loss"], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss"], out["lm_loss"] + 5.0 * expected, rtol=1e-5, atol=1e-6)


def test_time_embedding_reads_t_times_diffusion_steps():
    config = flow_config(diffusion_steps=1000)
    model = Model(config)
    head = model.heads["image"]
    x = torch.randn(3, IMAGE.patch_dim)
    t = torch.tensor([0.0, 0.25, 1.0])
    got, _, _ = head.encode(x, t)
    torch.testing.assert_close(got, head.encoder(x + head.time(t * 1000)))
    ddpm = Model(flow_config(objective="ddpm"))
    ddpm.load_state_dict(model.state_dict())
    steps = torch.tensor([0, 250, 1000])
    torch.testing.assert_close(ddpm.heads["image"].encode(x, steps)[0], got)


@pytest.mark.parametrize("conditioning", ["patch_add", "adaln_zero"])
def test_flow_overfits_images(conditioning):
    config = flow_config(depth=1, modalities=(IMAGE,), diffusion_loss_weight=1.0, conditioning=conditioning)
    g = torch.Generator().manual_seed(3)
    data = [[torch.randn(1, 4, 4, generator=g)], [torch.randn(1, 4, 4, generator=g)]]
    torch.manual_seed(0)
    model = Model(config)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2, weight_decay=0.0)
    batch = pack(data, config, seed=0, cfg_drop_prob=0.0, timesteps=[0.4, 0.8])
    history = []
    for _ in range(30):
        out = model(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        history.append(float(out["diffusion_loss"].detach()))
    assert history[-1] < 0.1 * history[0], history


def test_default_backend_equals_reference():
    config = flow_config()
    torch.manual_seed(0)
    model = Model(config)
    batch = pack(samples(), config, seed=1)
    ref = model(batch)
    with tf.use_backend("auto"):
        auto_batch = pack(samples(), config, seed=1)
        out = model(auto_batch)
    # flow_interpolate's compiled kernel makes the same Philox noise as the reference twin.
    torch.testing.assert_close(auto_batch.spans["image"].noise, batch.spans["image"].noise)
    torch.testing.assert_close(out["loss"], ref["loss"], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------- generate
def _hand_velocity(model, prefix, x, t):
    """The model's velocity on span rows ``x`` after text ``prefix``: one packed forward of the
    document ``prefix + span`` (no cache), span bidirectional."""
    n = x.shape[0]
    tokens = torch.cat([prefix, torch.full((n,), model.config.pad_id)])
    L = tokens.numel()
    layout = Layout.transfusion(torch.tensor([0, L]), torch.tensor([[L - n, L]]))
    rows = torch.arange(L - n, L)
    spans = {"image": (rows, x, torch.full((n,), t), [(1, 4, 4)])}
    h, cond, span_rows = model.embed(tokens, spans)
    h = model.forward_hidden(h, layout.positions, None, layout, cond, span_rows)
    return model.decode_spans(h, "image", rows)


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_one_guided_step_equals_a_hand_integration(sampler):
    """One step from t = 1 to 0 with CFG: Euler x = ε − v_g(ε, 1); Heun averages it with the
    velocity at the predicted point. v_g = v_u + s·(v_c − v_u), v_u from the [BOS, BOI] twin."""
    model = Model(flow_config(modalities=(IMAGE,))).eval()
    scale, seed = 3.0, 11
    out = model.generate([[torch.tensor([5, BOI])]], max_new_tokens=0, num_inference_steps=1, sampler=sampler,
                         cfg_scale=scale, seed=seed, span_shape=(4, 4), progress=False)
    noise = torch.randn(4, IMAGE.patch_dim, generator=torch.Generator().manual_seed(seed))
    cond_prefix, uncond_prefix = torch.tensor([BOS, 5, BOI]), torch.tensor([BOS, BOI])
    with torch.no_grad():
        def guided(x, t):
            vc, vu = _hand_velocity(model, cond_prefix, x, t), _hand_velocity(model, uncond_prefix, x, t)
            return vu + scale * (vc - vu)
        v1 = guided(noise, 1.0)
        x = noise - v1
        if sampler == "heun":
            x = noise - 0.5 * (v1 + guided(x, 0.0))
    expected = ops.unpatchify(x[None], 2, 4, 4)[0]
    torch.testing.assert_close(out[0][0], expected, rtol=1e-4, atol=1e-4)
    assert out[0][1].tolist() == [EOI]


@pytest.mark.parametrize("sampler", ["euler", "heun"])
@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_generate_shapes_and_determinism(sampler, cfg_scale):
    model = Model(flow_config()).eval()
    prompts = [[torch.tensor([1, BOI])], [torch.tensor([2, 250])], [torch.tensor([3]), torch.randn(1, 4, 4)]]
    kwargs = dict(max_new_tokens=3, num_inference_steps=3, sampler=sampler, cfg_scale=cfg_scale,
                  span_shape={"image": (4, 4), "series": (8, 3)}, progress=False, stop_at_eos=False)
    first = model.generate(prompts, seed=5, **kwargs)
    again = model.generate(prompts, seed=5, **kwargs)
    other = model.generate(prompts, seed=6, **kwargs)
    assert first[0][0].shape == (1, 4, 4) and first[1][0].shape == (8, 3)
    for a, b in zip(first, again):
        assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(first[0][0], other[0][0])
    assert all(torch.isfinite(item).all() for items in first for item in items if item.is_floating_point())


def test_heun_and_euler_differ_and_steps_are_free_of_the_ddpm_bound():
    model = Model(flow_config(modalities=(IMAGE,), diffusion_steps=10)).eval()
    kwargs = dict(max_new_tokens=0, span_shape=(4, 4), progress=False, seed=0, cfg_scale=1.0)
    euler = model.generate([[torch.tensor([BOI])]], sampler="euler", num_inference_steps=2, **kwargs)
    heun = model.generate([[torch.tensor([BOI])]], sampler="heun", num_inference_steps=2, **kwargs)
    assert not torch.equal(euler[0][0], heun[0][0])
    # num_inference_steps of a flow model is bounded by the ODE grid, not by diffusion_steps.
    many = model.generate([[torch.tensor([BOI])]], num_inference_steps=12, **kwargs)
    assert many[0][0].shape == (1, 4, 4)


@pytest.mark.parametrize("objective, sampler, expected", [
    ("flow", "ddim", "('euler', 'heun')"), ("flow", "ddpm", "('euler', 'heun')"),
    ("ddpm", "euler", "('ddim', 'ddpm')"), ("ddpm", "heun", "('ddim', 'ddpm')"),
    ("flow", "rk4", "('euler', 'heun')"),
])
def test_sampler_must_match_the_objective(objective, sampler, expected):
    model = Model(flow_config(objective=objective, modalities=(IMAGE,)))
    with pytest.raises(ValueError) as info:
        model.generate([[torch.tensor([BOI])]], sampler=sampler, num_inference_steps=1, progress=False)
    message = str(info.value)
    assert "sampler" in message and expected in message and repr(sampler) in message
    assert f"objective={objective!r}" in message


def test_ddpm_model_keeps_ddim_by_default():
    model = Model(flow_config(objective="ddpm", modalities=(IMAGE,)))
    out = model.generate([[torch.tensor([BOI])]], num_inference_steps=2, progress=False, span_shape=(4, 4))
    expected = model.generate([[torch.tensor([BOI])]], num_inference_steps=2, progress=False, span_shape=(4, 4),
                              sampler="ddim")
    assert torch.equal(out[0][0], expected[0][0])


# ------------------------------------------------------------------------------------- exact ODE
MU, SIGMA = 1.5, 0.5    # the data of every span element: N(MU, SIGMA²)


def _exact_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """E[ε − x0 | x_t = x] for x0 ~ N(μ, σ²), ε ~ N(0, 1): x_t ~ N((1 − t)μ, (1 − t)²σ² + t²), and
    the ODE dx/dt = v carries ε at t = 1 to μ + σ·ε at t = 0 along x_t = (1 − t)μ + √var_t·ε."""
    t = t.double()[:, None]
    var = (1 - t) ** 2 * SIGMA ** 2 + t ** 2
    return ((t - (1 - t) * SIGMA ** 2) / var * (x.double() - (1 - t) * MU) - MU).float()


def _model_with_the_exact_velocity(monkeypatch, **overrides) -> Model:
    """A flow model whose span prediction is the exact velocity of the Gaussian data at the span
    inputs of the same forward: generate's loop (grid, Euler/Heun ops, guidance, cache) is what
    the test checks, against the known solution."""
    model = Model(flow_config(modalities=(IMAGE,), depth=1, **overrides)).eval()
    seen = {}
    embed, decode = model.embed, model.decode_spans

    def recording_embed(tokens, spans, states=None):
        seen.update({name: (value[1], value[2]) for name, value in spans.items()})
        return embed(tokens, spans, states)

    def exact_decode(h, name, rows, state=None):
        decode(h, name, rows, state)            # the real decoder still runs on the real rows
        x, t = seen[name]
        return _exact_velocity(x, t)

    monkeypatch.setattr(model, "embed", recording_embed)
    monkeypatch.setattr(model, "decode_spans", exact_decode)
    return model


@pytest.mark.parametrize("flow_shift, cfg_scale", [(1.0, 1.0), (3.0, 1.0), (1.0, 3.0)])
def test_generate_integrates_a_gaussian_flow_to_its_exact_solution(monkeypatch, flow_shift, cfg_scale):
    """Through generate: the sample is μ + σ·ε for the initial noise ε; Euler's error halves and
    Heun's at least quarters when the steps double (orders 1 and 2; with a shifted grid Heun's
    ratio is still above 4 at these step counts), and Heun in 25 steps is close."""
    model = _model_with_the_exact_velocity(monkeypatch, flow_shift=flow_shift)
    prompts = [[torch.tensor([5, BOI])], [torch.tensor([6, BOI])]]
    seed = 7
    noise = torch.randn(2 * 4, IMAGE.patch_dim, generator=torch.Generator().manual_seed(seed))
    exact = torch.stack([ops.unpatchify(n[None], 2, 4, 4)[0] for n in (MU + SIGMA * noise).double().split(4)])

    def error(sampler, steps):
        out = model.generate(prompts, max_new_tokens=0, num_inference_steps=steps, sampler=sampler,
                             cfg_scale=cfg_scale, seed=seed, span_shape=(4, 4), progress=False)
        got = torch.stack([items[0] for items in out]).double()
        return float((got - exact).abs().max())

    for sampler, order in (("euler", 1), ("heun", 2)):
        errors = [error(sampler, n) for n in (8, 16, 32)]
        ratios = [errors[i] / errors[i + 1] for i in range(2)]
        if order == 1:
            assert abs(math.log2(ratios[-1]) - 1) < 0.3, (sampler, errors, ratios)
        else:
            assert math.log2(ratios[-1]) > 1.7, (sampler, errors, ratios)
    heun25, euler25 = error("heun", 25), error("euler", 25)
    assert heun25 < 5e-3 and euler25 < 0.2 and heun25 < euler25 / 10, (heun25, euler25)


# ------------------------------------------------------------------------------------- compile
@pytest.mark.parametrize("encoder", ["linear", "unet"])
def test_flow_model_compiles_fullgraph(encoder):
    """torch.compile(fullgraph=True) of a flow model (linear or U-Net heads) on batches whose text
    lengths and image sizes change: no graph break, the eager model's losses and gradients."""
    import copy

    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    image = ModalityConfig("image", "image", channels=2, patch_size=2, max_size=8, encoder=encoder,
                           unet_channels=8)
    config = flow_config(depth=1, modalities=(image,))
    torch.manual_seed(0)
    eager = Model(config)
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for i in range(4):
        g = torch.Generator().manual_seed(i)
        batch = pack([[torch.randint(0, 200, (2 + i,), generator=g), torch.randn(2, 4, 4 + 2 * (i % 2), generator=g)],
                      [torch.randn(2, 4, 4, generator=g), torch.randint(0, 200, (1 + i,), generator=g)]],
                     config, seed=i, cfg_drop_prob=0.0)
        for m in (eager, model):
            m.zero_grad(set_to_none=True)
        want, got = eager(batch)["loss"], compiled(batch)["loss"]
        want.backward()
        got.backward()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"batch {i}")
        for (name, p), q in zip(eager.named_parameters(), model.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=f"batch {i}: {name}")
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] <= 3, dict(counters["stats"])


def test_a_flow_batch_cannot_feed_a_ddpm_model():
    """Float times in [0, 1] would read as DDPM steps 0 and 1: the objective is a packed field."""
    batch = pack(samples(), flow_config(), seed=0)
    with pytest.raises(ValueError, match=r"differing fields: objective: batch 'flow', model 'ddpm'"):
        Model(flow_config(objective="ddpm"))(batch)
    with pytest.raises(ValueError, match=r"objective: batch 'ddpm', model 'flow'"):
        Model(flow_config())(pack(samples(), flow_config(objective="ddpm"), seed=0))
