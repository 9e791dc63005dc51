"""Diffusion noise schedules, computed in float64 and cached.

``cosine`` is Nichol & Dhariwal (2021): ᾱ(t) = f(t)/f(0), f(t) = cos²(((t/T) + s)/(1 + s)·π/2), s = 0.008,
with β_t = 1 − ᾱ_t/ᾱ_{t−1} clipped at 0.999 (diffusers' ``squaredcos_cap_v2``). ``linear`` is
Ho et al. (2020): β from 1e-4 to 0.02.
"""
from __future__ import annotations

import functools
import math

import torch

__all__ = ["Schedule", "get_schedule", "SCHEDULES"]

SCHEDULES = ("cosine", "linear")


class Schedule:
    """β_t, α_t and ᾱ_t for t = 0 … T−1, float64 on the CPU; ``.to(device, dtype)`` for kernels."""

    def __init__(self, name: str, betas: torch.Tensor):
        if not (betas.dtype == torch.float64 and betas.dim() == 1 and betas.numel() >= 1):
            raise ValueError(f"betas must be a non-empty float64 vector, got {betas.dtype} {tuple(betas.shape)}")
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


@functools.lru_cache(maxsize=None)
def get_schedule(name: str = "cosine", num_steps: int = 1000) -> Schedule:
    """The cached schedule ``name`` (``"cosine"`` or ``"linear"``) with ``num_steps`` train steps."""
    if name not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {name!r}")
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    betas = _cosine_betas(num_steps) if name == "cosine" else _linear_betas(num_steps)
    return Schedule(name, betas)
