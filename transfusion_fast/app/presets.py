"""The one registry of run defaults: for each task, the data, model size, optimizer budget and
sampler settings a run uses unless told otherwise.

The CLI (``python -m transfusion_fast train | sample | eval | demo``, hence ``make demo``), the
tasks (:mod:`~transfusion_fast.app.tasks`) and the trainer (:mod:`~transfusion_fast.app.trainer`)
all read their defaults from here; nothing else holds a default of a run. The figures published
for the demo (README, docs/) were measured with these presets.

Each task has a DDPM preset (:data:`PRESETS`, the default) and a rectified-flow variant
(``--objective flow``: :data:`FLOW_PRESETS`, or the DDPM preset with the flow objective and the
Euler sampler where a task has none of its own).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

__all__ = ["Preset", "PRESETS", "FLOW_PRESETS", "TASKS", "OBJECTIVES", "preset"]


@dataclass(frozen=True)
class Preset:
    """The defaults of one task's run."""

    # model
    dim: int
    depth: int
    heads: int
    # optimizer: AdamW, linear warm-up then cosine decay to a tenth of the peak
    steps: int
    batch_size: int
    lr: float
    warmup: int = 50
    checkpoint_every: int = 200
    # sampling: sampler steps per span, classifier-free guidance scale, images per digit
    sample_steps: int = 50
    cfg_scale: float = 1.0
    per_digit: int = 20
    sampler: str = "ddim"        # "ddim" | "ddpm" (objective "ddpm"), "euler" | "heun" (objective "flow")
    # training objective, and the decay of the EMA of the weights that sampling uses (0: no EMA;
    # the trainer warms it up, min(decay, (1 + n) / (10 + n)) after n updates)
    objective: str = "ddpm"
    ema_decay: float = 0.999
    # evaluation: training iterations of the LDS / LPS networks (time series)
    metric_iterations: int = 300
    # data
    image_size: int = 8          # digits: 8 (the bundled images) or 16 (upsampled)
    length: int = 100            # time series: frames per window
    num_samples: int = 2000      # sine: windows generated


# The digits demo samples with fewer DDIM steps than the paper's 250 and guidance 3 instead of 5:
# enough for 8x8 images, and it keeps the demo within minutes on a CPU. The time-series tasks are
# unconditional (no caption), so they run without guidance.
PRESETS = {
    "digits": Preset(dim=96, depth=3, heads=3, steps=3000, batch_size=32, lr=2e-3, cfg_scale=3.0),
    "sine": Preset(dim=64, depth=2, heads=4, steps=2000, batch_size=32, lr=2e-3),
}
PRESETS["csv"] = PRESETS["sine"]
TASKS = tuple(PRESETS)
OBJECTIVES = ("ddpm", "flow")

# Rectified flow samples the digits in 25 Euler steps (the ODE is straight enough at this size).
FLOW_PRESETS = {
    "digits": replace(PRESETS["digits"], objective="flow", sampler="euler", sample_steps=25),
}


def preset(task: str, objective: str = "ddpm") -> Preset:
    """The preset of ``task`` (one of :data:`TASKS`) for ``objective`` (one of :data:`OBJECTIVES`)."""
    if task not in PRESETS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if objective == "flow":
        return FLOW_PRESETS.get(task) or replace(PRESETS[task], objective="flow", sampler="euler")
    return PRESETS[task]
