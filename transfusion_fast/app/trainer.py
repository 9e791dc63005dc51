"""The training loop shared by every task of the demo.

AdamW with linear warm-up and cosine decay to a tenth of the peak learning rate, gradient clipping,
a tqdm bar with the losses and tokens/s, periodic checkpoints (atomic, with the optimizer state and
the task's description) and resume. Defaults come from :mod:`transfusion_fast.app.presets`.
"""
from __future__ import annotations

import math
import os
import time

import torch
from tqdm.auto import tqdm

from ..checkpoint import load_checkpoint, save_checkpoint
from ..checks import MAX_SIZE, check_float, check_int
from ..config import ModelConfig
from ..model import Model
from ..pack import pack
from .presets import preset

__all__ = ["train", "CHECKPOINT_NAME", "MAX_TRAIN_SEED", "PRECISIONS", "autocast"]

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


def train(task, out_dir: str, *, steps: int | None = None, batch_size: int | None = None,
          lr: float | None = None, warmup: int | None = None, model_config: ModelConfig | None = None,
          device="cpu", checkpoint_every: int | None = None, resume: bool = False,
          progress: bool = True, seed: int = 0, precision: str = "fp32") -> tuple:
    """Train on ``task`` for ``steps`` optimizer steps in total; checkpoint to
    ``out_dir/checkpoint.safetensors`` every ``checkpoint_every`` steps and at the end.

    Every setting left ``None`` (and the model, without ``model_config``) comes from the task's
    preset (:mod:`transfusion_fast.app.presets`). With ``resume`` the checkpoint in ``out_dir``
    (weights, optimizer, step) is loaded and training continues up to ``steps``. ``precision``
    ("fp32" | "bf16" | "fp16", :data:`PRECISIONS`): the parameters and the optimizer stay fp32, the
    forward runs under ``torch.autocast`` (fp16 with a gradient scaler). Returns ``(model, history)``
    where history holds the loss curve (every step) and the throughput.
    """
    amp = autocast(device, precision)
    defaults = preset(task.name)
    steps = defaults.steps if steps is None else steps
    batch_size = defaults.batch_size if batch_size is None else batch_size
    lr = defaults.lr if lr is None else lr
    warmup = defaults.warmup if warmup is None else warmup
    checkpoint_every = defaults.checkpoint_every if checkpoint_every is None else checkpoint_every
    for name, value in (("steps", steps), ("batch_size", batch_size), ("checkpoint_every", checkpoint_every)):
        check_int(name, value, 1, MAX_SIZE)
    check_int("warmup", warmup, 0, MAX_SIZE)
    check_float("lr", lr, 0.0, low_open=True)
    check_int("seed", seed, 0, MAX_TRAIN_SEED)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, CHECKPOINT_NAME)
    torch.manual_seed(seed)
    start = 0
    if resume:
        if not os.path.exists(path):
            raise FileNotFoundError(f"--resume: no checkpoint at {path!r}")
        model, _ = load_checkpoint(path, map_location="cpu")
    else:
        model = Model(model_config or task.model_config())
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    if resume:
        _, info = load_checkpoint(path, model, optimizer, map_location=device)
        start = int(info["step"] or 0)
    extra = {"task": task.spec(), "train": {"steps": steps, "batch_size": batch_size, "lr": lr,
                                            "warmup": warmup, "seed": seed, "precision": precision}}
    # fp16's narrow exponent range underflows small gradients: scale the loss (a no-op otherwise).
    scaler = torch.amp.GradScaler(torch.device(device).type, enabled=precision == "fp16")

    history = {"loss": [], "lm_loss": [], "diffusion_loss": [], "tokens": 0, "seconds": 0.0}
    bar = tqdm(range(start, steps), initial=start, total=steps, disable=not progress, desc="train")
    for step in bar:
        t0 = time.perf_counter()
        batch = pack(task.training_samples(batch_size, step), model.config,
                     seed=seed * 1_000_003 + step, device=device)
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
        elapsed = time.perf_counter() - t0
        history["tokens"] += batch.num_tokens
        history["seconds"] += elapsed
        for key in ("loss", "lm_loss", "diffusion_loss"):
            history[key].append(float(out[key].detach()))
        bar.set_postfix(loss=f"{history['loss'][-1]:.3f}", lm=f"{history['lm_loss'][-1]:.3f}",
                        diff=f"{history['diffusion_loss'][-1]:.3f}",
                        tok_s=f"{batch.num_tokens / elapsed:,.0f}")
        if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
            save_checkpoint(path, model, optimizer, step=step + 1, extra=extra)
            recent = history["loss"][-checkpoint_every:]
            tqdm.write(f"step {step + 1}/{steps}: mean loss {sum(recent) / len(recent):.4f} over the "
                       f"last {len(recent)} steps, {history['tokens'] / history['seconds']:,.0f} tokens/s, "
                       f"checkpoint {path}")
    bar.close()
    history["tokens_per_second"] = history["tokens"] / history["seconds"] if history["seconds"] else 0.0
    return model, history
