"""Exponential moving average (EMA) of a model's trainable parameters, for sampling and evaluation.

After every optimizer step ``ema.update(model)`` moves each average toward the current weights::

    avg ← avg + (1 − d)·(param − avg),   d = decay                                 (warmup=False)
                                          d = min(decay, (1 + n) / (10 + n))       (warmup=True)

with ``n`` the number of updates made so far. DiT keeps ``decay = 0.9999`` from the first step;
the warmup form (from TensorFlow's ``ExponentialMovingAverage(num_updates=...)``) averages over
the ~n steps seen so far while ``n`` is small, so a short run's EMA is not dominated by the random
initialization. ``with ema.average_parameters(model): ...`` swaps the averages in for sampling or
evaluation and restores the trained weights on exit, also on an exception.

What is averaged: the parameters that require grad when the EMA is built, by name. Frozen parameters
(a frozen codec, frozen embeddings) and buffers are left out: they do not train, so the model's own
values are the right ones at evaluation. The averages of float16/bfloat16 parameters are kept in
float32: a 1e-4 step is below bfloat16's resolution and would be lost. The update is one
``torch._foreach_lerp_`` per dtype group (a fused multi-tensor kernel), no Python loop per tensor.

``state_dict()`` / ``load_state_dict()`` carry the averages (by parameter name), the decay, the
warmup flag and the update count, for checkpoints.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn

__all__ = ["EMA"]


def _check_decay(decay) -> float:
    if not isinstance(decay, (int, float)) or isinstance(decay, bool) or not math.isfinite(decay) \
            or not 0 <= decay <= 1:
        raise ValueError(f"decay must be a float in [0, 1], got {decay!r}")
    return float(decay)


def _average_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class EMA:
    """EMA of ``model``'s trainable parameters.

    Args:
        model: the module whose parameters that require grad are averaged (the unwrapped model, not
            a DDP wrapper: names are matched on update).
        decay: in [0, 1]; 0.9999 is DiT's value, smaller for short runs.
        warmup: use ``min(decay, (1 + n) / (10 + n))`` (see the module docstring).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, *, warmup: bool = False):
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(warmup, bool):
            raise ValueError(f"warmup must be a bool, got {warmup!r}")
        self.decay = _check_decay(decay)
        self.warmup = warmup
        self.num_updates = 0
        params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if not params:
            raise ValueError("model has no parameter that requires grad: nothing to average")
        self.names = [name for name, _ in params]
        with torch.no_grad():
            self.averages = [p.detach().to(_average_dtype(p.dtype), copy=True) for _, p in params]

    def current_decay(self) -> float:
        """The ``d`` the next :meth:`update` uses."""
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    def _params(self, model: nn.Module) -> list:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
        named = dict(model.named_parameters())
        params = []
        for name, average in zip(self.names, self.averages):
            p = named.get(name)
            if p is None:
                raise ValueError(f"model has no parameter {name!r} (the EMA was built on a model with it); "
                                 f"pass the same (unwrapped) model")
            if p.shape != average.shape:
                raise ValueError(f"parameter {name!r}: expected shape {tuple(average.shape)}, got {tuple(p.shape)}")
            params.append(p)
        return params

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step toward ``model``'s current parameters (call after ``optimizer.step()``)."""
        params = self._params(model)
        weight = 1.0 - self.current_decay()
        groups: dict = {}
        for average, p in zip(self.averages, params):
            groups.setdefault((average.device, average.dtype, p.dtype), ([], []))
            targets, sources = groups[(average.device, average.dtype, p.dtype)]
            targets.append(average)
            sources.append(p.detach())
        for (_, dtype, param_dtype), (targets, sources) in groups.items():
            if param_dtype != dtype:
                sources = [s.to(dtype) for s in sources]
            torch._foreach_lerp_(targets, sources, weight)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Writes the averages into ``model``'s parameters (for a model kept for inference only)."""
        for p, average in zip(self._params(model), self.averages):
            p.copy_(average)

    @contextlib.contextmanager
    def average_parameters(self, model: nn.Module):
        """``with ema.average_parameters(model): sample(model)``: the averages are in the model inside
        the block; the trained weights come back on exit (exception or not)."""
        params = self._params(model)
        with torch.no_grad():
            saved = [p.detach().clone() for p in params]
            for p, average in zip(params, self.averages):
                p.copy_(average)
        try:
            yield model
        finally:
            with torch.no_grad():
                for p, value in zip(params, saved):
                    p.copy_(value)

    def to(self, device) -> "EMA":
        """Moves the averages (e.g. to the model's device after loading a checkpoint on CPU)."""
        self.averages = [average.to(device) for average in self.averages]
        return self

    def state_dict(self) -> dict:
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates,
                "averages": {name: average.detach().clone() for name, average in zip(self.names, self.averages)}}

    def load_state_dict(self, state: dict) -> None:
        """Restores a :meth:`state_dict`: the same parameter names and shapes are required; the
        averages keep this EMA's devices and dtypes."""
        if not isinstance(state, dict) or not {"decay", "warmup", "num_updates", "averages"} <= set(state):
            raise ValueError(f"state must be an EMA state_dict with decay, warmup, num_updates and averages, got "
                             f"{sorted(state) if isinstance(state, dict) else type(state).__name__}")
        averages = state["averages"]
        if not isinstance(averages, dict) or set(averages) != set(self.names):
            got = sorted(averages) if isinstance(averages, dict) else type(averages).__name__
            missing = sorted(set(self.names) - set(averages)) if isinstance(averages, dict) else self.names
            raise ValueError(f"state averages must name exactly this EMA's {len(self.names)} parameters; missing "
                             f"{missing[:5]}, got {got[:5]}{' ...' if len(got) > 5 else ''}")
        num_updates = state["num_updates"]
        if not isinstance(num_updates, int) or isinstance(num_updates, bool) or num_updates < 0:
            raise ValueError(f"state num_updates must be an int >= 0, got {num_updates!r}")
        if not isinstance(state["warmup"], bool):
            raise ValueError(f"state warmup must be a bool, got {state['warmup']!r}")
        decay = _check_decay(state["decay"])
        new = []
        for name, average in zip(self.names, self.averages):
            value = averages[name]
            if not isinstance(value, torch.Tensor) or value.shape != average.shape:
                raise ValueError(f"state average {name!r}: expected shape {tuple(average.shape)}, got "
                                 f"{tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}")
            new.append(value.to(average.device, average.dtype, copy=True))
        self.averages, self.decay, self.warmup, self.num_updates = new, decay, state["warmup"], num_updates
