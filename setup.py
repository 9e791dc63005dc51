"""Builds transfusion_fast and its compiled extension ``transfusion_fast._C`` with ninja.

The C++ (CPU) sources of csrc/ are always compiled; the CUDA sources (csrc/*.cu) whenever nvcc is
found (CUDA_HOME, or /usr/local/cuda), for ``TORCH_CUDA_ARCH_LIST`` (default ``8.0;9.0a``).
``TRANSFUSION_FAST_NO_CUDA=1`` builds the CPU part only (faster local iteration).
Install with ``pip install -e . --no-build-isolation`` after ``pip install torch==2.14.1 ninja``.
"""
import glob
import os
import shutil
import sys

from setuptools import setup

if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")

from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
cuda_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
want_cuda = os.environ.get("TRANSFUSION_FAST_NO_CUDA", "0") in ("", "0")
nvcc = CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")) or shutil.which("nvcc")
with_cuda = bool(want_cuda and nvcc and cuda_sources)

cxx_flags = ["-O3", "-std=c++20", "-fopenmp"]
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
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++20", "--use_fast_math",
                                                      "-lineinfo"]},
        extra_link_args=["-fopenmp"],
    )
else:
    extension = CppExtension(
        "transfusion_fast._C", cpp_sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        libraries=libraries,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )

setup(
    name="transfusion_fast",
    version="0.1.0",
    description="Fast, verified kernels and a thin model for Transfusion-style text + diffusion transformers",
    packages=["transfusion_fast", "transfusion_fast.ops", "transfusion_fast.kernels"],
    package_dir={"transfusion_fast.kernels": "kernels"},
    python_requires=">=3.10",
    install_requires=["torch==2.14.1", "numpy", "ninja", "tqdm", "safetensors"],
    extras_require={"test": ["pytest", "pytest-benchmark", "hypothesis", "diffusers"],
                    "demo": ["scikit-learn"]},
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    entry_points={"console_scripts": ["transfusion-fast=transfusion_fast.cli:main"]},
    zip_safe=False,
)
