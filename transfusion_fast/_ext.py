"""Loads the compiled extension ``transfusion_fast._C`` (csrc/) and says how to build it if absent."""
from __future__ import annotations

import functools
import importlib

import torch

BUILD_HINT = ("build it with `pip install -e . --no-build-isolation` (after `pip install torch==2.14.1 "
              "ninja`) from the repository root, or `python setup.py build_ext --inplace`")


@functools.lru_cache(maxsize=None)
def _load():
    try:
        return importlib.import_module("transfusion_fast._C"), None
    except ImportError as error:  # the package works without it; the ops that need it say so
        return None, error


def available() -> bool:
    return _load()[0] is not None


_attached: set = set()


def ops(attach_python_kernels=None):
    """``torch.ops.transfusion_fast`` with the compiled kernels registered, or a clear error.

    ``attach_python_kernels``: a function registering the Python autograd formulas and fake
    kernels of some of those ops; it runs once, the first time the extension is there to receive it.
    """
    module, error = _load()
    if module is None:
        raise RuntimeError(f"transfusion_fast._C (the compiled C++/CUDA extension) is not built: "
                           f"{BUILD_HINT}. Import failed with: {error}")
    if attach_python_kernels is not None and attach_python_kernels not in _attached:
        attach_python_kernels()
        _attached.add(attach_python_kernels)
    return torch.ops.transfusion_fast


def has_cuda_kernels() -> bool:
    """Whether the extension was compiled with its CUDA sources."""
    module, _ = _load()
    return bool(module is not None and getattr(module, "with_cuda", lambda: False)())
