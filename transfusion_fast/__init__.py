"""transfusion_fast: verified kernels and a thin model for Transfusion-style transformers.

Packed sequences of text tokens (causal) and continuous spans (bidirectional inside each span):
:class:`Layout` describes the mask in O(T), :mod:`transfusion_fast.ops` holds the ops, and the
backend switch (:func:`set_backend`) picks Triton, the compiled C++ kernels or the reference path.
"""
import torch as _torch

from ._compat import check_torch as _check_torch

_check_torch(_torch.__version__)  # before anything that touches the extension or Triton

from . import ops
from .backend import get_backend, set_backend, use_backend
from .layout import Layout, TileTable
from .schedules import Schedule, get_schedule
from .config import ModalityConfig, ModelConfig
from .model import Model
from .pack import Batch, SpanData, pack
from .generate import generate
from .checkpoint import load_checkpoint, load_config, save_checkpoint
from .codec import LatentCodec, Latents
from .ema import EMA

__version__ = "0.1.0"

__all__ = ["Layout", "TileTable", "ops", "get_backend", "set_backend", "use_backend", "Schedule",
           "get_schedule", "Model", "ModelConfig", "ModalityConfig", "Batch", "SpanData", "pack",
           "generate", "save_checkpoint", "load_checkpoint", "load_config", "LatentCodec", "Latents", "EMA",
           "__version__"]
