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


# ------------------------------------------------------------------ the supported torch range
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _declared_torch_requirements() -> dict:
    """Quoted requirement strings naming torch in setup.py / pyproject.toml, lines of requirements.txt."""
    import re
    found = {}
    for name in ("setup.py", "pyproject.toml", "requirements.txt"):
        with open(os.path.join(ROOT, name)) as f:
            text = f.read()
        pattern = r"^(torch[<>=!~].*?)\s*$" if name.endswith(".txt") else r"""["'](torch[<>=!~][^"']*)["']"""
        found[name] = re.findall(pattern, text, flags=re.M)
    return found


def test_the_torch_range_is_declared_once_everywhere_without_an_exact_pin():
    from transfusion_fast._compat import TORCH_REQUIREMENT
    assert TORCH_REQUIREMENT == "torch>=2.11,<2.15"
    declared = _declared_torch_requirements()
    assert declared["pyproject.toml"] == [TORCH_REQUIREMENT], declared
    assert declared["requirements.txt"] == [TORCH_REQUIREMENT], declared
    assert declared["setup.py"] == [], "setup.py must read the range from _compat.py, not repeat it"
    with open(os.path.join(ROOT, "setup.py")) as f:
        assert "TORCH_REQUIREMENT" in f.read()
    # Exact versions live in constraints.txt only, and the pinned torch lies inside the range.
    with open(os.path.join(ROOT, "constraints.txt")) as f:
        pins = dict(line.strip().split("==", 1) for line in f if "==" in line and not line.startswith("#"))
    from transfusion_fast._compat import TORCH_BELOW, TORCH_MIN, torch_minor
    assert TORCH_MIN <= torch_minor(pins["torch"]) < TORCH_BELOW


@pytest.mark.parametrize("version,ok", [("2.11.0+cu130", True), ("2.14.1", True), ("2.13.0+cpu", True),
                                        ("2.10.2", False), ("2.15.0a0+git123", False), ("3.0.0", False)])
def test_torch_versions_inside_and_outside_the_range(version, ok):
    from transfusion_fast._compat import check_torch
    if ok:
        check_torch(version)
    else:
        with pytest.raises(ImportError, match=r"supports torch>=2\.11,<2\.15 .* has torch " + version.replace("+", r"\+")):
            check_torch(version)


def test_importing_on_an_unsupported_torch_raises_one_clear_error():
    code = ("import torch\n"
            "torch.__version__ = '2.10.0'\n"
            "try:\n"
            "    import transfusion_fast\n"
            "except ImportError as error:\n"
            "    print('ERR', error)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRANSFUSION_FAST_ALLOW_ANY_TORCH"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ERR transfusion_fast supports torch>=2.11,<2.15"), out.stdout
    assert "this environment has torch 2.10.0" in out.stdout
    env["TRANSFUSION_FAST_ALLOW_ANY_TORCH"] = "1"
    out = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "ERR" not in out.stdout, out.stdout + out.stderr
    assert "RuntimeWarning" in out.stderr and "supports torch>=2.11,<2.15" in out.stderr


def test_setup_discovers_subpackages_and_declares_the_extras():
    import ast
    with open(os.path.join(ROOT, "setup.py")) as f:
        tree = ast.parse(f.read())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    keywords = {k.arg: k.value for k in call.keywords}
    assert "find_packages" in ast.unparse(keywords["packages"])
    extras = ast.literal_eval(keywords["extras_require"])
    assert set(extras) >= {"hf", "diffusers", "demo", "test"}
    assert any(r.startswith("transformers") for r in extras["test"])
    assert any(r.startswith("pytest-benchmark") for r in extras["test"])
