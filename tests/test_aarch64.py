"""The C++ sources compile for aarch64 (Grace Hopper, Graviton, other ARM servers): every
csrc/*.cpp goes through Debian's cross compiler against torch's headers, with setup.py's flags.

Code generation included (``-S -O0``, about the cost of ``-fsyntax-only``): GCC accepts an x86-only
``target`` / ``target_clones`` attribute in a syntax-only pass and rejects it only when it
generates code. In CI (``CI`` set) a missing cross compiler fails the test; `.ci/run` installs it
(``apt-get install g++-aarch64-linux-gnu``).
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from torch.utils.cpp_extension import include_paths

ROOT = Path(__file__).resolve().parent.parent
CROSS = "aarch64-linux-gnu-g++"
SOURCES = sorted(glob.glob(str(ROOT / "csrc" / "*.cpp")))


def _compiler() -> str:
    found = shutil.which(CROSS)
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail(f"{CROSS} is missing: CI must check the aarch64 build "
                    "(apt-get install g++-aarch64-linux-gnu, done by .ci/run)")
    pytest.skip(f"{CROSS} not installed (apt-get install g++-aarch64-linux-gnu); CI runs this test")


def _compile(compiler: str, source: str) -> subprocess.CompletedProcess:
    includes = [str(ROOT / "csrc"), *include_paths(), sysconfig.get_paths()["include"]]
    command = [compiler, "-std=c++20", "-fopenmp", "-O0", "-S", "-o", os.devnull,
               "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C",
               *(f"-I{d}" for d in includes), source]
    return subprocess.run(command, capture_output=True, text=True, timeout=900)


def test_every_cpp_source_compiles_for_aarch64():
    compiler = _compiler()
    assert SOURCES, "no csrc/*.cpp found"
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda source: _compile(compiler, source), SOURCES))
    failures = {Path(s).name: r.stderr[-3000:] for s, r in zip(SOURCES, results) if r.returncode != 0}
    assert not failures, "aarch64 compile failed:\n" + "\n".join(f"== {k}\n{v}" for k, v in failures.items())


def test_the_aarch64_check_rejects_x86_code():
    # The check itself: an unguarded x86 intrinsic header and an x86 target attribute fail it.
    compiler = _compiler()
    probe = Path(os.environ.get("TMPDIR", "/tmp")) / f"tf_aarch64_probe_{os.getpid()}.cpp"
    try:
        for body in ("#include <immintrin.h>\n",
                     '__attribute__((target_clones("avx512f", "default"))) int f(int x) { return x; }\n'):
            probe.write_text(body)
            assert _compile(compiler, str(probe)).returncode != 0, body
    finally:
        probe.unlink(missing_ok=True)
