"""Sampler steps: compiled ops vs their reference twins vs diffusers' DDPM/DDIM schedulers; timesteps."""
import sys

import pytest
import torch

from transfusion_fast import Schedule, _ext, get_schedule, use_backend
from transfusion_fast.ops import (ddim_step, ddim_step_reference, ddpm_step, ddpm_step_reference,
                                  inference_timesteps)

diffusers = pytest.importorskip("diffusers", reason="diffusers is a test dependency (requirements-test.txt)")

FP32_EPS = 2.0 ** -24
DIFFUSERS_PREDICTION = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
SCHEDULE = get_schedule("cosine", 1000)


def _diffusers_scheduler(kind, prediction, num_inference_steps):
    common = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False,
                  prediction_type=DIFFUSERS_PREDICTION[prediction], timestep_spacing="trailing")
    if kind == "ddpm":
        scheduler = diffusers.DDPMScheduler(**common)
    else:
        scheduler = diffusers.DDIMScheduler(set_alpha_to_one=True, **common)
        scheduler.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    # Our float64 table (equal to theirs to fp32 rounding: test_schedules.py), so that the step
    # formulas are compared on their own.
    scheduler.alphas_cumprod = SCHEDULE.alphas_cumprod.clone()
    scheduler.set_timesteps(num_inference_steps)
    return scheduler


def _diffusers_rows(kind, scheduler, x, m, t, noise, eta):
    """diffusers' step for each row separately (it takes one timestep per call), in float64."""
    rows = []
    for r in range(x.shape[0]):
        xr, mr, nr = x[r:r + 1].double(), m[r:r + 1].double(), noise[r:r + 1].double()
        if kind == "ddpm":
            rows.append(_ddpm_step_with_noise(scheduler, mr, int(t[r]), xr, nr))
        else:
            rows.append(scheduler.step(mr, int(t[r]), xr, eta=eta, variance_noise=nr).prev_sample)
    return torch.cat(rows)


def _ddpm_step_with_noise(scheduler, m, t, x, noise):
    """DDPMScheduler.step with ``noise`` as its variance noise: it draws it through the module's
    ``randn_tensor``, which is swapped for the duration of the call."""
    module = sys.modules[type(scheduler).__module__]
    original = module.randn_tensor
    module.randn_tensor = lambda shape, **kwargs: noise.reshape(shape).to(kwargs.get("dtype") or noise.dtype)
    try:
        return scheduler.step(m, t, x).prev_sample
    finally:
        module.randn_tensor = original


def _step_bound(kind, scheduler, x, m, t, noise, eta):
    """|A|·|x| + |B|·|m| + |C|·|z| for x_prev = A·x + B·m + C·z (the step is linear), from diffusers."""
    zeros, ones = torch.zeros_like(x, dtype=torch.float64), torch.ones_like(x, dtype=torch.float64)
    a = _diffusers_rows(kind, scheduler, ones, zeros, t, zeros, eta)
    b = _diffusers_rows(kind, scheduler, zeros, ones, t, zeros, eta)
    c = _diffusers_rows(kind, scheduler, zeros, zeros, t, ones, eta)
    return a.abs() * x.double().abs() + b.abs() * m.double().abs() + c.abs() * noise.double().abs()


def _inputs(rows, shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda: torch.randn(rows, *shape, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    return make(), make(), make(), make()


def _pairs(timesteps, rows_pick):
    """(t, t_prev) per row for the given positions in the inference schedule."""
    t_prev_all = torch.cat([timesteps[1:], torch.tensor([-1])])
    idx = torch.tensor(rows_pick)
    return timesteps[idx], t_prev_all[idx]


@pytest.mark.parametrize("num_train,num_inference", [(1000, 250), (1000, 50), (1000, 7), (1000, 16), (1000, 3),
                                                     (1000, 1000), (100, 1), (10, 4)])
def test_inference_timesteps_match_diffusers_trailing(num_train, num_inference):
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=num_train, timestep_spacing="trailing")
    scheduler.set_timesteps(num_inference)
    ours = inference_timesteps(num_train, num_inference)
    assert ours.dtype == torch.int64
    assert torch.equal(ours, scheduler.timesteps)


def test_inference_timesteps_default_is_transfusion_1000_to_250():
    steps = inference_timesteps()
    assert steps.shape == (250,) and steps[0] == 999 and steps[-1] == 3
    assert bool((steps[:-1] - steps[1:] == 4).all())


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_steps_match_diffusers(kind, prediction):
    num_inference = 50
    scheduler = _diffusers_scheduler(kind, prediction, num_inference)
    timesteps = inference_timesteps(1000, num_inference)
    t, t_prev = _pairs(timesteps, [0, 1, 25, 48, 49])  # first, second, middle, last two (to x0)
    eta = 0.0 if kind == "ddim" else None
    etas = [0.0, 0.7] if kind == "ddim" else [None]
    for eta in etas:
        for dtype in (torch.float64, torch.float32):
            x, cond, uncond, noise = _inputs(5, (3, 7), dtype, seed=1)
            guided = uncond.double() + 3.0 * (cond.double() - uncond.double())
            expected = _diffusers_rows(kind, scheduler, x, guided, t, noise, eta or 0.0)
            bound = _step_bound(kind, scheduler, x, guided, t, noise, eta or 0.0)
            kwargs = dict(prediction=prediction, uncond_out=uncond, cfg_scale=3.0, noise=noise)
            if kind == "ddim":
                kwargs["eta"] = eta
            step = ddpm_step if kind == "ddpm" else ddim_step
            for backend in ("auto", "reference"):
                with use_backend(backend):
                    got = step(x, cond, t, t_prev, SCHEDULE, **kwargs)
                assert got.dtype == dtype and got.shape == x.shape
                # Rounding of x, m, z and of A, B, C: a few ulps of each term (plus the CFG combine).
                rel = 1e-12 if dtype == torch.float64 else 8 * FP32_EPS
                tolerance = rel * (bound + 4 * _step_bound(kind, scheduler, x, cond.double().abs()
                                                           + uncond.double().abs(), t, noise, eta or 0.0))
                err = (got.double() - expected).abs()
                assert bool((err <= tolerance + 1e-300).all()), (backend, dtype, eta, (err - tolerance).max())


def _tolerance(dtype):
    return {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (1, 13), (3, 2, 5), (4, 33)])
def test_compiled_step_with_generated_noise_equals_reference(kind, dtype, shape):
    x, cond, uncond, _ = _inputs(shape[0], shape[1:], dtype, seed=2)
    timesteps = inference_timesteps(1000, 250)
    t, t_prev = _pairs(timesteps, [(5 * r + 40) % 250 for r in range(shape[0])])
    if shape[0] == 1:
        t, t_prev = t[:1], t_prev[:1]
    for prediction in ("eps", "v"):
        kwargs = dict(prediction=prediction, uncond_out=uncond, cfg_scale=5.0, seed=77)
        if kind == "ddim":
            kwargs["eta"] = 1.0
        step = ddpm_step if kind == "ddpm" else ddim_step
        reference = ddpm_step_reference if kind == "ddpm" else ddim_step_reference
        got = step(x, cond, t, t_prev, SCHEDULE, **kwargs)
        expected = reference(x, cond, t, t_prev, SCHEDULE, **kwargs)
        # Moderate t: the coefficients stay O(1), so a relative tolerance of the dtype applies.
        scale = expected.double().abs() + 1
        assert bool(((got.double() - expected.double()).abs() <= _tolerance(dtype) * scale).all())


def test_ddim_eta_zero_is_deterministic_and_needs_no_seed():
    x, cond, _, _ = _inputs(2, (9,), torch.float32)
    t, t_prev = torch.tensor([999, 500]), torch.tensor([979, -1])
    first = ddim_step(x, cond, t, t_prev, SCHEDULE)
    assert torch.equal(first, ddim_step(x, cond, t, t_prev, SCHEDULE))


def test_ddpm_noise_depends_on_seed_only():
    x, cond, _, _ = _inputs(3, (50,), torch.float32)
    t, t_prev = torch.tensor([999, 600, 10]), torch.tensor([995, 596, 6])
    a = ddpm_step(x, cond, t, t_prev, SCHEDULE, seed=5)
    assert torch.equal(a, ddpm_step(x, cond, t, t_prev, SCHEDULE, seed=5))
    assert not torch.equal(a, ddpm_step(x, cond, t, t_prev, SCHEDULE, seed=6))
    torch.manual_seed(0)
    b = ddpm_step(x, cond, t, t_prev, SCHEDULE)
    torch.manual_seed(0)
    assert torch.equal(b, ddpm_step(x, cond, t, t_prev, SCHEDULE))


def test_steps_are_identical_across_thread_counts():
    x, cond, uncond, _ = _inputs(7, (3001,), torch.float32)
    t, t_prev = _pairs(inference_timesteps(), list(range(0, 70, 10)))
    results = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append((ddpm_step(x, cond, t, t_prev, SCHEDULE, uncond_out=uncond, cfg_scale=2.0, seed=3),
                            ddim_step(x, cond, t, t_prev, SCHEDULE, eta=0.5, seed=3)))
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_final_step_reaches_predicted_x0():
    x, cond, _, _ = _inputs(2, (6,), torch.float64)
    t, t_prev = torch.tensor([3, 3]), torch.tensor([-1, -1])
    for step in (ddim_step, ddpm_step):
        out = step(x, cond, t, t_prev, SCHEDULE, prediction="x0", seed=1) if step is ddpm_step else \
            step(x, cond, t, t_prev, SCHEDULE, prediction="x0")
        # ᾱ_prev = 1: the step lands on the predicted x0 (DDPM adds σ = 1e-10 noise, as diffusers).
        torch.testing.assert_close(out, cond, atol=1e-9, rtol=0)


def _good():
    x, cond, uncond, noise = _inputs(2, (4,), torch.float32)
    return dict(x_t=x, model_out=cond, t=torch.tensor([10, 5]), t_prev=torch.tensor([5, -1]), schedule=SCHEDULE)


@pytest.mark.parametrize("change,match", [
    (dict(t=torch.tensor([1000, 5])), r"t must lie in \[0, 1000\)"),
    (dict(t=torch.tensor([10])), r"one entry per row, shape \(2,\)"),
    (dict(t=torch.tensor([10.0, 5.0])), "t must be an int32/int64 tensor"),
    (dict(t_prev=torch.tensor([-2, -1])), r"t_prev must lie in \[-1, 1000\)"),
    (dict(t_prev=torch.tensor([10, -1])), "t_prev must be < t"),
    (dict(prediction="score"), "prediction must be one of"),
    (dict(cfg_scale=5.0), "needs uncond_out"),
    (dict(model_out=torch.zeros(2, 4, dtype=torch.float64)), "model_out must match x_t"),
    (dict(uncond_out=torch.zeros(2, 5)), "uncond_out must match x_t"),
    (dict(noise=torch.zeros(3, 4)), "noise must match x_t"),
    (dict(seed=-1), "seed must be None or an int"),
    (dict(noise=torch.zeros(2, 4), seed=3), "noise or seed, not both"),
    (dict(t=torch.tensor([10, 5], device="meta")), "t is on meta"),
])
@pytest.mark.parametrize("step", [ddpm_step, ddim_step])
def test_bad_step_input_raises_before_any_kernel(step, change, match):
    args = _good()
    args.update(change)
    kwargs = {k: args.pop(k) for k in list(args) if k not in ("x_t", "model_out", "t", "t_prev", "schedule")}
    with pytest.raises(ValueError, match=match):
        step(args["x_t"], args["model_out"], args["t"], args["t_prev"], args["schedule"], **kwargs)


def test_bad_eta_and_inference_steps():
    args = _good()
    with pytest.raises(ValueError, match="eta must be a finite float >= 0"):
        ddim_step(args["x_t"], args["model_out"], args["t"], args["t_prev"], SCHEDULE, eta=-0.1)
    with pytest.raises(ValueError, match="num_inference_steps must be <= num_train_steps"):
        inference_timesteps(10, 20)
    with pytest.raises(ValueError, match="num_inference_steps must be a positive int"):
        inference_timesteps(1000, 0)


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_cfg_scale_and_eta_are_refused(backend, value):
    # The issue: NaN/inf guidance or eta gave all-NaN images with no error.
    args = _good()
    x, cond, t, t_prev = args["x_t"], args["model_out"], args["t"], args["t_prev"]
    uncond = torch.zeros_like(x)
    with use_backend(backend):
        for step in (ddpm_step, ddim_step):
            with pytest.raises(ValueError, match=rf"cfg_scale must be a finite float, got float {value}"):
                step(x, cond, t, t_prev, SCHEDULE, uncond_out=uncond, cfg_scale=value, seed=1)
        with pytest.raises(ValueError, match=rf"eta must be a finite float >= 0, got float {value}"):
            ddim_step(x, cond, t, t_prev, SCHEDULE, eta=value, seed=1)


def test_ddim_eta_zero_draws_no_noise_with_a_beta_of_one():
    # The issue: with a beta of 1 the compiled DDIM step at eta = 0 asked for noise it does not
    # need. A Schedule takes a 1 at its last step only (zero terminal SNR); the compiled op also
    # gets tables reaching 0 earlier, where the variance is 0/0 = NaN and 0 * NaN is not 0.
    schedule = Schedule("terminal", torch.tensor([0.1, 0.5, 1.0], dtype=torch.float64))
    x, cond, _, _ = _inputs(2, (4,), torch.float32)
    for t, t_prev in ((2, 1), (2, -1), (2, 0), (1, 0)):
        t, t_prev = torch.tensor([t, t]), torch.tensor([t_prev, t_prev])
        for prediction in ("v", "x0"):
            got = ddim_step(x, cond, t, t_prev, schedule, prediction=prediction, eta=0.0)
            want = ddim_step_reference(x, cond, t, t_prev, schedule, prediction=prediction, eta=0.0)
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    table = torch.tensor([0.9, 0.0, 0.0], dtype=torch.float64)
    ops = _ext.ops()
    out = ops.ddim_step(x, cond, None, torch.tensor([2, 2]), torch.tensor([1, 1]), table, 2, 0.0, 1.0, None, None)
    # v prediction at alpha_bar 0 on both sides: x0 = -v, eps = x_t, and x_prev = sqrt(0) x0 + x_t.
    torch.testing.assert_close(out, x)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cuda_steps_equal_cpu_bitwise(dtype):
    x, cond, uncond, _ = _inputs(5, (4099,), dtype)
    t, t_prev = _pairs(inference_timesteps(), [0, 3, 100, 248, 249])
    for step, extra in ((ddpm_step, {}), (ddim_step, {"eta": 0.3}), (ddim_step, {})):
        for prediction in ("eps", "x0", "v"):
            kwargs = dict(prediction=prediction, uncond_out=uncond, cfg_scale=4.0, seed=11, **extra)
            if step is ddim_step and not extra:
                kwargs.pop("seed")
            cpu = step(x, cond, t, t_prev, SCHEDULE, **kwargs)
            kwargs["uncond_out"] = uncond.cuda()
            gpu = step(x.cuda(), cond.cuda(), t.cuda(), t_prev.cuda(), SCHEDULE, **kwargs)
            assert torch.equal(cpu, gpu.cpu()), (step.__name__, prediction, extra)
