"""Forward diffusion (q_sample) on packed rows: x_t = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·ε."""
from __future__ import annotations

import torch

from ..schedules import Schedule

__all__ = ["add_noise", "add_noise_reference", "check_add_noise_inputs"]


def check_add_noise_inputs(x0: torch.Tensor, timesteps: torch.Tensor, schedule: Schedule,
                           noise: torch.Tensor | None) -> None:
    if not isinstance(x0, torch.Tensor) or not x0.is_floating_point() or x0.dim() < 1:
        raise ValueError(f"x0 must be a floating-point tensor with a leading row dimension, got "
                         f"{(x0.dtype, tuple(x0.shape)) if isinstance(x0, torch.Tensor) else type(x0).__name__}")
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a transfusion_fast.schedules.Schedule, got {type(schedule).__name__}")
    if not isinstance(timesteps, torch.Tensor) or timesteps.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"timesteps must be an int32/int64 tensor, got "
                         f"{timesteps.dtype if isinstance(timesteps, torch.Tensor) else type(timesteps).__name__}")
    if timesteps.shape != (x0.shape[0],):
        raise ValueError(f"timesteps must have one entry per row of x0, shape ({x0.shape[0]},), got "
                         f"{tuple(timesteps.shape)}")
    if timesteps.device != x0.device:
        raise ValueError(f"timesteps is on {timesteps.device} but x0 is on {x0.device}")
    if timesteps.numel() and (int(timesteps.min()) < 0 or int(timesteps.max()) >= schedule.num_steps):
        raise ValueError(f"timesteps must lie in [0, {schedule.num_steps}), got values from "
                         f"{int(timesteps.min())} to {int(timesteps.max())}")
    if noise is not None and (not isinstance(noise, torch.Tensor) or noise.shape != x0.shape
                              or noise.dtype != x0.dtype or noise.device != x0.device):
        raise ValueError(f"noise must match x0 (shape {tuple(x0.shape)}, {x0.dtype}, {x0.device}), got "
                         f"{(tuple(noise.shape), noise.dtype, noise.device) if isinstance(noise, torch.Tensor) else type(noise).__name__}")


def add_noise_reference(x0: torch.Tensor, timesteps: torch.Tensor, schedule: Schedule,
                        noise: torch.Tensor) -> torch.Tensor:
    ab = schedule.alphas_cumprod_on(x0.device, torch.float32)[timesteps.long()]
    ab = ab.reshape(-1, *([1] * (x0.dim() - 1)))
    return (ab.sqrt() * x0.float() + (1 - ab).sqrt() * noise.float()).to(x0.dtype)


def add_noise(x0: torch.Tensor, timesteps: torch.Tensor, schedule: Schedule,
              noise: torch.Tensor | None = None, generator: torch.Generator | None = None):
    """Noise every row of ``x0`` at its own timestep; returns ``(x_t, noise)``."""
    check_add_noise_inputs(x0, timesteps, schedule, noise)
    if noise is None:
        noise = torch.randn(x0.shape, dtype=x0.dtype, device=x0.device, generator=generator)
    return add_noise_reference(x0, timesteps, schedule, noise), noise
