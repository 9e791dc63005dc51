"""Sampler steps for generation: DDPM (ancestral) and DDIM, and the rectified-flow ODE steps Euler and
Heun, one fused op each, on packed rows.

Each step reads ``x_t``, the model output (and, for classifier-free guidance, the unconditional
output: ``out = uncond + cfg_scale·(cond − uncond)``), converts the prediction (``"eps"``, ``"x0"``
or ``"v"``) and writes ``x_{t_prev}`` in one pass; a stochastic step also generates its noise from
Philox keyed by ``(seed, element index)`` exactly as :func:`transfusion_fast.ops.add_noise` does.
Every row has its own ``t`` and ``t_prev`` (int tensors, one entry per row); ``t_prev = -1`` is the
final step to x0 (ᾱ = 1).

The formulas are diffusers' (``DDPMScheduler`` with ``variance_type="fixed_small"``,
``DDIMScheduler`` with ``set_alpha_to_one=True``, both without sample clipping or thresholding):
the tests check them against diffusers step by step.

Timesteps: :func:`inference_timesteps` uses the ``"trailing"`` spacing of diffusers (Lin et al. 2024,
"Common diffusion noise schedules and sample steps are flawed"): the first step starts from the
last train step T−1, the pure-noise end, rather than ``"leading"``'s T−T/n.

Flow steps (:func:`euler_step`, :func:`heun_step`; see :mod:`transfusion_fast.ops.flow` for the
convention ``x_t = (1 − t)·x0 + t·ε``, ``v = ε − x0``): every row has its own continuous ``t`` and
``t_next`` (float tensors, one entry per row, ``0 <= t_next < t <= 1``), the model output is the
velocity, guided as above. Heun is a predictor/corrector pair of calls::

    v = model(x, t)                                    # (cond and uncond for CFG)
    x_pred = euler_step(x, v, t, t_next, ...)          # predictor: x + h·v
    v_pred = model(x_pred, t_next)
    x_next = heun_step(x, x_pred, v_pred, t, t_next, ...)   # x + h/2·(v + v_pred)

The corrector writes ``x/2 + x_pred/2 + h/2·v_pred``, equal to ``x + h/2·(v + v_pred)`` because
``x_pred − x = h·v``: the caller keeps ``x_pred`` (which it has anyway) and no guided velocity, and each
call is one pass over its inputs with the same CFG arguments as every other step.

Backends: ``reference`` runs the PyTorch twins (float64 arithmetic for DDPM / DDIM; for the flow steps
the kernel's own arithmetic in float32 (float64 for float64 data), operation by operation, so that
they give the same bits); ``auto`` and ``triton`` run the compiled kernels of csrc/sampler.cpp / csrc/sampler_cuda.cu on the tensor's device. There is no
Triton version of these ops. Sampling is inference: the ops have no autograd.
"""
from __future__ import annotations

from fractions import Fraction

import torch

from .. import _ext
from .. import backend as _backend
from ..schedules import MAX_DIFFUSION_STEPS, Schedule
from .flow import check_flow_times
from .noise import philox_normal_reference, predicted_eps, predicted_x0
from ..checks import check_float, check_int
from .validation import (PREDICTIONS, check_like, check_prediction, check_rows, check_schedule, check_seed,
                         check_timesteps, check_zero_snr, resolve_seed)

__all__ = ["ddpm_step", "ddim_step", "ddpm_step_reference", "ddim_step_reference", "inference_timesteps",
           "check_step_inputs", "euler_step", "heun_step", "euler_step_reference", "heun_step_reference",
           "check_flow_step_inputs"]

# csrc/philox.h: enum Prediction numbers the prediction types in the order of PREDICTIONS.
_PREDICTION_CODES = {name: code for code, name in enumerate(PREDICTIONS)}


def inference_timesteps(num_train_steps: int = 1000, num_inference_steps: int = 250) -> torch.Tensor:
    """The descending int64 timesteps of a strided sampler, diffusers' ``"trailing"`` spacing:
    ``round(T − k·T/n) − 1`` for ``k = 0 … n−1`` (ties to even, as numpy), e.g. 999, 995, …, 3 for
    1000 → 250. Step ``k`` goes from ``timesteps[k]`` to ``timesteps[k+1]``, the last one to -1 (x0).
    Both counts are ints in ``[1, MAX_DIFFUSION_STEPS]``."""
    check_int("num_train_steps", num_train_steps, 1, MAX_DIFFUSION_STEPS)
    check_int("num_inference_steps", num_inference_steps, 1, MAX_DIFFUSION_STEPS)
    if num_inference_steps > num_train_steps:
        raise ValueError(f"num_inference_steps must be <= num_train_steps={num_train_steps}, got "
                         f"{num_inference_steps}")
    values = [round(Fraction(num_train_steps * (num_inference_steps - k), num_inference_steps)) - 1
              for k in range(num_inference_steps)]
    return torch.tensor(values, dtype=torch.int64)


def check_step_inputs(x_t, model_out, t, t_prev, schedule, prediction, uncond_out, cfg_scale, seed, noise,
                      eta: float = 0.0) -> None:
    check_rows("x_t", x_t)
    check_like("model_out", model_out, x_t, "x_t")
    check_schedule(schedule)
    check_timesteps("t", t, x_t.shape[0], x_t.device, schedule)
    check_timesteps("t_prev", t_prev, x_t.shape[0], x_t.device, schedule, allow_final=True)
    if t.numel() and bool((t_prev >= t).any()):
        row = int((t_prev >= t).nonzero()[0, 0])
        raise ValueError(f"t_prev must be < t in every row (a step goes back in time), got t={int(t[row])} "
                         f"t_prev={int(t_prev[row])} in row {row}")
    check_prediction(prediction)
    check_zero_snr("t", t, schedule, prediction)
    if uncond_out is not None:
        check_like("uncond_out", uncond_out, x_t, "x_t")
    cfg_scale = check_float("cfg_scale", cfg_scale)
    if uncond_out is None and cfg_scale != 1.0:
        raise ValueError(f"cfg_scale={cfg_scale} needs uncond_out (the unconditional model output)")
    check_float("eta", eta, 0.0)
    if noise is not None:
        check_like("noise", noise, x_t, "x_t")
        if seed is not None:
            raise ValueError("give noise or seed, not both")
    check_seed(seed)


def _guided(model_out, uncond_out, cfg_scale):
    return model_out if uncond_out is None else uncond_out + cfg_scale * (model_out - uncond_out)


def _alpha_bars(schedule: Schedule, t: torch.Tensor, t_prev: torch.Tensor, like: torch.Tensor):
    """(ᾱ_t, ᾱ_{t_prev}) per row in float64, shaped to broadcast over ``like``; ᾱ_{-1} = 1."""
    table = schedule.alphas_cumprod_on(like.device, torch.float64)
    shape = (-1, *([1] * (like.dim() - 1)))
    ab_t = table[t.long()]
    ab_prev = torch.where(t_prev >= 0, table[t_prev.long().clamp(min=0)], torch.ones_like(ab_t))
    return ab_t.reshape(shape), ab_prev.reshape(shape)


def _reference_noise(noise, seed, like):
    if noise is not None:
        return noise.double()
    if seed is None:
        return torch.zeros_like(like, dtype=torch.float64)
    return philox_normal_reference(seed, like.numel(), like.device).to(like.dtype).double().reshape(like.shape)


def ddpm_step_reference(x_t, model_out, t, t_prev, schedule, *, prediction="eps", uncond_out=None,
                        cfg_scale=1.0, seed=None, noise=None) -> torch.Tensor:
    """DDPM posterior step in float64: mean = c0·x̂0 + ct·x_t, plus σ·z for t > 0 with the
    "fixed_small" σ² = (1−ᾱ_prev)/(1−ᾱ_t)·β_t (clamped at 1e-20, as diffusers)."""
    x = x_t.double()
    m = _guided(model_out.double(), None if uncond_out is None else uncond_out.double(), cfg_scale)
    x0 = predicted_x0(x, m, t, schedule, prediction)
    ab_t, ab_prev = _alpha_bars(schedule, t, t_prev, x)
    beta_t = 1 - ab_t / ab_prev
    mean = (ab_prev.sqrt() * beta_t / (1 - ab_t)) * x0 + ((ab_t / ab_prev).sqrt() * (1 - ab_prev) / (1 - ab_t)) * x
    variance = ((1 - ab_prev) / (1 - ab_t) * beta_t).clamp(min=1e-20)
    sigma = torch.where((t > 0).reshape(ab_t.shape), variance.sqrt(), torch.zeros_like(variance))
    return (mean + sigma * _reference_noise(noise, seed, x_t)).to(x_t.dtype)


def ddim_step_reference(x_t, model_out, t, t_prev, schedule, *, prediction="eps", eta=0.0, uncond_out=None,
                        cfg_scale=1.0, seed=None, noise=None) -> torch.Tensor:
    """DDIM step in float64: sqrt(ᾱ_prev)·x̂0 + sqrt(1−ᾱ_prev−σ²)·ε̂ + σ·z with
    σ = η·sqrt((1−ᾱ_prev)/(1−ᾱ_t)·(1−ᾱ_t/ᾱ_prev))."""
    x = x_t.double()
    m = _guided(model_out.double(), None if uncond_out is None else uncond_out.double(), cfg_scale)
    x0 = predicted_x0(x, m, t, schedule, prediction)
    eps = predicted_eps(x, m, t, schedule, prediction)
    ab_t, ab_prev = _alpha_bars(schedule, t, t_prev, x)
    sigma = eta * ((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)).sqrt()
    direction = (1 - ab_prev - sigma ** 2).clamp(min=0).sqrt()
    out = ab_prev.sqrt() * x0 + direction * eps
    if eta > 0:
        out = out + sigma * _reference_noise(noise, seed, x_t)
    return out.to(x_t.dtype)


def _fake_ddpm_step(x_t, model_out, uncond_out, t, t_prev, alphas_cumprod, prediction, cfg_scale, noise, seed):
    return torch.empty_like(x_t, memory_format=torch.contiguous_format)


def _fake_ddim_step(x_t, model_out, uncond_out, t, t_prev, alphas_cumprod, prediction, eta, cfg_scale, noise,
                    seed):
    return torch.empty_like(x_t, memory_format=torch.contiguous_format)


def _fake_euler_step(x_t, model_out, uncond_out, t, t_next, cfg_scale):
    return torch.empty_like(x_t, memory_format=torch.contiguous_format)


def _fake_heun_step(x_t, x_pred, model_out, uncond_out, t, t_next, cfg_scale):
    return torch.empty_like(x_t, memory_format=torch.contiguous_format)


def _attach_python_kernels():
    """Fake (meta) kernels of the compiled sampler ops (run once; the steps have no gradient)."""
    torch.library.register_fake("transfusion_fast::ddpm_step", _fake_ddpm_step)
    torch.library.register_fake("transfusion_fast::ddim_step", _fake_ddim_step)
    torch.library.register_fake("transfusion_fast::euler_step", _fake_euler_step)
    torch.library.register_fake("transfusion_fast::heun_step", _fake_heun_step)


def _compiled():
    return _ext.ops(_attach_python_kernels)


def ddpm_step(x_t: torch.Tensor, model_out: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor,
              schedule: Schedule, *, prediction: str = "eps", uncond_out: torch.Tensor | None = None,
              cfg_scale: float = 1.0, seed: int | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """One DDPM ancestral step per row from ``t`` to ``t_prev`` (``-1``: to x0); returns ``x_prev``.

    ``model_out`` is the model's prediction (``prediction``: ``"eps"``, ``"x0"`` or ``"v"``); with
    ``uncond_out`` it is guided first: ``uncond + cfg_scale·(model_out − uncond)``. The step noise is
    ``noise`` if given, else Philox noise of ``seed`` (``None``: drawn from torch's generator); use a
    different seed for every step.
    """
    check_step_inputs(x_t, model_out, t, t_prev, schedule, prediction, uncond_out, cfg_scale, seed, noise)
    if noise is None:
        seed = resolve_seed(seed)
    if _backend.get_backend() == "reference":
        return ddpm_step_reference(x_t, model_out, t, t_prev, schedule, prediction=prediction,
                                   uncond_out=uncond_out, cfg_scale=cfg_scale, seed=seed, noise=noise)
    table = schedule.alphas_cumprod_on(x_t.device, torch.float64)
    return _compiled().ddpm_step(x_t, model_out, uncond_out, t, t_prev, table, _PREDICTION_CODES[prediction],
                                 float(cfg_scale), noise, seed)


def ddim_step(x_t: torch.Tensor, model_out: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor,
              schedule: Schedule, *, prediction: str = "eps", eta: float = 0.0,
              uncond_out: torch.Tensor | None = None, cfg_scale: float = 1.0, seed: int | None = None,
              noise: torch.Tensor | None = None) -> torch.Tensor:
    """One DDIM step per row from ``t`` to ``t_prev`` (``-1``: to x0); returns ``x_prev``.

    ``eta = 0`` is deterministic (no noise drawn); ``eta > 0`` adds ``σ·z`` with ``z`` = ``noise`` or
    Philox noise of ``seed``. Guidance and prediction types as in :func:`ddpm_step`.
    """
    check_step_inputs(x_t, model_out, t, t_prev, schedule, prediction, uncond_out, cfg_scale, seed, noise, eta)
    if eta == 0:
        seed, noise = None, None
    elif noise is None:
        seed = resolve_seed(seed)
    if _backend.get_backend() == "reference":
        return ddim_step_reference(x_t, model_out, t, t_prev, schedule, prediction=prediction, eta=eta,
                                   uncond_out=uncond_out, cfg_scale=cfg_scale, seed=seed, noise=noise)
    table = schedule.alphas_cumprod_on(x_t.device, torch.float64)
    return _compiled().ddim_step(x_t, model_out, uncond_out, t, t_prev, table, _PREDICTION_CODES[prediction],
                                 float(eta), float(cfg_scale), noise, seed)


# ----------------------------------------------------------------------------- flow steps
def check_flow_step_inputs(x_t, model_out, t, t_next, uncond_out, cfg_scale, x_pred=None) -> None:
    check_rows("x_t", x_t)
    if x_pred is not None:
        check_like("x_pred", x_pred, x_t, "x_t")
    check_like("model_out", model_out, x_t, "x_t")
    check_flow_times("t", t, x_t.shape[0], x_t.device)
    check_flow_times("t_next", t_next, x_t.shape[0], x_t.device)
    if t.numel() and bool((t_next >= t).any()):
        row = int((t_next >= t).nonzero()[0, 0])
        raise ValueError(f"t_next must be < t in every row (a step goes toward the data, t = 0), got "
                         f"t={float(t[row])!r} t_next={float(t_next[row])!r} in row {row}")
    if uncond_out is not None:
        check_like("uncond_out", uncond_out, x_t, "x_t")
    cfg_scale = check_float("cfg_scale", cfg_scale)
    if uncond_out is None and cfg_scale != 1.0:
        raise ValueError(f"cfg_scale={cfg_scale} needs uncond_out (the unconditional model output)")


def _flow_step_reference(x_t, x_pred, model_out, t, t_next, uncond_out, cfg_scale):
    """The compiled kernel's arithmetic, one rounded operation at a time: out = cx·x + cm·m (+ cz·x_pred)
    with m = u + s·(c − u) in float32 (float64 for float64 data) and the per-row coefficients of
    csrc/philox.h (flow_coefficients) computed in float64 and rounded once."""
    compute = torch.float64 if x_t.dtype == torch.float64 else torch.float32
    shape = (-1, *([1] * (x_t.dim() - 1)))
    h = t_next.double() - t.double()
    m = model_out.to(compute)
    if uncond_out is not None:
        u = uncond_out.to(compute)
        m = u + float(cfg_scale) * (m - u)
    if x_pred is None:
        out = x_t.to(compute) + h.to(compute).reshape(shape) * m
    else:
        out = 0.5 * x_t.to(compute) + (0.5 * h).to(compute).reshape(shape) * m + 0.5 * x_pred.to(compute)
    return out.to(x_t.dtype)


def euler_step_reference(x_t, model_out, t, t_next, *, uncond_out=None, cfg_scale=1.0) -> torch.Tensor:
    """Euler step ``x + (t_next − t)·v`` with ``v`` the (guided) velocity, in plain PyTorch."""
    return _flow_step_reference(x_t, None, model_out, t, t_next, uncond_out, cfg_scale)


def heun_step_reference(x_t, x_pred, model_out, t, t_next, *, uncond_out=None, cfg_scale=1.0) -> torch.Tensor:
    """Heun corrector ``x/2 + x_pred/2 + (t_next − t)/2·v(x_pred)`` in plain PyTorch."""
    return _flow_step_reference(x_t, x_pred, model_out, t, t_next, uncond_out, cfg_scale)


def euler_step(x_t: torch.Tensor, model_out: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, *,
               uncond_out: torch.Tensor | None = None, cfg_scale: float = 1.0) -> torch.Tensor:
    """One Euler step of the flow ODE per row from ``t`` to ``t_next``: ``x_t + (t_next − t)·v``.

    ``x_t``: ``(N, ...)`` floating rows; ``model_out``: the velocity prediction at ``(x_t, t)``, same
    shape and dtype; with ``uncond_out`` it is guided first: ``uncond + cfg_scale·(model_out −
    uncond)``. ``t``, ``t_next``: float32/float64 ``(N,)`` with ``0 <= t_next < t <= 1``. Also Heun's
    predictor. Returns a contiguous tensor like ``x_t``; no gradient (inference).
    """
    check_flow_step_inputs(x_t, model_out, t, t_next, uncond_out, cfg_scale)
    if _backend.get_backend() == "reference":
        return euler_step_reference(x_t, model_out, t, t_next, uncond_out=uncond_out, cfg_scale=cfg_scale)
    return _compiled().euler_step(x_t, model_out, uncond_out, t, t_next, float(cfg_scale))


def heun_step(x_t: torch.Tensor, x_pred: torch.Tensor, model_out: torch.Tensor, t: torch.Tensor,
              t_next: torch.Tensor, *, uncond_out: torch.Tensor | None = None,
              cfg_scale: float = 1.0) -> torch.Tensor:
    """Heun's corrector per row: ``x_t/2 + x_pred/2 + (t_next − t)/2·v``, second order in the step.

    ``x_pred``: the predictor :func:`euler_step` ``(x_t, v(x_t, t), t, t_next)``; ``model_out``: the
    velocity prediction at ``(x_pred, t_next)`` (guided with ``uncond_out`` / ``cfg_scale`` as in
    :func:`euler_step`). The result equals ``x_t + (t_next − t)/2·(v(x_t, t) + v(x_pred, t_next))``.
    Shapes, dtypes and times as in :func:`euler_step`.
    """
    check_flow_step_inputs(x_t, model_out, t, t_next, uncond_out, cfg_scale, x_pred=x_pred)
    if _backend.get_backend() == "reference":
        return heun_step_reference(x_t, x_pred, model_out, t, t_next, uncond_out=uncond_out, cfg_scale=cfg_scale)
    return _compiled().heun_step(x_t, x_pred, model_out, uncond_out, t, t_next, float(cfg_scale))
