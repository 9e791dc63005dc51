"""Forward diffusion on packed rows, with counter-based noise, and the prediction-type conversions.

* :func:`add_noise` — q_sample ``x_t = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·ε`` where every row of ``x0`` (a
  patch row of the packed tensor, or an image) uses its own timestep, fused with the generation of
  ε. ε comes from Philox 4x32-10 keyed by ``(seed, element index)`` followed by Box-Muller (the exact
  recipe is in csrc/philox.h), so one seed gives bit-identical noise on CPU and CUDA, under any
  thread count and any split of the work. The element index is the flat row-major index into
  ``x0``'s shape.
* :func:`diffusion_target` — what the model learns to predict: ``"eps"`` (ε), ``"x0"`` or ``"v"``
  (``sqrt(ᾱ)·ε − sqrt(1 − ᾱ)·x0``, Salimans & Ho 2022).
* :func:`predicted_x0`, :func:`predicted_eps` — a model output of any prediction type turned back
  into x0 and ε (what the samplers need).

Backends: ``reference`` runs the PyTorch twins (:func:`add_noise_reference`,
:func:`philox_normal_reference`: the same noise bit for bit, from the same IEEE operations); ``auto``
and ``triton`` run the compiled kernels of csrc/noise.cpp / csrc/noise_cuda.cu on the tensor's
device. There is no Triton version of these ops.
"""
from __future__ import annotations

import torch

from .. import _ext
from .. import backend as _backend
from ..schedules import Schedule
from .validation import (check_like, check_prediction, check_rows, check_schedule, check_seed, check_timesteps,
                         check_zero_snr, resolve_seed)

__all__ = ["add_noise", "add_noise_reference", "check_add_noise_inputs", "diffusion_target",
           "predicted_x0", "predicted_eps", "philox4x32_10_reference", "philox_normal_reference"]

_MASK32 = 0xFFFFFFFF
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)


def check_add_noise_inputs(x0: torch.Tensor, timesteps: torch.Tensor, schedule: Schedule,
                           noise: torch.Tensor | None, seed: int | None = None) -> None:
    check_rows("x0", x0)
    check_schedule(schedule)
    check_timesteps("timesteps", timesteps, x0.shape[0], x0.device, schedule)
    if noise is not None:
        check_like("noise", noise, x0, "x0")
        if seed is not None:
            raise ValueError("give noise or seed, not both: with noise given there is nothing to generate")
    check_seed(seed)


# ----------------------------------------------------------------------------- Philox twin
def _mulhilo32(multiplier: int, x: torch.Tensor):
    """(hi, lo) words of multiplier·x for uint32 values held in int64, without int64 overflow."""
    low_product = multiplier * (x & 0xFFFF)
    high_product = multiplier * (x >> 16)
    middle = low_product + ((high_product & 0xFFFF) << 16)
    return (high_product >> 16) + (middle >> 32), middle & _MASK32


def philox4x32_10_reference(counters: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Philox 4x32-10 of ``(N, 4)`` counters under ``(N, 2)`` keys (uint32 values in int64 tensors)."""
    c0, c1, c2, c3 = counters.long().unbind(1)
    k0, k1 = keys.long().unbind(1)
    for _ in range(10):
        hi0, lo0 = _mulhilo32(_PHILOX_M[0], c0)
        hi1, lo1 = _mulhilo32(_PHILOX_M[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _PHILOX_W[0]) & _MASK32, (k1 + _PHILOX_W[1]) & _MASK32
    return torch.stack([c0, c1, c2, c3], 1)


def _f32(value: float) -> torch.Tensor:
    # A double literal rounded to float32: the same constant the C++ kernels use.
    return torch.tensor(value, dtype=torch.float32)


def _log_unit_reference(u: torch.Tensor) -> torch.Tensor:
    """ln(u) for u in (0, 1], float32, with the exact operation sequence of csrc/philox.h."""
    bits = u.view(torch.int32)
    exponent = ((bits >> 23) & 0xFF) - 126
    mantissa = ((bits & 0x007FFFFF) | 0x3F000000).view(torch.float32)
    low = mantissa < _f32(0.707106781186547524)
    exponent = exponent - low.to(torch.int32)
    x = torch.where(low, mantissa + mantissa, mantissa) - 1.0
    z = x * x
    y = torch.full_like(x, _f32(7.0376836292E-2))   # on x's device: the reference runs on CUDA too
    for c in (-1.1514610310E-1, 1.1676998740E-1, -1.2420140846E-1, 1.4249322787E-1, -1.6668057665E-1,
              2.0000714765E-1, -2.4999993993E-1, 3.3333331174E-1):
        y = y * x + _f32(c)
    y = (y * x) * z
    fe = exponent.to(torch.float32)
    y = y + _f32(-2.12194440e-4) * fe
    y = y + (-0.5) * z
    x = x + y
    return x + _f32(0.693359375) * fe


def _box_muller_reference(w1: torch.Tensor, w2: torch.Tensor):
    u1 = ((w1 >> 8) + 1).to(torch.float32) * _f32(2.0 ** -24)
    # sqrt through float64 is the correctly rounded float32 sqrt (IEEE's sqrtf); torch's float32
    # sqrt kernel on CPU is not always correctly rounded.
    r = (-2.0 * _log_unit_reference(u1)).double().sqrt().float()
    m2 = w2 >> 8
    quadrant = m2 >> 22
    centered = ((m2 & 0x3FFFFF) - 0x200000).to(torch.float32) + 0.5
    theta = centered * _f32(3.74507028292216e-07)
    z = theta * theta
    sp = _f32(-1.9515295891E-4) * z + _f32(8.3321608736E-3)
    sp = sp * z + _f32(-1.6666654611E-1)
    s = theta + (theta * z) * sp
    cp = _f32(2.443315711809948E-5) * z + _f32(-1.388731625493765E-3)
    cp = cp * z + _f32(4.166664568298827E-2)
    c = (1.0 + (-0.5) * z) + (z * z) * cp
    cos_a = torch.where(quadrant == 0, c, torch.where(quadrant == 1, -s, torch.where(quadrant == 2, -c, s)))
    sin_a = torch.where(quadrant == 0, s, torch.where(quadrant == 1, c, torch.where(quadrant == 2, -s, -c)))
    return r * cos_a, r * sin_a


def philox_normal_reference(seed: int, numel: int, device="cpu", first: int = 0) -> torch.Tensor:
    """The ``numel`` standard normals (float32) of ``seed`` from flat element ``first`` on (a multiple
    of 4): element ``i`` is lane ``i % 4`` of Philox block ``i // 4`` (see csrc/philox.h);
    bit-identical to the compiled kernels."""
    if first < 0 or first % 4:
        raise ValueError(f"first must be a non-negative multiple of 4, got {first!r}")
    blocks = torch.arange(first // 4, first // 4 + (numel + 3) // 4, dtype=torch.int64, device=device)
    zeros = torch.zeros_like(blocks)
    counters = torch.stack([blocks & _MASK32, blocks >> 32, zeros, zeros], 1)
    keys = torch.stack([zeros + (seed & _MASK32), zeros + (seed >> 32)], 1)
    words = philox4x32_10_reference(counters, keys)
    z0, z1 = _box_muller_reference(words[:, 0], words[:, 1])
    z2, z3 = _box_muller_reference(words[:, 2], words[:, 3])
    return torch.stack([z0, z1, z2, z3], 1).reshape(-1)[:numel]


# ----------------------------------------------------------------------------- q_sample
def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_coefficients(table: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``table[timesteps]`` in ``like``'s compute dtype, shaped to broadcast over ``like``'s rows."""
    values = table.to(_opmath(like.dtype))[timesteps.long()]
    return values.reshape(-1, *([1] * (like.dim() - 1)))


def _q_sample_tables(schedule: Schedule, device):
    return schedule.sqrt_alphas_cumprod_on(device), schedule.sqrt_one_minus_alphas_cumprod_on(device)


def add_noise_reference(x0: torch.Tensor, timesteps: torch.Tensor, schedule: Schedule,
                        noise: torch.Tensor) -> torch.Tensor:
    """q_sample in plain PyTorch: float32 arithmetic (float64 for float64 inputs), coefficients
    ``sqrt(ᾱ_t)`` and ``sqrt(1 − ᾱ_t)`` computed in float64 and rounded once."""
    sqrt_ab, sqrt_1m_ab = _q_sample_tables(schedule, x0.device)
    a = row_coefficients(sqrt_ab, timesteps, x0)
    b = row_coefficients(sqrt_1m_ab, timesteps, x0)
    compute = _opmath(x0.dtype)
    return (a * x0.to(compute) + b * noise.to(compute)).to(x0.dtype)


def _q_sample_grads(ctx, grad_x_t):
    timesteps, sqrt_ab, sqrt_1m_ab = ctx.saved_tensors
    grad_x0 = grad_noise = None
    if ctx.needs_input_grad[0]:
        grad_x0 = (row_coefficients(sqrt_ab, timesteps, grad_x_t) * grad_x_t).to(grad_x_t.dtype)
    if len(ctx.needs_input_grad) > 4 and ctx.needs_input_grad[4]:
        grad_noise = (row_coefficients(sqrt_1m_ab, timesteps, grad_x_t) * grad_x_t).to(grad_x_t.dtype)
    return grad_x0, grad_noise


def _setup_q_sample(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], inputs[2], inputs[3])


def _backward_q_sample(ctx, grad_x_t):
    grad_x0, grad_noise = _q_sample_grads(ctx, grad_x_t)
    return grad_x0, None, None, None, grad_noise


def _backward_q_sample_philox(ctx, grad_x_t, grad_noise):
    # The generated noise does not depend on x0: only x_t carries a gradient.
    grad_x0, _ = _q_sample_grads(ctx, grad_x_t)
    return grad_x0, None, None, None, None


def _fake_q_sample(x0, timesteps, sqrt_ab, sqrt_1m_ab, noise):
    return torch.empty_like(x0, memory_format=torch.contiguous_format)


def _fake_q_sample_philox(x0, timesteps, sqrt_ab, sqrt_1m_ab, seed):
    return (torch.empty_like(x0, memory_format=torch.contiguous_format),
            torch.empty_like(x0, memory_format=torch.contiguous_format))


def _attach_python_kernels():
    """Autograd formulas and fake (meta) kernels of the compiled ops above (run once)."""
    torch.library.register_autograd("transfusion_fast::q_sample", _backward_q_sample,
                                    setup_context=_setup_q_sample)
    torch.library.register_autograd("transfusion_fast::q_sample_philox", _backward_q_sample_philox,
                                    setup_context=_setup_q_sample)
    torch.library.register_fake("transfusion_fast::q_sample", _fake_q_sample)
    torch.library.register_fake("transfusion_fast::q_sample_philox", _fake_q_sample_philox)


def noise_ops():
    """The compiled q_sample ops, with their autograd formulas and fake kernels attached."""
    return _ext.ops(_attach_python_kernels)


def add_noise(x0: torch.Tensor, timesteps: torch.Tensor, schedule: Schedule,
              noise: torch.Tensor | None = None, seed: int | None = None):
    """Noise every row of ``x0`` at its own timestep; returns ``(x_t, noise)``.

    ``timesteps``: int tensor with one entry per row of ``x0``, in ``[0, T)``. Without ``noise`` the
    noise is generated from ``seed`` (an int in ``[0, 2**63)``; ``None`` draws one from torch's default
    generator) by Philox + Box-Muller; with ``noise`` the op only combines. Gradients flow to ``x0``
    (and to a given ``noise``). Both outputs are contiguous, in ``x0``'s dtype.
    """
    check_add_noise_inputs(x0, timesteps, schedule, noise, seed)
    if noise is None:
        seed = resolve_seed(seed)
    if _backend.get_backend() == "reference":
        if noise is None:
            noise = philox_normal_reference(seed, x0.numel(), x0.device).to(x0.dtype).reshape(x0.shape)
        return add_noise_reference(x0, timesteps, schedule, noise), noise
    sqrt_ab, sqrt_1m_ab = _q_sample_tables(schedule, x0.device)
    ops = noise_ops()
    if noise is None:
        return ops.q_sample_philox(x0, timesteps, sqrt_ab, sqrt_1m_ab, seed)
    return ops.q_sample(x0, timesteps, sqrt_ab, sqrt_1m_ab, noise), noise


# ----------------------------------------------------------------------------- prediction types
def _row_sqrt_coefficients(schedule: Schedule, timesteps: torch.Tensor, like: torch.Tensor):
    sqrt_ab, sqrt_1m_ab = _q_sample_tables(schedule, like.device)
    return row_coefficients(sqrt_ab, timesteps, like), row_coefficients(sqrt_1m_ab, timesteps, like)


def _check_pair(first_name, first, second_name, second, timesteps, schedule, prediction) -> None:
    check_rows(first_name, first)
    check_like(second_name, second, first, first_name)
    check_schedule(schedule)
    check_timesteps("timesteps", timesteps, first.shape[0], first.device, schedule)
    check_prediction(prediction)


def diffusion_target(x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, schedule: Schedule,
                     prediction: str = "eps") -> torch.Tensor:
    """The regression target of the diffusion loss: ``noise`` (``"eps"``), ``x0`` (``"x0"``) or
    ``v = sqrt(ᾱ_t)·noise − sqrt(1 − ᾱ_t)·x0`` (``"v"``), per row timestep; differentiable."""
    _check_pair("x0", x0, "noise", noise, timesteps, schedule, prediction)
    if prediction == "eps":
        return noise
    if prediction == "x0":
        return x0
    a, b = _row_sqrt_coefficients(schedule, timesteps, x0)
    compute = _opmath(x0.dtype)
    return (a * noise.to(compute) - b * x0.to(compute)).to(x0.dtype)


def predicted_x0(x_t: torch.Tensor, model_out: torch.Tensor, timesteps: torch.Tensor, schedule: Schedule,
                 prediction: str = "eps") -> torch.Tensor:
    """x0 implied by a model output at ``x_t``: ``(x_t − sqrt(1−ᾱ)·ε)/sqrt(ᾱ)`` for ``"eps"``,
    ``model_out`` for ``"x0"``, ``sqrt(ᾱ)·x_t − sqrt(1−ᾱ)·v`` for ``"v"``."""
    _check_pair("x_t", x_t, "model_out", model_out, timesteps, schedule, prediction)
    check_zero_snr("timesteps", timesteps, schedule, prediction)
    if prediction == "x0":
        return model_out
    a, b = _row_sqrt_coefficients(schedule, timesteps, x_t)
    compute = _opmath(x_t.dtype)
    x, m = x_t.to(compute), model_out.to(compute)
    out = (x - b * m) / a if prediction == "eps" else a * x - b * m
    return out.to(x_t.dtype)


def predicted_eps(x_t: torch.Tensor, model_out: torch.Tensor, timesteps: torch.Tensor, schedule: Schedule,
                  prediction: str = "eps") -> torch.Tensor:
    """ε implied by a model output at ``x_t``: ``model_out`` for ``"eps"``,
    ``(x_t − sqrt(ᾱ)·x0)/sqrt(1−ᾱ)`` for ``"x0"``, ``sqrt(ᾱ)·v + sqrt(1−ᾱ)·x_t`` for ``"v"``."""
    _check_pair("x_t", x_t, "model_out", model_out, timesteps, schedule, prediction)
    if prediction == "eps":
        return model_out
    a, b = _row_sqrt_coefficients(schedule, timesteps, x_t)
    compute = _opmath(x_t.dtype)
    x, m = x_t.to(compute), model_out.to(compute)
    out = (x - a * m) / b if prediction == "x0" else a * m + b * x
    return out.to(x_t.dtype)
