"""The one backend switch: ``auto`` | ``triton`` | ``reference``.

* ``auto``: Triton kernels on CUDA tensors; on CPU tensors the compiled C++ kernels of
  ``transfusion_fast._C`` where the op has one, and ATen's own compiled CPU kernels (the reference
  composition) for the elementwise ops that do not (RoPE, SwiGLU, RMSNorm).
* ``triton``: the Triton kernels always. On CPU tensors this needs ``TRITON_INTERPRET=1`` set before
  ``transfusion_fast`` is imported (the interpreter: for testing, very slow).
* ``reference``: the plain PyTorch path, written for clarity; the ground truth of every test.

Set it with :func:`set_backend`, the :func:`use_backend` context manager, or the environment
variable ``TRANSFUSION_FAST_BACKEND`` (read at import).
"""
from __future__ import annotations

import contextlib
import os

import torch

__all__ = ["BACKENDS", "get_backend", "set_backend", "use_backend", "resolve", "triton_interpreting"]

BACKENDS = ("auto", "triton", "reference")
ENV_VAR = "TRANSFUSION_FAST_BACKEND"


def _validated(name) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


_current = _validated(os.environ.get(ENV_VAR, "auto"))


def get_backend() -> str:
    return _current


def set_backend(name: str) -> None:
    """Select the backend for every op of the package."""
    global _current
    _current = _validated(name)


@contextlib.contextmanager
def use_backend(name: str):
    """``with use_backend("reference"): ...`` — the backend inside the block, restored after."""
    global _current
    previous, _current = _current, _validated(name)
    try:
        yield
    finally:
        _current = previous


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve(tensor: torch.Tensor, op: str) -> str:
    """The concrete implementation for ``op`` on ``tensor``: ``"triton"``, ``"cpu"`` or ``"reference"``.

    ``"cpu"`` means the compiled C++ kernel where the op has one; each op decides what its CPU
    branch runs and documents it.
    """
    backend = _current
    if backend == "reference":
        return "reference"
    if backend == "triton":
        if tensor.device.type != "cuda" and not triton_interpreting():
            raise RuntimeError(
                f"{op}: backend 'triton' needs CUDA tensors, got a tensor on {tensor.device}; set "
                f"TRITON_INTERPRET=1 before importing transfusion_fast to run the Triton kernels on CPU "
                f"(slow, for testing), or use backend 'auto' or 'reference'")
        return "triton"
    return "triton" if tensor.device.type == "cuda" else "cpu"
