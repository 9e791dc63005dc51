"""Schedules: the cosine (squaredcos_cap_v2) and linear tables against diffusers, caching, bad input."""
import pytest
import torch

from transfusion_fast import get_schedule
from transfusion_fast.schedules import Schedule

diffusers = pytest.importorskip("diffusers", reason="diffusers is a test dependency (requirements-test.txt)")

FP32_EPS = 2.0 ** -24


def test_cosine_betas_equal_diffusers_squaredcos_cap_v2_bitwise_in_float32():
    theirs = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    ours = get_schedule("cosine", 1000)
    # diffusers builds the betas in Python float64 and stores them as float32: same formula, same bits.
    assert torch.equal(ours.betas.float(), theirs.betas)
    assert ours.betas.max().item() == 0.999


@pytest.mark.parametrize("name,beta_schedule", [("cosine", "squaredcos_cap_v2"), ("linear", "linear")])
@pytest.mark.parametrize("num_steps", [1000, 50])
def test_alphas_cumprod_match_diffusers_to_fp32_rounding(name, beta_schedule, num_steps):
    theirs = diffusers.DDPMScheduler(num_train_timesteps=num_steps, beta_schedule=beta_schedule)
    ours = get_schedule(name, num_steps)
    assert ours.alphas_cumprod.dtype == torch.float64
    torch.testing.assert_close(ours.betas, theirs.betas.double(), rtol=2 * FP32_EPS, atol=0)
    # diffusers multiplies in float32: one rounding per step of the cumulative product, plus the
    # float32 rounding of a capped β = 0.999, which 1 − β = 0.001 amplifies a thousandfold.
    torch.testing.assert_close(ours.alphas_cumprod[:-1], theirs.alphas_cumprod[:-1].double(),
                               rtol=num_steps * FP32_EPS, atol=0)
    torch.testing.assert_close(ours.alphas_cumprod[-1:], theirs.alphas_cumprod[-1:].double(),
                               rtol=num_steps * FP32_EPS + 1000 * FP32_EPS, atol=0)


def test_schedule_is_cached_and_device_tables_are_cached():
    schedule = get_schedule("cosine", 1000)
    assert get_schedule("cosine", 1000) is schedule
    table = schedule.sqrt_alphas_cumprod_on("cpu")
    assert schedule.sqrt_alphas_cumprod_on("cpu") is table
    torch.testing.assert_close(table ** 2 + schedule.sqrt_one_minus_alphas_cumprod_on("cpu") ** 2,
                               torch.ones(1000, dtype=torch.float64))
    assert schedule.alphas_cumprod_on("cpu", torch.float32).dtype == torch.float32


def test_alphas_cumprod_is_decreasing_in_unit_interval():
    for name in ("cosine", "linear"):
        ab = get_schedule(name).alphas_cumprod
        assert bool((ab[1:] < ab[:-1]).all()) and 0 < ab[-1] and ab[0] < 1


@pytest.mark.parametrize("args,match", [(("sigmoid", 1000), "schedule must be one of"),
                                        (("cosine", 0), "num_steps must be a positive int")])
def test_bad_schedule_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        get_schedule(*args)


def test_schedule_rejects_float32_betas():
    with pytest.raises(ValueError, match="float64"):
        Schedule("custom", torch.linspace(1e-4, 0.02, 10))
