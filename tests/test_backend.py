"""The one backend switch: function, context manager, environment variable, clear errors."""
import os
import subprocess
import sys

import pytest
import torch

import transfusion_fast as tf
from transfusion_fast import backend


def test_switch_and_context_manager():
    assert tf.get_backend() == "auto"
    with tf.use_backend("reference"):
        assert tf.get_backend() == "reference"
        with tf.use_backend("triton"):
            assert tf.get_backend() == "triton"
        assert tf.get_backend() == "reference"
    assert tf.get_backend() == "auto"
    tf.set_backend("reference")
    try:
        assert backend.resolve(torch.zeros(1), "op") == "reference"
    finally:
        tf.set_backend("auto")


def test_auto_resolves_by_device():
    assert backend.resolve(torch.zeros(1), "op") == "cpu"


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'triton', 'reference'\), got 'cuda'"):
        tf.set_backend("cuda")


def test_environment_variable_selects_backend():
    code = "import transfusion_fast as tf; print(tf.get_backend())"
    env = dict(os.environ, TRANSFUSION_FAST_BACKEND="reference")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "reference"
    env["TRANSFUSION_FAST_BACKEND"] = "bogus"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "backend must be one of" in out.stderr


def test_triton_on_cpu_without_interpreter_says_how():
    code = ("import torch, transfusion_fast as tf; tf.set_backend('triton');"
            "tf.backend.resolve(torch.zeros(1), 'attention')")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "TRITON_INTERPRET=1" in out.stderr
