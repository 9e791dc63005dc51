"""Rectified flow (flow matching): the interpolation, the velocity target, the training timesteps,
the timestep shift and the inference time grid, on packed rows.

Convention (Stable Diffusion 3, diffusers' ``FlowMatchEulerDiscreteScheduler``): time is continuous,
``t = 0`` is the data and ``t = 1`` the noise::

    x_t = (1 − t)·x0 + t·ε,        v = dx_t/dt = ε − x0 (the regression target).

Sampling integrates ``dx/dt = v(x, t)`` from ``t = 1`` (pure noise) down to ``t = 0`` with the
:func:`~transfusion_fast.ops.euler_step` / :func:`~transfusion_fast.ops.heun_step` ops on the grid
of :func:`flow_inference_timesteps`.

* :func:`flow_interpolate` — ``x_t`` for one ``t`` per row, fused with Philox noise generation: it
  runs the q_sample kernels of :func:`~transfusion_fast.ops.add_noise` with per-row coefficient
  tables ``(1 − t, t)`` instead of the schedule's ``(sqrt(ᾱ), sqrt(1 − ᾱ))``, so the noise of a seed is
  the same bits as ``add_noise``'s, on CPU and CUDA, and gradients flow to ``x0`` (and a given noise).
* :func:`flow_target` — ``ε − x0``.
* :func:`sample_flow_timesteps` — training times: uniform on [0, 1) or logit-normal
  (``sigmoid(N(mean, std²))``, SD3's default ``mean = 0, std = 1``), then shifted.
* :func:`shift_timesteps` — SD3's resolution shift ``t' = s·t / (1 + (s − 1)·t)``: ``s > 1`` moves
  time toward the noise end (more steps at high noise), ``s = 1`` is the identity.
* :func:`flow_inference_timesteps` — ``num_steps + 1`` times from 1 to 0 (uniform, then shifted).

Backends: ``reference`` runs :func:`flow_interpolate_reference` and the Philox twin; ``auto`` and
``triton`` run the compiled q_sample kernels. The other functions are plain PyTorch on every backend
(elementwise on ``(N,)`` vectors or one subtraction: nothing to fuse).
"""
from __future__ import annotations

import math

import torch

from .. import backend as _backend
from ..checks import check_float, check_int, describe
# The q_sample ops with their autograd formulas attached (noise.py registers them on first use).
from .noise import noise_ops, philox_normal_reference
from .validation import check_like, check_rows, check_seed, resolve_seed

__all__ = ["flow_interpolate", "flow_interpolate_reference", "flow_target", "sample_flow_timesteps",
           "shift_timesteps", "flow_inference_timesteps", "check_flow_times", "check_shift",
           "FLOW_TIME_DISTRIBUTIONS", "MAX_FLOW_STEPS", "MAX_TIMESTEP_SAMPLES"]

#: Distributions of the training times.
FLOW_TIME_DISTRIBUTIONS = ("uniform", "logit_normal")
#: Largest ``num_steps`` of :func:`flow_inference_timesteps` (a bound against typos such as 10**9).
MAX_FLOW_STEPS = 100_000
#: Largest ``n`` of :func:`sample_flow_timesteps`.
MAX_TIMESTEP_SAMPLES = 2 ** 31 - 1


def check_shift(shift) -> float:
    return check_float("shift", shift, 0.0, low_open=True)


def check_flow_times(name: str, t, rows: int, device) -> None:
    """``t``: a float32/float64 tensor of shape ``(rows,)`` on ``device`` with finite values in [0, 1]."""
    if not isinstance(t, torch.Tensor) or t.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{name} must be a float32/float64 tensor of flow times in [0, 1], got {describe(t)}")
    if t.shape != (rows,):
        raise ValueError(f"{name} must have one entry per row, shape ({rows},), got {tuple(t.shape)}")
    if t.device != torch.device(device):
        raise ValueError(f"{name} is on {t.device} but the data is on {device}")
    if t.numel():
        bad = ~((t >= 0) & (t <= 1))                # NaN fails both comparisons
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise ValueError(f"{name} must lie in [0, 1] (finite), got {float(t[row])!r} in row {row}")


def shift_timesteps(t, shift: float = 1.0):
    """SD3's timestep shift ``s·t / (1 + (s − 1)·t)`` of a float or a float tensor of times in [0, 1]
    (computed in the tensor's dtype; a float stays a float). Maps 0 → 0 and 1 → 1, monotone."""
    s = check_shift(shift)
    if isinstance(t, torch.Tensor):
        if not t.is_floating_point():
            raise ValueError(f"t must be a float tensor of times in [0, 1], got {describe(t)}")
        if t.numel() and not bool(((t >= 0) & (t <= 1)).all()):
            raise ValueError(f"t must lie in [0, 1] (finite), got values from {float(t.min())} to {float(t.max())}")
    else:
        t = check_float("t", t, 0.0, 1.0)
    if s == 1.0:
        return t
    return s * t / (1 + (s - 1) * t)


def sample_flow_timesteps(n: int, *, distribution: str = "uniform", mean: float = 0.0, std: float = 1.0,
                          shift: float = 1.0, generator: torch.Generator | None = None,
                          device=None) -> torch.Tensor:
    """``n`` training times in [0, 1] as a float32 ``(n,)`` tensor: ``"uniform"`` on [0, 1), or
    ``"logit_normal"``: ``sigmoid(mean + std·z)``, ``z ~ N(0, 1)`` (``mean`` / ``std`` apply to it only);
    then :func:`shift_timesteps` with ``shift``. Drawn on the CPU from ``generator`` (torch's default
    one when ``None``), so a seeded generator gives the same times on every device, then moved to
    ``device``."""
    n = check_int("n", n, 0, MAX_TIMESTEP_SAMPLES)
    if distribution not in FLOW_TIME_DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {FLOW_TIME_DISTRIBUTIONS}, got {distribution!r}")
    mean = check_float("mean", mean)
    std = check_float("std", std, 0.0, low_open=True)
    shift = check_shift(shift)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {describe(generator)}")
    if distribution == "uniform":
        t = torch.rand(n, generator=generator, dtype=torch.float64)
    else:
        t = torch.sigmoid(mean + std * torch.randn(n, generator=generator, dtype=torch.float64))
    t = shift_timesteps(t, shift).to(torch.float32)
    return t if device is None else t.to(device)


def flow_inference_timesteps(num_steps: int, shift: float = 1.0) -> torch.Tensor:
    """The float64 time grid of a flow sampler: ``num_steps + 1`` values from 1 down to 0, uniform in
    ``t`` then shifted (:func:`shift_timesteps`). Step ``k`` integrates from ``grid[k]`` to
    ``grid[k + 1]``; the last one lands on ``t = 0`` (the data)."""
    num_steps = check_int("num_steps", num_steps, 1, MAX_FLOW_STEPS)
    grid = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    grid[0], grid[-1] = 1.0, 0.0                     # exact ends whatever linspace rounds
    return shift_timesteps(grid, shift)


def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity ``noise − x0`` that the flow model regresses (in ``x0``'s dtype; differentiable)."""
    check_rows("x0", x0)
    check_like("noise", noise, x0, "x0")
    return noise - x0


def _check_interpolate_inputs(x0, t, noise, seed) -> None:
    check_rows("x0", x0)
    check_flow_times("t", t, x0.shape[0], x0.device)
    if noise is not None:
        check_like("noise", noise, x0, "x0")
        if seed is not None:
            raise ValueError("give noise or seed, not both: with noise given there is nothing to generate")
    check_seed(seed)


def _row_tables(t: torch.Tensor):
    """The per-row coefficient tables ``(1 − t, t)`` in float64 and the row index that reads them."""
    t64 = t.double()
    return 1 - t64, t64, torch.arange(t.shape[0], device=t.device)


def flow_interpolate_reference(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``(1 − t)·x0 + t·noise`` per row in plain PyTorch: float32 arithmetic (float64 for float64
    inputs), the coefficients computed in float64 and rounded once (the compiled kernel's bits)."""
    compute = torch.float64 if x0.dtype == torch.float64 else torch.float32
    shape = (-1, *([1] * (x0.dim() - 1)))
    t64 = t.double()
    a, b = (1 - t64).to(compute).reshape(shape), t64.to(compute).reshape(shape)
    return (a * x0.to(compute) + b * noise.to(compute)).to(x0.dtype)


def flow_interpolate(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None,
                     seed: int | None = None):
    """Interpolate every row of ``x0`` toward noise at its own time; returns ``(x_t, noise)``.

    ``x0``: ``(N, ...)`` floating rows; ``t``: float32/float64 ``(N,)`` in [0, 1] (0 = data, 1 = noise).
    Without ``noise`` the noise is generated from ``seed`` (an int in ``[0, 2**63)``; ``None`` draws
    one from torch's default generator) by the Philox recipe of :func:`~transfusion_fast.ops.add_noise`
    (same seed, same noise). Gradients flow to ``x0`` (and to a given ``noise``), not to ``t``. Both
    outputs are contiguous, in ``x0``'s dtype.
    """
    _check_interpolate_inputs(x0, t, noise, seed)
    if noise is None:
        seed = resolve_seed(seed)
    if _backend.get_backend() == "reference":
        if noise is None:
            noise = philox_normal_reference(seed, x0.numel(), x0.device).to(x0.dtype).reshape(x0.shape)
        return flow_interpolate_reference(x0, t, noise), noise
    a, b, rows = _row_tables(t)
    ops = noise_ops()
    if noise is None:
        x_t, noise = ops.q_sample_philox(x0, rows, a, b, seed)
        return x_t, noise.detach()       # generated: no graph, as on the reference path
    return ops.q_sample(x0, rows, a, b, noise), noise
