"""The torch releases this package supports, checked once when the package is imported.

``TORCH_REQUIREMENT`` is the one place the range is written: setup.py reads it for
``install_requires``; pyproject.toml's build requirements and requirements.txt repeat it and a test
(tests/test_build.py) keeps them equal. The compiled extension and the Triton kernels are built and
tested on every minor release in the range (``make test-compat TORCH=x.y.z``).
"""
from __future__ import annotations

import os
import re
import warnings

TORCH_MIN = (2, 11)      # lowest minor release the test suite has run on
TORCH_BELOW = (2, 15)    # first minor release not tested
TORCH_REQUIREMENT = "torch>={}.{},<{}.{}".format(*TORCH_MIN, *TORCH_BELOW)
#: Set to 1 to import on an untested torch anyway (a warning instead of the error).
ALLOW_ENV = "TRANSFUSION_FAST_ALLOW_ANY_TORCH"


def torch_minor(version: str) -> tuple[int, int] | None:
    """(major, minor) of a torch version string such as ``2.11.0+cu130`` or ``2.15.0a0+git1234``."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else None


def check_torch(version: str) -> None:
    """Raise ImportError naming the supported range when ``version`` lies outside it."""
    minor = torch_minor(version)
    if minor is not None and TORCH_MIN <= minor < TORCH_BELOW:
        return
    message = (f"transfusion_fast supports {TORCH_REQUIREMENT} (tested {TORCH_MIN[0]}.{TORCH_MIN[1]} "
               f"through {TORCH_BELOW[0]}.{TORCH_BELOW[1] - 1}.x); this environment has torch {version}. "
               f"Install a supported torch (pip install '{TORCH_REQUIREMENT}') and rebuild the extension "
               f"(pip install -e . --no-build-isolation), or set {ALLOW_ENV}=1 to try this one anyway.")
    if os.environ.get(ALLOW_ENV, "0") not in ("", "0"):
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        return
    raise ImportError(message)
