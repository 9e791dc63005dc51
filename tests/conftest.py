"""Test harness: Triton kernels run under the interpreter on CPU-only machines.

TRITON_INTERPRET must be set before triton is first imported (``@triton.jit`` decides at decoration
time), so it is set here, before anything imports transfusion_fast.kernels. On a CUDA machine the
Triton tests run compiled on the GPU instead.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

import transfusion_fast as tf  # noqa: E402

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; its CPU twin runs instead")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def reference_backend():
    """Runs a test on the reference backend (the model-level test modules take it for every test)."""
    with tf.use_backend("reference"):
        yield


@pytest.fixture
def triton_device():
    """Where Triton kernels run in this session: the GPU if there is one, else the interpreter."""
    return "cuda" if HAS_CUDA else "cpu"
