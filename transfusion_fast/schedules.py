"""Diffusion noise schedules, computed in float64 and cached.

``cosine`` is Nichol & Dhariwal (2021): ᾱ(t) = f(t)/f(0), f(t) = cos²(((t/T) + s)/(1 + s)·π/2), s = 0.008,
with β_t = 1 − ᾱ_t/ᾱ_{t−1} clipped at 0.999 (diffusers' ``squaredcos_cap_v2``). ``linear`` is
Ho et al. (2020): β from 1e-4 to 0.02.

A :class:`Schedule` accepts any betas in (0, 1], finite, at most :data:`MAX_DIFFUSION_STEPS` of them;
β = 1 only at the last step (a zero-terminal-SNR schedule, Lin et al. 2024: ᾱ_{T−1} = 0), so that ᾱ is
positive and strictly decreasing before it and a sampler step never divides 0 by 0.
"""
from __future__ import annotations

import functools
import math

import torch

from .checks import check_int, describe

__all__ = ["Schedule", "get_schedule", "SCHEDULES", "MAX_DIFFUSION_STEPS"]

SCHEDULES = ("cosine", "linear")
#: Largest number of train steps T of a schedule (and of ModelConfig.diffusion_steps): the tables
#: are built in O(T) Python, and a sampler's timesteps are drawn from them.
MAX_DIFFUSION_STEPS = 100_000


def _check_betas(betas) -> torch.Tensor:
    if not isinstance(betas, torch.Tensor) or betas.dtype != torch.float64 or betas.dim() != 1 \
            or betas.numel() < 1 or betas.device.type != "cpu":
        raise ValueError(f"betas must be a non-empty 1-D float64 CPU tensor, got {describe(betas)}")
    if betas.numel() > MAX_DIFFUSION_STEPS:
        raise ValueError(f"betas must have at most MAX_DIFFUSION_STEPS={MAX_DIFFUSION_STEPS} entries, got "
                         f"{betas.numel()}")
    bad = ~((betas > 0) & (betas <= 1))            # NaN fails both
    if bool(bad.any()):
        t = int(bad.nonzero()[0, 0])
        raise ValueError(f"betas must lie in (0, 1], got betas[{t}] = {float(betas[t])!r}")
    if betas.numel() > 1 and bool((betas[:-1] == 1).any()):
        t = int((betas[:-1] == 1).nonzero()[0, 0])
        raise ValueError(f"betas may be 1 only at the last step (zero terminal SNR): betas[{t}] = 1 would make "
                         f"alpha_bar 0 from step {t} on, for {betas.numel() - t} steps")
    return betas


class Schedule:
    """β_t, α_t and ᾱ_t for t = 0 … T−1, float64 on the CPU; ``.to(device, dtype)`` for kernels."""

    def __init__(self, name: str, betas: torch.Tensor):
        if not isinstance(name, str):
            raise ValueError(f"name must be a str, got {describe(name)}")
        betas = _check_betas(betas)
        self.name = name
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, 0)
        self.num_steps = betas.numel()
        self._cast: dict = {}

    def _cached(self, name: str, device, dtype, make) -> torch.Tensor:
        key = (name, torch.device(device), dtype)
        if key not in self._cast:
            self._cast[key] = make().to(device=device, dtype=dtype)
        return self._cast[key]

    def alphas_cumprod_on(self, device, dtype=torch.float32) -> torch.Tensor:
        """ᾱ_t, t = 0 … T−1, on ``device`` in ``dtype`` (cached)."""
        return self._cached("alphas_cumprod", device, dtype, lambda: self.alphas_cumprod)

    def sqrt_alphas_cumprod_on(self, device, dtype=torch.float64) -> torch.Tensor:
        """sqrt(ᾱ_t), the x0 coefficient of q_sample, computed in float64 (cached)."""
        return self._cached("sqrt_alphas_cumprod", device, dtype, lambda: self.alphas_cumprod.sqrt())

    def sqrt_one_minus_alphas_cumprod_on(self, device, dtype=torch.float64) -> torch.Tensor:
        """sqrt(1 − ᾱ_t), the noise coefficient of q_sample, computed in float64 (cached)."""
        return self._cached("sqrt_one_minus_alphas_cumprod", device, dtype,
                            lambda: (1.0 - self.alphas_cumprod).sqrt())

    def __repr__(self) -> str:
        return f"Schedule({self.name!r}, num_steps={self.num_steps})"


def _cosine_betas(num_steps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    f = lambda t: math.cos((t / num_steps + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    betas = [min(1 - f(i + 1) / f(i), max_beta) for i in range(num_steps)]
    return torch.tensor(betas, dtype=torch.float64)


def _linear_betas(num_steps: int, start: float = 1e-4, end: float = 0.02) -> torch.Tensor:
    return torch.linspace(start, end, num_steps, dtype=torch.float64)


def get_schedule(name: str = "cosine", num_steps: int = 1000) -> Schedule:
    """The cached schedule ``name`` (``"cosine"`` or ``"linear"``) with ``num_steps`` train steps,
    ``num_steps`` in ``[1, MAX_DIFFUSION_STEPS]``."""
    if not isinstance(name, str) or name not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {describe(name)}")
    # Checked before the cache: True == 1 and 1.0 == 1 would otherwise hit the entry of 1.
    return _cached_schedule(name, check_int("num_steps", num_steps, 1, MAX_DIFFUSION_STEPS))


@functools.lru_cache(maxsize=None)
def _cached_schedule(name: str, num_steps: int) -> Schedule:
    betas = _cosine_betas(num_steps) if name == "cosine" else _linear_betas(num_steps)
    return Schedule(name, betas)
