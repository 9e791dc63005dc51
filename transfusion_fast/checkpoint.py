"""Checkpoints: safetensors weights with the config embedded, atomic writes, optimizer state.

* ``save_checkpoint(path, model, optimizer=None, step=None, extra=None)`` writes ``path``
  (safetensors; metadata ``config`` = the ModelConfig as JSON, ``step``, ``extra`` as JSON) and,
  with an optimizer, ``path + ".optim.pt"`` (optimizer state, step, torch RNG state).
* ``load_checkpoint(path, model=None, optimizer=None)`` → ``(model, info)``; builds the model from
  the embedded config when none is given, and refuses a model whose config differs.

Every file is written to a temporary file in the same directory and moved into place with
``os.replace``, so an interrupted save leaves the previous checkpoint intact.
"""
from __future__ import annotations

import json
import os
import tempfile

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .model import Model

__all__ = ["save_checkpoint", "load_checkpoint", "load_config", "optimizer_path", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "transfusion_fast/1"


def optimizer_path(path) -> str:
    """Where the optimizer state of checkpoint ``path`` lives."""
    return os.fspath(path) + ".optim.pt"


def _unwrap(model) -> Model:
    inner = getattr(model, "module", model)          # DDP
    inner = getattr(inner, "_orig_mod", inner)       # torch.compile
    if not isinstance(inner, Model):
        raise TypeError(f"model must be a transfusion_fast.Model (optionally wrapped in DDP or "
                        f"torch.compile), got {type(model).__name__}")
    return inner


def _atomic_write(path: str, write) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_checkpoint(path, model, optimizer: torch.optim.Optimizer | None = None, *,
                    step: int | None = None, extra: dict | None = None) -> None:
    """Save the weights (and optimizer state) of ``model`` atomically; see the module docstring."""
    path = os.fspath(path)
    inner = _unwrap(model)
    state = {k: v.detach().to("cpu").contiguous() for k, v in inner.state_dict().items()}
    for name, tensor in state.items():
        if type(tensor) is not torch.Tensor:
            raise TypeError(f"save_checkpoint: parameter {name!r} is a {type(tensor).__name__} (sharded?); "
                            f"gather a full state dict before saving")
    metadata = {"format": CHECKPOINT_FORMAT, "config": inner.config.to_json(),
                "step": json.dumps(step), "extra": json.dumps(extra or {})}
    _atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata))
    if optimizer is not None:
        payload = {"optimizer": optimizer.state_dict(), "step": step, "rng": torch.get_rng_state()}
        _atomic_write(optimizer_path(path), lambda tmp: torch.save(payload, tmp))


def _metadata(path: str) -> dict:
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != CHECKPOINT_FORMAT or "config" not in meta:
        raise ValueError(f"{path!r} is not a transfusion_fast checkpoint: expected metadata format "
                         f"{CHECKPOINT_FORMAT!r} with an embedded config, got format {meta.get('format')!r}")
    return meta


def load_config(path) -> ModelConfig:
    """The ModelConfig embedded in checkpoint ``path``."""
    return ModelConfig.from_dict(json.loads(_metadata(os.fspath(path))["config"]))


def load_checkpoint(path, model=None, optimizer: torch.optim.Optimizer | None = None, *,
                    map_location="cpu"):
    """Load checkpoint ``path`` into ``model`` (built from the embedded config when ``None``).

    Returns ``(model, info)`` with ``info = {"step", "extra", "config"}``. Raises ``ValueError``
    listing every differing field when ``model.config`` differs from the checkpoint's config.
    With ``optimizer``, restores its state and the torch RNG state from ``path + ".optim.pt"``.
    """
    path = os.fspath(path)
    meta = _metadata(path)
    saved = ModelConfig.from_dict(json.loads(meta["config"]))
    if model is None:
        model = Model(saved)
    inner = _unwrap(model)
    if inner.config != saved:
        mine, theirs = inner.config.to_dict(), saved.to_dict()
        diffs = [f"{k}: checkpoint {theirs[k]!r}, model {mine[k]!r}" for k in sorted(theirs)
                 if theirs[k] != mine.get(k)]
        raise ValueError(f"checkpoint {path!r} was saved with a different ModelConfig; differing fields: "
                         + "; ".join(diffs))
    state = load_file(path, device=str(map_location))
    inner.load_state_dict(state, strict=True)
    info = {"step": json.loads(meta.get("step", "null")), "extra": json.loads(meta.get("extra", "{}")),
            "config": saved}
    if optimizer is not None:
        opt_file = optimizer_path(path)
        if not os.path.exists(opt_file):
            raise FileNotFoundError(f"optimizer state {opt_file!r} for checkpoint {path!r} does not "
                                    f"exist (was it saved with optimizer=...?)")
        payload = torch.load(opt_file, map_location=map_location, weights_only=False)
        optimizer.load_state_dict(payload["optimizer"])
        torch.set_rng_state(payload["rng"])
    return model, info
