"""Builds transfusion_fast and its compiled extension ``transfusion_fast._C`` with ninja.

The C++ (CPU) sources of csrc/ are always compiled; the CUDA sources (csrc/*.cu) whenever nvcc is
found (CUDA_HOME, or /usr/local/cuda), for ``TORCH_CUDA_ARCH_LIST`` (default ``8.0;9.0a``).
``TRANSFUSION_FAST_NO_CUDA=1`` builds the CPU part only (faster local iteration).

Install into an environment that already has a supported torch (the range is
``transfusion_fast/_compat.py``'s) without touching it: ``pip install -e . --no-build-isolation``
(docs/install.md). The objects are kept in ``build/temp.<platform>-<python>-torch<version>-<cpu|cuda>``
across builds, so ninja recompiles only the sources (or headers) that changed, also under pip's
editable install, which would otherwise build in a fresh temporary directory every time.
"""
import glob
import os
import runpy
import shutil
import sys
import sysconfig

from setuptools import find_packages, setup

if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")

import torch  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
TORCH_REQUIREMENT = runpy.run_path(os.path.join(HERE, "transfusion_fast", "_compat.py"))["TORCH_REQUIREMENT"]
cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
cuda_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
headers = sorted(glob.glob(os.path.join("csrc", "*.h")) + glob.glob(os.path.join("csrc", "*.cuh")))
want_cuda = os.environ.get("TRANSFUSION_FAST_NO_CUDA", "0") in ("", "0")
nvcc = CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")) or shutil.which("nvcc")
with_cuda = bool(want_cuda and nvcc and cuda_sources)

cxx_flags = ["-O3", "-std=c++20", "-fopenmp"]
link_flags = ["-fopenmp"]
# libstdc++ goes first on the link line (torch's own libraries follow). torch's wheels are built
# with a toolchain that links parts of libstdc++ statically into libc10.so / libtorch.so and
# exports them without symbol versions (std::ostringstream's constructor, stringbuf::str(), ...).
# Linked after them, libstdc++ loses: the extension's references to those functions bind,
# unversioned, to torch's private copies, while the rest of the stream machinery (the locale, the
# num_put facet that formats integers) comes from the process's libstdc++.so.6, so the error
# message of a TORCH_CHECK mixes two libstdc++ builds in one object. First on the line, every
# standard-library reference is versioned (GLIBCXX_*) and resolves to libstdc++.so.6, which also
# comes first among the extension's DT_NEEDED. tests/test_cpp_bad_input.py checks both.
libraries = ["stdc++"] if sys.platform.startswith("linux") else []


def cuda_library_headers() -> list:
    """Headers of CUDA libraries (cuBLAS, cuSPARSE, ...) that ship as NVIDIA pip wheels with torch,
    for toolkits that carry only the compiler."""
    try:
        import nvidia
    except ImportError:
        return []
    return sorted(d for root in nvidia.__path__ for d in glob.glob(os.path.join(root, "*", "include")))


if with_cuda:
    extension = CUDAExtension(
        "transfusion_fast._C", cpp_sources + cuda_sources,
        include_dirs=[os.path.join(HERE, "csrc")] + cuda_library_headers(),
        define_macros=[("TF_WITH_CUDA", None)],
        libraries=libraries,
        depends=headers,
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++20", "--use_fast_math",
                                                      "-lineinfo"]},
        extra_link_args=link_flags,
    )
else:
    extension = CppExtension(
        "transfusion_fast._C", cpp_sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        libraries=libraries,
        depends=headers,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
    )


def object_dir() -> str:
    """One persistent object directory per (platform, Python, torch, CPU-only or CUDA) build: the
    objects of one torch never meet another torch's headers, and switching back is free."""
    torch_version = torch.__version__.replace("+", "_")
    python = f"{sys.implementation.cache_tag}"
    kind = "cuda" if with_cuda else "cpu"
    return os.path.join(HERE, "build", f"temp.{sysconfig.get_platform()}-{python}-torch{torch_version}-{kind}")


class BuildExt(BuildExtension.with_options(use_ninja=True)):
    """torch's ninja build (BuildExtension forces the link step; ninja skips up-to-date objects)
    with the objects kept in ``object_dir()``, also for pip's editable and wheel builds."""

    def finalize_options(self):
        super().finalize_options()
        self.build_temp = object_dir()


setup(
    name="transfusion_fast",
    version="0.1.0",
    description="Fast, verified kernels and a thin model for Transfusion-style text + diffusion transformers",
    packages=find_packages(include=["transfusion_fast", "transfusion_fast.*"]) + ["transfusion_fast.kernels"],
    package_dir={"transfusion_fast.kernels": "kernels"},
    python_requires=">=3.10",
    install_requires=[TORCH_REQUIREMENT, "numpy", "ninja", "tqdm", "safetensors"],
    extras_require={
        "hf": ["transformers>=5.22,<5.25"],
        "diffusers": ["diffusers>=0.42,<1"],
        "demo": ["scikit-learn>=1.9,<2"],
        "test": ["pytest>=9.2,<10", "pytest-benchmark>=5.3,<6", "hypothesis>=6.170,<7",
                 "transformers>=5.22,<5.25", "diffusers>=0.42,<1", "scikit-learn>=1.9,<2"],
    },
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExt},
    entry_points={"console_scripts": ["transfusion-fast=transfusion_fast.app.cli:main"]},
    zip_safe=False,
)
