"""add_noise (fused q_sample + Philox noise), Philox known answers, noise statistics, targets."""
import math

import pytest
import torch

from transfusion_fast import _ext, get_schedule, use_backend
from transfusion_fast.ops import (add_noise, add_noise_reference, diffusion_target, philox_normal_reference,
                                  predicted_eps, predicted_x0)
from transfusion_fast.ops.noise import philox4x32_10_reference

SCHEDULE = get_schedule("cosine", 1000)

# Known-answer vectors of Philox4x32-10 from the Random123 distribution (kat_vectors):
# counter (4 words), key (2 words) -> output (4 words).
PHILOX_KAT = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8)),
    ((0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff), (0xffffffff, 0xffffffff),
     (0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd)),
    ((0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344), (0xa4093822, 0x299f31d0),
     (0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1)),
]


def _kat_tensors(device="cpu"):
    counters = torch.tensor([c for c, _, _ in PHILOX_KAT], dtype=torch.int64, device=device)
    keys = torch.tensor([k for _, k, _ in PHILOX_KAT], dtype=torch.int64, device=device)
    expected = torch.tensor([o for _, _, o in PHILOX_KAT], dtype=torch.int64)
    return counters, keys, expected


def test_compiled_philox_matches_random123_known_answers():
    counters, keys, expected = _kat_tensors()
    assert torch.equal(_ext.ops().philox4x32_10(counters, keys), expected)


def test_reference_philox_matches_random123_known_answers():
    counters, keys, expected = _kat_tensors()
    assert torch.equal(philox4x32_10_reference(counters, keys), expected)


def _noise(seed, numel):
    x0 = torch.zeros(1, numel)
    return add_noise(x0, torch.zeros(1, dtype=torch.int64), SCHEDULE, seed=seed)[1].reshape(-1)


@pytest.mark.parametrize("numel", [1, 3, 4, 5, 1023, 1024, 1025, 4099])
@pytest.mark.parametrize("seed", [0, 1, 2 ** 40 + 7, 2 ** 63 - 1])
def test_compiled_noise_is_bitwise_the_reference(numel, seed):
    assert torch.equal(_noise(seed, numel), philox_normal_reference(seed, numel))


def test_every_cpu_code_path_this_machine_runs_gives_the_reference_bits():
    # AVX-512 (16 blocks at a time), AVX2 (8) and scalar: tails of every length, and a range where the
    # low word of the block counter wraps inside one SIMD group (blocks 2^32 - 5 ...).
    compiled = _ext.ops()
    isas = compiled.philox_normal_isas()
    assert "scalar" in isas
    wrap = 4 * (2 ** 32 - 5)
    for seed, first, numel in ((0, 0, 4099), (2 ** 63 - 1, 0, 257), (2 ** 40 + 7, 64, 1), (3, wrap, 200)):
        expected = philox_normal_reference(seed, numel, first=first)
        for isa in ["auto", *isas]:
            got = compiled.philox_normal(seed, first, numel, isa)
            assert torch.equal(got, expected), (isa, seed, first, numel)


def test_cpu_code_path_names_are_checked():
    with pytest.raises(RuntimeError, match="isa must be"):
        _ext.ops().philox_normal(0, 0, 8, "sse9")
    with pytest.raises(RuntimeError, match="multiple of 4"):
        _ext.ops().philox_normal(0, 2, 8, "auto")
    with pytest.raises(ValueError, match="multiple of 4"):
        philox_normal_reference(0, 8, first=2)


def test_box_muller_polynomials_agree_with_libm_to_float32_rounding():
    numel = 1 << 14
    blocks = torch.arange(numel // 4)
    zeros = torch.zeros_like(blocks)
    words = philox4x32_10_reference(torch.stack([blocks, zeros, zeros, zeros], 1), torch.stack([zeros + 9, zeros], 1))
    u1 = ((words[:, 0] >> 8) + 1).double() * 2.0 ** -24
    m2 = words[:, 1] >> 8
    theta = (((m2 & 0x3FFFFF) - 0x200000).double() + 0.5) * (math.pi / 2) / 2 ** 22
    angle = (m2 >> 22).double() * (math.pi / 2) + theta
    radius = (-2 * u1.log()).sqrt()
    got = philox_normal_reference(9, numel).reshape(-1, 4).double()
    torch.testing.assert_close(got[:, 0], radius * angle.cos(), atol=4e-6, rtol=4e-7)
    torch.testing.assert_close(got[:, 1], radius * angle.sin(), atol=4e-6, rtol=4e-7)


def test_noise_statistics():
    n = 1 << 21
    z = _noise(12345, n).double()
    se = 1 / math.sqrt(n)
    assert abs(z.mean().item()) < 5 * se
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2) * se
    assert abs((z ** 3).mean().item()) < 5 * math.sqrt(15) * se          # skewness
    assert abs((z ** 4).mean().item() - 3) < 5 * math.sqrt(96) * se      # kurtosis
    # Kolmogorov-Smirnov distance to the normal CDF (critical value at 0.1%: 1.95/sqrt(n)).
    sorted_z = z.sort().values
    cdf = 0.5 * (1 + torch.erf(sorted_z / math.sqrt(2)))
    grid = torch.arange(1, n + 1, dtype=torch.float64) / n
    assert (cdf - grid).abs().max().item() < 1.95 * se
    # Tails: P(|z| > 4) = 6.3e-5.
    assert abs((z.abs() > 4).double().mean().item() - 6.334e-5) < 5 * math.sqrt(6.334e-5 / n)


@pytest.mark.parametrize("lag", [1, 2, 3, 4, 5, 1024])
def test_noise_has_no_serial_correlation(lag):
    n = 1 << 20
    z = _noise(7, n + lag).double()
    assert abs((z[:-lag] * z[lag:]).mean().item()) < 5 / math.sqrt(n)
    # Lanes of one Box-Muller pair are uncorrelated in squares too (r is shared, angles differ).
    if lag == 1:
        pairs = z[: n - n % 2].reshape(-1, 2)
        assert abs(torch.corrcoef((pairs ** 2).T)[0, 1].item()) < 5 / math.sqrt(n / 2)


def test_different_seeds_give_independent_noise():
    n = 1 << 20
    a, b = _noise(1, n).double(), _noise(2, n).double()
    assert abs((a * b).mean().item()) < 5 / math.sqrt(n)
    assert not torch.equal(_noise(2 ** 32, 64), _noise(0, 64))  # the high key word matters


def test_noise_is_identical_for_any_thread_count():
    previous = torch.get_num_threads()
    x0 = torch.randn(37, 3, 41, 43)
    t = torch.randint(0, 1000, (37,))
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(add_noise(x0, t, SCHEDULE, seed=99))
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1,), (1, 1), (5, 3), (3, 2, 7), (2, 5, 1027)])
def test_add_noise_compiled_equals_reference(dtype, shape):
    x0 = torch.randn(shape, dtype=torch.float64).to(dtype)
    t = torch.randint(0, 1000, (shape[0],), dtype=torch.int32)
    x_t, noise = add_noise(x0, t, SCHEDULE, seed=5)
    with use_backend("reference"):
        ref_x_t, ref_noise = add_noise(x0, t, SCHEDULE, seed=5)
    assert x_t.dtype == dtype and x_t.shape == shape and noise.shape == shape
    assert torch.equal(noise, ref_noise)
    # Same IEEE operations in the same order: equal bits.
    assert torch.equal(x_t, ref_x_t)
    # Given noise, the op only combines, and returns that noise.
    combined, same = add_noise(x0, t, SCHEDULE, noise=noise)
    assert same is noise and torch.equal(combined, x_t)
    assert torch.equal(add_noise_reference(x0, t, SCHEDULE, noise), x_t)


def test_add_noise_on_channels_last_input():
    x0 = torch.randn(4, 3, 6, 5).to(memory_format=torch.channels_last)
    t = torch.tensor([0, 10, 500, 999])
    x_t, noise = add_noise(x0, t, SCHEDULE, seed=1)
    x_t_contiguous, noise_contiguous = add_noise(x0.contiguous(), t, SCHEDULE, seed=1)
    assert torch.equal(x_t, x_t_contiguous) and torch.equal(noise, noise_contiguous)


def test_add_noise_matches_diffusers_q_sample():
    diffusers = pytest.importorskip("diffusers", reason="diffusers is a test dependency (requirements-test.txt)")
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    scheduler.alphas_cumprod = SCHEDULE.alphas_cumprod.clone()
    x0, noise = torch.randn(6, 4, 3, dtype=torch.float64), torch.randn(6, 4, 3, dtype=torch.float64)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    torch.testing.assert_close(add_noise(x0, t, SCHEDULE, noise=noise)[0], scheduler.add_noise(x0, noise, t))
    torch.testing.assert_close(diffusion_target(x0, noise, t, SCHEDULE, "v"), scheduler.get_velocity(x0, noise, t))


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_add_noise_gradcheck_float64(backend):
    t = torch.tensor([3, 999, 400])
    x0 = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    noise = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    with use_backend(backend):
        assert torch.autograd.gradcheck(lambda a, b: add_noise(a, t, SCHEDULE, noise=b)[0], (x0, noise))
        assert torch.autograd.gradcheck(lambda a: add_noise(a, t, SCHEDULE, seed=4)[0], (x0,))


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_targets_and_conversions_invert_each_other(prediction):
    x0 = torch.randn(4, 3, 5, dtype=torch.float64)
    t = torch.tensor([0, 100, 700, 999])
    x_t, noise = add_noise(x0, t, SCHEDULE, seed=2)
    target = diffusion_target(x0, noise, t, SCHEDULE, prediction)
    torch.testing.assert_close(predicted_x0(x_t, target, t, SCHEDULE, prediction), x0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(predicted_eps(x_t, target, t, SCHEDULE, prediction), noise, rtol=1e-6, atol=1e-6)


def test_v_target_gradcheck_float64():
    t = torch.tensor([10, 900])
    x0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    noise = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: diffusion_target(a, b, t, SCHEDULE, "v"), (x0, noise))


def test_noise_ops_pass_opcheck():
    x0, noise = torch.randn(3, 6), torch.randn(3, 6)
    t = torch.tensor([1, 2, 999])
    tables = (SCHEDULE.sqrt_alphas_cumprod_on("cpu"), SCHEDULE.sqrt_one_minus_alphas_cumprod_on("cpu"))
    add_noise(x0, t, SCHEDULE, seed=1)  # registers the autograd and fake kernels
    ops = _ext.ops()
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(ops.q_sample, (x0.requires_grad_(), t, *tables, noise), test_utils=checks)
    torch.library.opcheck(ops.q_sample_philox, (x0, t, *tables, 3), test_utils=checks)


def _bad(**change):
    args = dict(x0=torch.zeros(2, 3), timesteps=torch.tensor([0, 5]), schedule=SCHEDULE)
    args.update(change)
    return args


@pytest.mark.parametrize("args,error,match", [
    (_bad(timesteps=torch.tensor([0, 1000])), ValueError,
     r"timesteps must lie in \[0, 1000\), got values from 0 to 1000"),
    (_bad(timesteps=torch.tensor([-1, 3])), ValueError, r"timesteps must lie in \[0, 1000\)"),
    (_bad(timesteps=torch.tensor([0, 1, 2])), ValueError, r"one entry per row, shape \(2,\), got \(3,\)"),
    (_bad(timesteps=torch.tensor([0.0, 1.0])), ValueError, "timesteps must be an int32/int64 tensor"),
    (_bad(timesteps=torch.tensor([0, 1], device="meta")), ValueError, "timesteps is on meta"),
    (_bad(x0=torch.zeros(2, 3, dtype=torch.int64)), ValueError, "x0 must be a floating-point tensor"),
    (_bad(noise=torch.zeros(2, 3, dtype=torch.float64)), ValueError, "noise must match x0"),
    (_bad(noise=torch.zeros(2, 4)), ValueError, "noise must match x0"),
    (_bad(seed=2 ** 63), ValueError, "seed must be None or an int"),
    (_bad(seed=1.5), ValueError, "seed must be None or an int"),
    (_bad(noise=torch.zeros(2, 3), seed=1), ValueError, "noise or seed, not both"),
    (_bad(schedule="cosine"), TypeError, "schedule must be a transfusion_fast.schedules.Schedule"),
])
def test_bad_add_noise_input(args, error, match):
    with pytest.raises(error, match=match):
        add_noise(**args)


def test_unknown_prediction_raises():
    x0 = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"prediction must be one of \('eps', 'x0', 'v'\), got 'score'"):
        diffusion_target(x0, x0, torch.tensor([0, 1]), SCHEDULE, "score")
    with pytest.raises(ValueError, match="prediction must be one of"):
        predicted_x0(x0, x0, torch.tensor([0, 1]), SCHEDULE, "epsilon")


@pytest.mark.gpu
def test_cuda_philox_known_answers_and_noise_bitwise_equal_cpu():
    counters, keys, expected = _kat_tensors("cuda")
    assert torch.equal(_ext.ops().philox4x32_10(counters, keys).cpu(), expected)
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        x0 = torch.randn(9, 3, 1031).to(dtype)
        t = torch.randint(0, 1000, (9,))
        cpu = add_noise(x0, t, SCHEDULE, seed=2024)
        gpu = add_noise(x0.cuda(), t.cuda(), SCHEDULE, seed=2024)
        assert torch.equal(cpu[1], gpu[1].cpu()) and torch.equal(cpu[0], gpu[0].cpu())
        given = add_noise(x0.cuda(), t.cuda(), SCHEDULE, noise=cpu[1].cuda())[0]
        assert torch.equal(given.cpu(), cpu[0])
    # the reference twin runs on CUDA tensors too, and gives the same bits there
    assert torch.equal(philox_normal_reference(7, 4099, device="cuda").cpu(),
                       philox_normal_reference(7, 4099))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("use_seed", [False, True])
def test_add_noise_reads_a_strided_timestep_view(dtype, use_seed):
    # The case: t[::2] of an int64 tensor is a view with stride 2; the compiled path used
    # to read it as contiguous (row 1 got t = 999 and x_t[1, 0] = 0 instead of 1).
    t = torch.tensor([0, 999, 0, 999, 0, 999], dtype=dtype)[::2]
    schedule = get_schedule()
    kwargs = dict(seed=5) if use_seed else dict(noise=torch.zeros(3, 2))
    x_t, noise = add_noise(torch.ones(3, 2), t, schedule, **kwargs)
    want = add_noise_reference(torch.ones(3, 2), t, schedule, noise)
    assert torch.equal(x_t, want)
    if not use_seed:
        assert x_t[:, 0].tolist() == pytest.approx([math.sqrt(schedule.alphas_cumprod[0].item())] * 3)
    # Every row is at t = 0, as with a contiguous tensor of zeros.
    assert torch.equal(x_t, add_noise(torch.ones(3, 2), torch.zeros(3, dtype=dtype), schedule, **kwargs)[0])
