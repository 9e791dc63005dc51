"""Scalar argument checks shared by every layer of the package (layout, schedules, ops, config, model).

Each check returns the value as the type it stands for, or raises ``ValueError`` naming the argument,
what it must be and what it got. They refuse what Python would silently coerce: a ``bool`` where an
int or a float is meant (``True == 1``), a float where an int is meant (no truncation), NaN and
infinities where a finite number is meant, and strings or other objects where a ``bool`` is meant
(``"no"`` is truthy).

Sizes have documented upper bounds, checked before any work is done, so that a typo such as
``10**9`` or ``2**32`` is an error instead of a hang, an allocator failure or an overflow in a
compiled kernel's index arithmetic.
"""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch

__all__ = ["MAX_SIZE", "MAX_ELEMENTS", "MAX_SEED", "describe", "check_int", "check_float", "check_bool",
           "check_int_list", "refuse_double_backward"]

#: Largest single size argument (a patch size, an image side, a number of steps or rows, a block
#: size): int32, so that every index of a compiled kernel fits.
MAX_SIZE = 2 ** 31 - 1
#: Largest number of elements of a tensor an op is asked to allocate (products of sizes stay
#: far from int64 overflow).
MAX_ELEMENTS = 2 ** 48
#: Seeds are ints in [0, MAX_SEED): a 64-bit Philox key, kept non-negative for the int64 op schema.
MAX_SEED = 2 ** 63


def describe(value) -> str:
    """What an argument is, for an error message."""
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)} on {value.device}"
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{type(value).__name__} {text}"


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _int_phrase(low, high) -> str:
    if low is not None and high is not None:
        return f"a positive int <= {high}" if low == 1 else f"an int in [{low}, {high}]"
    if low is not None:
        return "a positive int" if low == 1 else f"an int >= {low}"
    return "an int" if high is None else f"an int <= {high}"


def check_int(name: str, value, low: int | None = None, high: int | None = None) -> int:
    """An int (not a bool, not a float) in ``[low, high]``; returned as a Python int."""
    if not _is_int(value) or (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be {_int_phrase(low, high)}, got {describe(value)}")
    return int(value)


def _float_phrase(low, high, low_open: bool, finite: bool) -> str:
    kind = "finite float" if finite else "float (not NaN)"
    if low is not None and high is not None:
        return f"a {kind} in {'(' if low_open else '['}{low:g}, {high:g}]"
    if low is not None:
        return f"a positive {kind}" if low == 0 and low_open else f"a {kind} {'>' if low_open else '>='} {low:g}"
    return f"a {kind}" if high is None else f"a {kind} <= {high:g}"


def check_float(name: str, value, low: float | None = None, high: float | None = None, *,
                low_open: bool = False, finite: bool = True) -> float:
    """A real number (int or float, not a bool), finite unless ``finite=False`` (NaN is never
    accepted), in ``[low, high]`` (``(low, high]`` with ``low_open``); returned as a Python float."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok:
        number = float(value)
        ok = not math.isnan(number) and not (finite and math.isinf(number))
        ok = ok and not (low is not None and (number <= low if low_open else number < low))
        ok = ok and not (high is not None and number > high)
    if not ok:
        raise ValueError(f"{name} must be {_float_phrase(low, high, low_open, finite)}, got {describe(value)}")
    return number


def check_bool(name: str, value) -> bool:
    """A ``bool`` (a numpy bool too); not an int, a string or None."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be a bool (True or False), got {describe(value)}")
    return bool(value)


def check_int_list(name: str, values, low: int | None = None, high: int | None = None) -> list:
    """A list/tuple of ints (each checked as by :func:`check_int`), or a 1-D integer tensor."""
    if isinstance(values, torch.Tensor):
        if values.dtype.is_floating_point or values.dtype.is_complex or values.dtype == torch.bool or values.dim() != 1:
            raise ValueError(f"{name} must be a sequence of ints or a 1-D integer tensor, got {describe(values)}")
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise ValueError(f"{name} must be a sequence of ints, got {describe(values)}")
    return [check_int(f"{name}[{i}]", v, low, high) for i, v in enumerate(values)]


def refuse_double_backward(backward_op, what: str) -> None:
    """Give the custom op computing ``what``'s gradients an autograd formula that raises a clear
    error: differentiating that gradient again (``create_graph=True``, e.g. a gradient penalty)
    would otherwise end in torch's "no autograd formula was registered" for an internal op name."""
    def backward(ctx, *grads):
        raise RuntimeError(f"{what}: double backward (differentiating its gradient again, e.g. a gradient "
                           f"penalty through create_graph=True) is not supported by the attention kernels; "
                           f"ops.attention_reference (plain PyTorch) can be differentiated twice")

    backward_op.register_autograd(backward, setup_context=lambda ctx, inputs, output: None)
