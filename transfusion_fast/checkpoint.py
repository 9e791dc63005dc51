"""Checkpoints: one safetensors file per checkpoint, written atomically, verified on load.

* ``save_checkpoint(path, model, optimizer=None, *, step=None, extra=None, ema=None)`` writes ``path``.
* ``load_checkpoint(path, model=None, optimizer=None, *, ema=None)`` → ``(model, info)``; builds the
  model from the embedded config when none is given, refuses a model whose config differs, and with
  ``optimizer`` / ``ema`` restores the training state saved with them (the resume form).

What the file holds (format ``transfusion_fast/2``):

* the model's state dict, one tensor per name (any safetensors reader sees the weights);
* with an optimizer or an EMA, the uint8 tensor ``__training_state__``: a ``torch.save`` archive of
  ``{"optimizer", "ema", "rng"}`` (the optimizer's and the EMA's ``state_dict()``, torch's CPU RNG
  state and, where CUDA is initialized, the CUDA RNG states), read back with ``weights_only=True``;
* metadata: ``format``, ``config`` (the ModelConfig as JSON), ``step``, ``extra`` (JSON),
  ``contents`` and ``checksum``: the SHA-256 of the other metadata fields and of every tensor's name,
  dtype, shape and bytes.

One unit, one rename: the file is written to a temporary file in the same directory
(``.NAME.saving.HOST.PID.TOKEN.tmp``), flushed to disk and moved onto ``path`` with ``os.replace``.
Whatever kills a save, ``path`` holds either the previous checkpoint or the new one, whole: weights,
optimizer, RNG, EMA and step always come from the same save. A save first removes the temporary files
that earlier saves to the same path left when they were killed (those of processes that no longer run
on this host, and those of the previous format), and after the rename the ``.optim.pt`` file the
previous format kept beside the weights.

Loading checks everything before it changes anything: every failure raises :class:`CheckpointError`
(a ``ValueError``) naming the path and what is wrong (a directory, a truncated or garbage file,
metadata that is not JSON, a checksum that does not match, a missing optimizer state, a config that
differs); a missing file raises ``FileNotFoundError``.

Checkpoints of the previous format (``transfusion_fast/1``: the weights file, with the optimizer
state in ``path + ".optim.pt"`` beside it and no checksum) are still read, with a warning: the
weights always, the optimizer state only when the step stored with it equals the weights' step (a
save killed between its two writes left them from different steps: refused). Saving always writes
the current format.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import secrets
import socket
import warnings

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from .checks import check_int, describe
from .config import ModelConfig
from .ema import EMA
from .model import Model

__all__ = ["save_checkpoint", "load_checkpoint", "load_config", "CheckpointError", "CHECKPOINT_FORMAT",
           "LEGACY_FORMAT", "TRAINING_STATE_KEY"]

CHECKPOINT_FORMAT = "transfusion_fast/2"
#: The previous format: weights here, optimizer state in ``path + ".optim.pt"`` (read-only support).
LEGACY_FORMAT = "transfusion_fast/1"
#: The tensor that holds the optimizer / EMA / RNG state.
TRAINING_STATE_KEY = "__training_state__"
_METADATA_FIELDS = ("format", "config", "step", "extra", "contents")


class CheckpointError(ValueError):
    """A checkpoint that cannot be saved or loaded as asked; the message names the path and the problem."""


def _unwrap(model) -> Model:
    inner = getattr(model, "module", model)          # DDP
    inner = getattr(inner, "_orig_mod", inner)       # torch.compile
    if not isinstance(inner, Model):
        raise TypeError(f"model must be a transfusion_fast.Model (optionally wrapped in DDP or "
                        f"torch.compile), got {type(model).__name__}")
    return inner


def _check_path(path) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {describe(path)}")
    return os.fspath(path)


# ----------------------------------------------------------------------------------- checksum
def _digest(metadata: dict, tensors: dict) -> str:
    """SHA-256 of the metadata fields (but the checksum) and of every tensor, in name order."""
    h = hashlib.sha256()
    for key in _METADATA_FIELDS:
        h.update(f"{key}={metadata.get(key, '')}\0".encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\0".encode())
        if t.numel():
            h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return "sha256:" + h.hexdigest()


# ----------------------------------------------------------------------------------- writing
_LEGACY_TEMP = re.compile(r"(?:optim\.pt\.)?[A-Za-z0-9_]{8}\.tmp")


def _temp_prefix(path: str) -> str:
    return f".{os.path.basename(path)}.saving."


def _process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                          # another user's live process
        return True
    return True


def _remove_stale_temp_files(path: str) -> None:
    """Remove what earlier saves to ``path`` left when they were killed: their temporary files
    (this format: only those of processes that no longer run on this host) and the previous
    format's (``.NAME.XXXXXXXX.tmp``, ``.NAME.optim.pt.XXXXXXXX.tmp``)."""
    directory, base = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    prefix, legacy_prefix, host = _temp_prefix(path), f".{base}.", socket.gethostname()
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        stale = False
        if name.startswith(prefix) and name.endswith(".tmp"):
            parts = name[len(prefix):-len(".tmp")].rsplit(".", 2)
            if len(parts) == 3 and parts[0] == host and parts[1].isdigit():
                stale = int(parts[1]) == os.getpid() or not _process_runs(int(parts[1]))
        elif name.startswith(legacy_prefix) and _LEGACY_TEMP.fullmatch(name[len(legacy_prefix):]):
            stale = True
        if stale:
            try:
                os.remove(os.path.join(directory, name))
            except OSError:
                pass                                 # gone already, or not ours to remove


def _fsync_directory(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass                                         # some filesystems cannot sync a directory
    finally:
        os.close(fd)


def _write_file(filename: str, tensors: dict, metadata: dict) -> None:
    # Serialized in memory and written here rather than by safetensors' save_file, which writes
    # through a temporary file of its own (".tmpXXXXXX") that a killed save would leave behind
    # under a name no later save could tell from anyone else's.
    data = safetensors_bytes(tensors, metadata=metadata)
    with open(filename, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _atomic_write(path: str, tensors: dict, metadata: dict) -> None:
    """Write a temporary file beside ``path``, flush it to disk, rename it onto ``path``."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint path {path!r} is a directory; give a file name")
    _remove_stale_temp_files(path)
    tmp = os.path.join(directory, f"{_temp_prefix(path)}{socket.gethostname()}.{os.getpid()}."
                                  f"{secrets.token_hex(4)}.tmp")
    try:
        _write_file(tmp, tensors, metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_directory(directory)


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _weights(inner: Model) -> dict:
    state, seen = {}, set()
    for name, tensor in inner.state_dict().items():
        if type(tensor) is not torch.Tensor:
            raise TypeError(f"save_checkpoint: parameter {name!r} is a {type(tensor).__name__} (sharded?); "
                            f"gather a full state dict before saving")
        tensor = tensor.detach().to("cpu").contiguous()
        if tensor.numel() and tensor.untyped_storage().data_ptr() in seen:
            tensor = tensor.clone()                  # tied weights: safetensors stores no shared storage
        seen.add(tensor.untyped_storage().data_ptr())
        state[name] = tensor
    return state


def save_checkpoint(path, model, optimizer: torch.optim.Optimizer | None = None, *,
                    step: int | None = None, extra: dict | None = None, ema: EMA | None = None) -> None:
    """Save ``model`` (and the optimizer, the EMA, torch's RNG state, ``step`` and ``extra``) to
    ``path`` as one file, atomically; see the module docstring.

    ``step``: None or an int >= 0; ``extra``: a JSON-serializable dict (e.g. what rebuilds the task).
    """
    path = _check_path(path)
    inner = _unwrap(model)
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
    if ema is not None and not isinstance(ema, EMA):
        raise TypeError(f"ema must be a transfusion_fast.EMA or None, got {type(ema).__name__}")
    if step is not None:
        check_int("step", step, 0)
    if extra is not None and not isinstance(extra, dict):
        raise ValueError(f"extra must be a JSON-serializable dict or None, got {describe(extra)}")
    try:
        extra_json = json.dumps(extra or {}, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ValueError(f"extra must be a JSON-serializable dict (finite numbers), got {describe(extra)}: "
                         f"{error}") from None
    tensors = _weights(inner)
    if TRAINING_STATE_KEY in tensors:
        raise ValueError(f"the model has a parameter named {TRAINING_STATE_KEY!r}, the name a checkpoint reserves")
    contents = ["weights"]
    if optimizer is not None or ema is not None:
        training = {"optimizer": None if optimizer is None else optimizer.state_dict(),
                    "ema": None if ema is None else ema.state_dict(), "rng": _rng_state()}
        buffer = io.BytesIO()
        torch.save(training, buffer)
        tensors[TRAINING_STATE_KEY] = torch.frombuffer(bytearray(buffer.getbuffer()), dtype=torch.uint8)
        contents += [name for name in ("optimizer", "ema") if training[name] is not None] + ["rng"]
    metadata = {"format": CHECKPOINT_FORMAT, "config": inner.config.to_json(), "step": json.dumps(step),
                "extra": extra_json, "contents": json.dumps(contents)}
    metadata["checksum"] = _digest(metadata, tensors)
    _atomic_write(path, tensors, metadata)
    legacy_optimizer = path + ".optim.pt"
    if os.path.isfile(legacy_optimizer):             # the previous format's, stale now
        os.remove(legacy_optimizer)


# ----------------------------------------------------------------------------------- reading
def _read_metadata(path: str) -> dict:
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path!r} is a directory, not a checkpoint file")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"checkpoint {path!r} is not a readable safetensors file (truncated, empty or not a "
                              f"checkpoint): {error}") from None
    if meta.get("format") not in (CHECKPOINT_FORMAT, LEGACY_FORMAT) or "config" not in meta:
        raise CheckpointError(f"{path!r} is not a transfusion_fast checkpoint: expected metadata format "
                              f"{CHECKPOINT_FORMAT!r} with an embedded config, got format {meta.get('format')!r}")
    return meta


def _json_field(path: str, meta: dict, field: str, default: str):
    try:
        return json.loads(meta.get(field, default))
    except json.JSONDecodeError as error:
        raise CheckpointError(f"checkpoint {path!r}: metadata field {field!r} is not valid JSON ({error}); the "
                              f"file is corrupt") from None


def _config(path: str, meta: dict) -> ModelConfig:
    d = _json_field(path, meta, "config", "null")
    try:
        return ModelConfig.from_dict(d)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"checkpoint {path!r}: the embedded ModelConfig is invalid: {error}") from None


def load_config(path) -> ModelConfig:
    """The ModelConfig embedded in checkpoint ``path`` (read from its header only)."""
    path = _check_path(path)
    return _config(path, _read_metadata(path))


def _read_tensors(path: str, meta: dict) -> dict:
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"checkpoint {path!r}: its tensors cannot be read (truncated or corrupt): "
                              f"{error}") from None
    if meta["format"] == CHECKPOINT_FORMAT:
        stored, computed = meta.get("checksum"), _digest(meta, tensors)
        if stored != computed:
            raise CheckpointError(f"checkpoint {path!r} is corrupt: its checksum does not match its contents "
                                  f"(stored {stored}, computed {computed})")
    return tensors


def _training_state(path: str, tensors: dict, map_location) -> dict:
    blob = tensors.pop(TRAINING_STATE_KEY, None)
    if blob is None:
        return {}
    try:
        return torch.load(io.BytesIO(blob.numpy().tobytes()), map_location=map_location, weights_only=True)
    except Exception as error:                       # whatever the unpickler trips on: a corrupt state
        raise CheckpointError(f"checkpoint {path!r}: the optimizer / EMA / RNG state cannot be read: "
                              f"{type(error).__name__}: {error}") from None


def _legacy_training_state(path: str, step, map_location, want: bool) -> dict:
    """The ``.optim.pt`` beside a previous-format checkpoint, if it belongs to the same save."""
    if not want:
        return {}
    opt_file = path + ".optim.pt"
    if not os.path.isfile(opt_file):
        raise CheckpointError(f"checkpoint {path!r} (previous format) has no optimizer state: {opt_file!r} does "
                              f"not exist (was it saved with optimizer=...?)")
    try:
        payload = torch.load(opt_file, map_location=map_location, weights_only=True)
    except Exception as error:                       # whatever the unpickler trips on: a corrupt state
        raise CheckpointError(f"optimizer state {opt_file!r} of checkpoint {path!r} cannot be read: "
                              f"{type(error).__name__}: {error}") from None
    if not isinstance(payload, dict) or payload.get("step") != step:
        got = payload.get("step") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"optimizer state {opt_file!r} is from step {got!r} but the weights in {path!r} are "
                              f"from step {step!r}: a save was interrupted between its two files; refusing to "
                              f"resume from the mixture")
    return {"optimizer": payload.get("optimizer"), "rng": {"cpu": payload.get("rng")}, "ema": None}


def _restore_rng(path: str, rng) -> None:
    if not isinstance(rng, dict) or not isinstance(rng.get("cpu"), torch.Tensor):
        raise CheckpointError(f"checkpoint {path!r}: its RNG state is missing or malformed")
    torch.set_rng_state(rng["cpu"])
    cuda = rng.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def load_checkpoint(path, model=None, optimizer: torch.optim.Optimizer | None = None, *,
                    map_location="cpu", ema: EMA | None = None):
    """Load checkpoint ``path`` into ``model`` (built from the embedded config when ``None``).

    Returns ``(model, info)`` with ``info = {"step", "extra", "config", "format"}``. Raises
    :class:`CheckpointError` listing every differing field when ``model.config`` differs from the
    checkpoint's config. With ``optimizer`` (and/or ``ema``) restores its state and torch's RNG
    state from the same file; the checkpoint must have been saved with them. ``map_location`` places
    the optimizer / EMA state tensors before they are loaded (the weights go into ``model``'s own).
    """
    path = _check_path(path)
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
    if ema is not None and not isinstance(ema, EMA):
        raise TypeError(f"ema must be a transfusion_fast.EMA or None, got {type(ema).__name__}")
    meta = _read_metadata(path)
    legacy = meta["format"] == LEGACY_FORMAT
    if legacy:
        warnings.warn(f"checkpoint {path!r} has the previous format {LEGACY_FORMAT!r} (no checksum, optimizer state "
                      f"in a separate file): read without verification; save it again to convert it", stacklevel=2)
        if ema is not None:
            raise CheckpointError(f"checkpoint {path!r} (previous format {LEGACY_FORMAT!r}) holds no EMA state")
    saved = _config(path, meta)
    step = _json_field(path, meta, "step", "null")
    extra = _json_field(path, meta, "extra", "{}")
    if model is not None:
        inner = _unwrap(model)
        if inner.config != saved:
            mine, theirs = inner.config.to_dict(), saved.to_dict()
            diffs = [f"{k}: checkpoint {theirs[k]!r}, model {mine[k]!r}" for k in sorted(theirs)
                     if theirs[k] != mine.get(k)]
            raise CheckpointError(f"checkpoint {path!r} was saved with a different ModelConfig; differing fields: "
                                  + "; ".join(diffs))
    tensors = _read_tensors(path, meta)
    if legacy:
        training = _legacy_training_state(path, step, map_location, optimizer is not None)
    else:
        training = _training_state(path, tensors, map_location)
    for name, wanted in (("optimizer", optimizer), ("ema", ema)):
        if wanted is not None and training.get(name) is None:
            raise CheckpointError(f"checkpoint {path!r} holds no {name} state (it was saved without {name}=...)")

    if model is None:
        model = Model(saved)
    inner = _unwrap(model)
    missing, unexpected = set(inner.state_dict()) - set(tensors), set(tensors) - set(inner.state_dict())
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path!r} does not fit the model of its own config: missing "
                              f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    try:
        inner.load_state_dict(tensors, strict=True)
        if optimizer is not None:
            optimizer.load_state_dict(training["optimizer"])
        if ema is not None:
            ema.load_state_dict(training["ema"])
    except (RuntimeError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"checkpoint {path!r} cannot be loaded into the given objects: "
                              f"{type(error).__name__}: {error}") from None
    if optimizer is not None or ema is not None:
        _restore_rng(path, training.get("rng"))
    info = {"step": step, "extra": extra, "config": saved, "format": meta["format"]}
    return model, info
