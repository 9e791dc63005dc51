"""The training loop shared by every task of the demo.

AdamW with linear warm-up and cosine decay to a tenth of the peak learning rate, gradient clipping,
a tqdm bar with the losses and tokens/s, periodic checkpoints (atomic, with the optimizer state,
the EMA of the weights and the task's description) and resume. Defaults come from
:mod:`transfusion_fast.app.presets`.

EMA: with ``ema_decay > 0`` an :class:`~transfusion_fast.EMA` of the trainable parameters (with
warmup, so a short run's average is not dominated by the initialization) is updated after every
optimizer step and saved in the same checkpoint; :func:`load_model` swaps it in for sampling and
evaluation unless asked for the raw weights. Latent modalities: the trainer packs with
``model.codecs`` (a codec attached to the model, see ``Model.attach_codec``).
"""
from __future__ import annotations

import math
import os
import time

import torch
from tqdm.auto import tqdm

from ..checkpoint import load_checkpoint, save_checkpoint
from ..checks import MAX_SIZE, check_float, check_int
from ..codec import check_codecs
from ..config import ModelConfig
from ..ema import EMA
from ..model import Model
from ..pack import pack
from .presets import preset

__all__ = ["train", "load_model", "CHECKPOINT_NAME", "MAX_TRAIN_SEED", "PRECISIONS", "autocast"]

#: the file a run directory keeps its checkpoint in
CHECKPOINT_NAME = "checkpoint.safetensors"
#: Largest seed of a run: every pack seed ``seed * 1_000_003 + step`` stays below 2**63.
MAX_TRAIN_SEED = 2 ** 32 - 1
#: --precision: fp32 parameters always; "bf16" / "fp16" run the forward under torch.autocast
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device, precision: str):
    """The ``torch.autocast`` context of ``precision`` on ``device`` (disabled for ``"fp32"``).

    Raises ``ValueError`` naming the setting when the device cannot honour it: an unknown
    precision, a device type without autocast here, bf16 on a GPU without bf16 arithmetic.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
    device = torch.device(device)
    dtype = PRECISIONS[precision]
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"precision={precision!r} needs a cpu or cuda device (torch.autocast), got "
                         f"device {str(device)!r}; use precision='fp32'")
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ValueError(f"precision='bf16' needs a GPU with bf16 arithmetic (sm_80 or newer), got "
                         f"{torch.cuda.get_device_name(device)}; use precision='fp16'")
    return torch.autocast(device.type, dtype=dtype)


def _learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _check_ema_decay(ema_decay) -> float:
    if not isinstance(ema_decay, (int, float)) or isinstance(ema_decay, bool) or not 0 <= ema_decay < 1:
        raise ValueError(f"ema_decay must be a float in [0, 1) (0 disables the EMA), got {ema_decay!r}")
    return float(ema_decay)


def train(task, out_dir: str, *, steps: int | None = None, batch_size: int | None = None,
          lr: float | None = None, warmup: int | None = None, model_config: ModelConfig | None = None,
          device="cpu", checkpoint_every: int | None = None, resume: bool = False,
          progress: bool = True, seed: int = 0, precision: str = "fp32",
          ema_decay: float | None = None, codecs: dict | None = None) -> tuple:
    """Train on ``task`` for ``steps`` optimizer steps in total; checkpoint to
    ``out_dir/checkpoint.safetensors`` every ``checkpoint_every`` steps and at the end.

    Every setting left ``None`` (and the model, without ``model_config``) comes from the task's
    preset (:mod:`transfusion_fast.app.presets`) for the model's objective. With ``resume`` the
    checkpoint in ``out_dir`` (weights, optimizer, EMA, step) is loaded and training continues up
    to ``steps``. ``precision`` ("fp32" | "bf16" | "fp16", :data:`PRECISIONS`): the parameters, the
    optimizer and the EMA stay fp32, the forward runs under ``torch.autocast`` (fp16 with a gradient
    scaler). ``ema_decay``: the EMA of the weights (0 disables it; on resume ``None`` keeps the
    run's own, and an EMA the run did not keep starts at the resumed weights). Returns ``(model,
    history)`` where history holds the loss curve (every step), the throughput and the EMA
    (``history["ema"]``, None when disabled); the model holds the trained (raw) weights.
    ``codecs``: ``{modality name: LatentCodec}`` attached to the model (a latent modality, the
    config in latent units): every batch's images are encoded before patchify; the codecs stay
    frozen and out of the checkpoint (pass them again on resume).
    """
    amp = autocast(device, precision)
    path = os.path.join(out_dir, CHECKPOINT_NAME)
    saved_decay = None
    torch.manual_seed(seed)
    if resume:
        if not os.path.exists(path):
            raise FileNotFoundError(f"--resume: no checkpoint at {path!r}")
        model, info = load_checkpoint(path, map_location="cpu")
        # The run's own settings: its objective, and the EMA its checkpoint holds (or not).
        saved_decay = info["extra"].get("train", {}).get("ema_decay", 0.0)
    else:
        model = Model(model_config or task.model_config())
    for name, codec in check_codecs(codecs, model.config.modalities).items():
        model.attach_codec(name, codec)
    defaults = preset(task.name, model.config.objective)
    if ema_decay is None:
        ema_decay = defaults.ema_decay if saved_decay is None else saved_decay
    steps = defaults.steps if steps is None else steps
    batch_size = defaults.batch_size if batch_size is None else batch_size
    lr = defaults.lr if lr is None else lr
    warmup = defaults.warmup if warmup is None else warmup
    checkpoint_every = defaults.checkpoint_every if checkpoint_every is None else checkpoint_every
    ema_decay = _check_ema_decay(ema_decay)
    for name, value in (("steps", steps), ("batch_size", batch_size), ("checkpoint_every", checkpoint_every)):
        check_int(name, value, 1, MAX_SIZE)
    check_int("warmup", warmup, 0, MAX_SIZE)
    check_float("lr", lr, 0.0, low_open=True)
    check_int("seed", seed, 0, MAX_TRAIN_SEED)
    os.makedirs(out_dir, exist_ok=True)
    start = 0
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    ema = EMA(model, ema_decay, warmup=True) if ema_decay > 0 else None
    if resume:
        saved_ema = ema if saved_decay else None
        _, info = load_checkpoint(path, model, optimizer, map_location=device, ema=saved_ema)
        start = int(info["step"] or 0)
        if ema is not None and saved_ema is None:
            ema = EMA(model, ema_decay, warmup=True)    # the run kept none: start at the resumed weights
        elif ema is not None:
            ema.decay = ema_decay                       # the saved averages go on with the decay asked for
    extra = {"task": task.spec(), "train": {"steps": steps, "batch_size": batch_size, "lr": lr,
                                            "warmup": warmup, "seed": seed, "precision": precision,
                                            "ema_decay": ema_decay}}
    # fp16's narrow exponent range underflows small gradients: scale the loss (a no-op otherwise).
    scaler = torch.amp.GradScaler(torch.device(device).type, enabled=precision == "fp16")

    history = {"loss": [], "lm_loss": [], "diffusion_loss": [], "tokens": 0, "seconds": 0.0}
    bar = tqdm(range(start, steps), initial=start, total=steps, disable=not progress, desc="train")
    for step in bar:
        t0 = time.perf_counter()
        batch = pack(task.training_samples(batch_size, step), model.config,
                     seed=seed * 1_000_003 + step, device=device, codecs=model.codecs)
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, steps, lr, warmup)
        with amp:
            out = model(batch)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(out["loss"]).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        if ema is not None:
            ema.update(model)
        elapsed = time.perf_counter() - t0
        history["tokens"] += batch.num_tokens
        history["seconds"] += elapsed
        for key in ("loss", "lm_loss", "diffusion_loss"):
            history[key].append(float(out[key].detach()))
        bar.set_postfix(loss=f"{history['loss'][-1]:.3f}", lm=f"{history['lm_loss'][-1]:.3f}",
                        diff=f"{history['diffusion_loss'][-1]:.3f}",
                        tok_s=f"{batch.num_tokens / elapsed:,.0f}")
        if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
            save_checkpoint(path, model, optimizer, step=step + 1, extra=extra, ema=ema)
            recent = history["loss"][-checkpoint_every:]
            tqdm.write(f"step {step + 1}/{steps}: mean loss {sum(recent) / len(recent):.4f} over the "
                       f"last {len(recent)} steps, {history['tokens'] / history['seconds']:,.0f} tokens/s, "
                       f"checkpoint {path}")
    bar.close()
    history["tokens_per_second"] = history["tokens"] / history["seconds"] if history["seconds"] else 0.0
    history["ema"] = ema
    return model, history


def load_model(path: str, *, use_ema: bool = True, device="cpu") -> tuple:
    """``(model, info)`` from a checkpoint written by :func:`train`, with the EMA weights in the
    model when the run kept an EMA and ``use_ema`` (the default for sampling and evaluation), else
    the trained weights. ``info["weights"]`` says which: ``"ema"`` or ``"raw"``."""
    model, info = load_checkpoint(path, map_location="cpu")
    decay = info["extra"].get("train", {}).get("ema_decay", 0.0)
    weights = "raw"
    if use_ema and decay:
        ema = EMA(model, decay, warmup=True)
        load_checkpoint(path, model, map_location="cpu", ema=ema)
        ema.copy_to(model)
        weights = "ema"
    info["weights"] = weights
    return model.to(device), info
