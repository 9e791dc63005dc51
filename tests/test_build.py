"""The build: the extension is compiled (CPU always, CUDA objects when nvcc exists), the package
imports without a GPU, kernels/ installs as transfusion_fast.kernels, and a missing extension gives
one clear error."""
import importlib.util
import os
import shutil
import subprocess
import sys

import pytest
import torch

import transfusion_fast
from transfusion_fast import _ext


def test_extension_is_built_and_registers_ops():
    assert _ext.available(), "transfusion_fast._C is not built"
    ops = _ext.ops()
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    assert ops.patchify(x, 2).shape == (2, 4, 12)


def test_cuda_objects_are_compiled_when_nvcc_exists():
    nvcc = shutil.which("nvcc") or os.path.exists("/usr/local/cuda/bin/nvcc")
    if os.environ.get("TRANSFUSION_FAST_NO_CUDA", "0") not in ("", "0"):
        pytest.fail("the test suite must run against a full build; unset TRANSFUSION_FAST_NO_CUDA")
    assert _ext.has_cuda_kernels() == bool(nvcc)


def test_kernels_install_inside_the_package():
    spec = importlib.util.find_spec("transfusion_fast.kernels")
    assert spec is not None
    for generic in ("kernels", "csrc", "bench"):
        found = importlib.util.find_spec(generic)
        assert found is None or "transfusion_fast" not in (found.origin or ""), generic


def test_imports_and_runs_reference_without_gpu_or_extension(tmp_path):
    # Simulate a missing extension: the package imports, the op that needs it names the fix.
    code = (
        "import importlib\n"
        "real_import_module = importlib.import_module\n"
        "def without_extension(name, *args):\n"
        "    if name == 'transfusion_fast._C':\n"
        "        raise ImportError('simulated: not built')\n"
        "    return real_import_module(name, *args)\n"
        "importlib.import_module = without_extension\n"
        "import torch, transfusion_fast as tf\n"
        "x = torch.zeros(1, 1, 4, 4)\n"
        "with tf.use_backend('reference'):\n"
        "    tf.ops.patchify(x, 2)\n"
        "try:\n"
        "    tf.ops.patchify(x, 2)\n"
        "except RuntimeError as error:\n"
        "    print('ERR', error)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "ERR transfusion_fast._C" in out.stdout and "pip install -e ." in out.stdout


def test_version():
    assert transfusion_fast.__version__
