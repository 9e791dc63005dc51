"""The argument checks shared by the diffusion ops (noise, sampler steps), and their constants.

Each check raises a ``ValueError`` (``TypeError`` for a wrong kind of object) naming the argument,
what it must be and what it got, before any kernel runs.
"""
from __future__ import annotations

import torch

from ..checks import MAX_SEED, describe
from ..schedules import Schedule

__all__ = ["PREDICTIONS", "MAX_SEED", "describe", "check_prediction", "check_timesteps", "check_schedule",
           "check_like", "check_rows", "check_seed", "resolve_seed", "check_zero_snr"]

#: Prediction types of a diffusion model's output (the index is the code the compiled kernels take).
PREDICTIONS = ("eps", "x0", "v")


def check_prediction(prediction) -> None:
    if not isinstance(prediction, str) or prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


def check_zero_snr(name: str, timesteps: torch.Tensor, schedule: Schedule, prediction: str) -> None:
    """An ε prediction says nothing about x0 where ᾱ_t = 0 (a zero-terminal-SNR schedule's last step:
    x0 = (x_t − ε)/0); refuse it there instead of returning NaN / inf."""
    if prediction == "eps" and float(schedule.alphas_cumprod[-1]) == 0.0 and timesteps.numel() \
            and bool((timesteps == schedule.num_steps - 1).any()):
        raise ValueError(f"{name} holds step {schedule.num_steps - 1}, where the schedule's alpha_bar is 0 (zero "
                         f"terminal SNR): prediction='eps' cannot give x0 there; use prediction 'v' or 'x0'")


def check_timesteps(name: str, timesteps, rows: int, device, schedule: Schedule, allow_final: bool = False) -> None:
    """``timesteps``: an int32/int64 tensor of shape ``(rows,)`` on ``device`` with values in
    ``[0, T)`` (or ``[-1, T)`` with ``allow_final``: -1 is the final step to x0)."""
    if not isinstance(timesteps, torch.Tensor) or timesteps.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be an int32/int64 tensor, got {describe(timesteps)}")
    if timesteps.shape != (rows,):
        raise ValueError(f"{name} must have one entry per row, shape ({rows},), got {tuple(timesteps.shape)}")
    if timesteps.device != torch.device(device):
        raise ValueError(f"{name} is on {timesteps.device} but the data is on {device}")
    low = -1 if allow_final else 0
    # Inside a torch.compile graph the range scan would be a graph break and a device sync per
    # call; the values were checked where they were made (pack, the samplers' schedules).
    if timesteps.numel() and not torch.compiler.is_compiling():
        lo, hi = int(timesteps.min()), int(timesteps.max())
        if lo < low or hi >= schedule.num_steps:
            raise ValueError(f"{name} must lie in [{low}, {schedule.num_steps}), got values from {lo} to {hi}")


def check_schedule(schedule) -> None:
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a transfusion_fast.schedules.Schedule, got {type(schedule).__name__}")


def check_like(name: str, tensor, like: torch.Tensor, like_name: str) -> None:
    """``tensor`` must match ``like`` in shape, dtype and device."""
    if (not isinstance(tensor, torch.Tensor) or tensor.shape != like.shape or tensor.dtype != like.dtype
            or tensor.device != like.device):
        raise ValueError(f"{name} must match {like_name} ({like.dtype}, shape {tuple(like.shape)}, on "
                         f"{like.device}), got {describe(tensor)}")


def check_rows(name: str, x) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise ValueError(f"{name} must be a floating-point tensor with a leading row dimension, got {describe(x)}")


def check_seed(seed) -> None:
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < MAX_SEED):
        raise ValueError(f"seed must be None or an int in [0, 2**63), got {describe(seed)}")


def resolve_seed(seed: int | None) -> int:
    """``seed``, or a fresh one drawn from torch's default generator (so ``torch.manual_seed`` makes
    runs reproducible)."""
    if seed is not None:
        return seed
    return int(torch.randint(0, MAX_SEED - 1, (), dtype=torch.int64))
