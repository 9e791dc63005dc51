"""The tasks of the demo: what to train on, the model config that fits, how to sample and evaluate.

Two kinds, both offline:

* ``digits`` — text ↔ image. Each training batch packs caption → image samples
  (``BOS caption BOI patches EOI EOS``, captions varied) and image → caption samples
  (``BOS BOI patches EOI "a handwritten seven" EOS``), so the LM loss, the diffusion loss, causal
  text attention and bidirectional span attention are all exercised in one packed sequence.
* ``sine`` / ``csv`` — time series: one window of L frames × F features is one bidirectional span
  (``BOS BOI frames EOI EOS``), generated unconditionally (TransFusion, Sikder et al. 2023).

A *task* object knows its data, the model config that fits it, how to draw a training batch,
how to sample and how to evaluate; :func:`transfusion_fast.app.trainer.train` is the loop shared by
all tasks. Everything needed to rebuild a task is its :meth:`spec`, stored in the checkpoint's
``extra`` metadata. Defaults come from :mod:`transfusion_fast.app.presets`.
"""
from __future__ import annotations

import json
import os
import random
import time

import numpy as np
import torch

from ..config import ModalityConfig, ModelConfig
from ..model import Model
from . import data as data_mod
from . import metrics
from .presets import TASKS, preset
from .tokenizer import BOI, BOS, EOI, EOS, PAD, VOCAB_SIZE, ByteTokenizer
from .trainer import load_model

__all__ = ["DigitsTask", "SeriesTask", "make_task", "task_from_checkpoint"]


def _base_config(**overrides) -> dict:
    return dict(vocab_size=VOCAB_SIZE, bos_id=BOS, eos_id=EOS, boi_id=BOI, eoi_id=EOI, pad_id=PAD,
                **overrides)


def _model_size(task: str, dim, depth, heads) -> tuple[int, int, int]:
    defaults = preset(task)
    return (defaults.dim if dim is None else dim, defaults.depth if depth is None else depth,
            defaults.heads if heads is None else heads)


# -------------------------------------------------------------------------------------- digits
class DigitsTask:
    """Captioned handwritten digits (scikit-learn's 8×8 set, optionally upsampled to 16×16)."""

    name = "digits"

    def __init__(self, image_size: int | None = None, seed: int = 0, caption_fraction: float = 0.5):
        image_size = preset(self.name).image_size if image_size is None else image_size
        if not 0.0 <= caption_fraction <= 1.0:
            raise ValueError(f"caption_fraction must lie in [0, 1], got {caption_fraction!r}")
        self.image_size, self.seed, self.caption_fraction = image_size, seed, caption_fraction
        self.data = data_mod.load_digits_data(image_size, seed=seed)
        self.tokenizer = ByteTokenizer()

    def spec(self) -> dict:
        """What :func:`make_task` needs to rebuild this task (stored in checkpoints)."""
        return {"task": self.name, "image_size": self.image_size, "seed": self.seed,
                "caption_fraction": self.caption_fraction}

    def model_config(self, dim: int | None = None, depth: int | None = None,
                     heads: int | None = None, objective: str = "ddpm") -> ModelConfig:
        """The model for this task; ``None`` takes the size from the task's preset. ``objective``:
        ``"ddpm"`` (v-prediction) or ``"flow"`` (rectified flow)."""
        dim, depth, heads = _model_size(self.name, dim, depth, heads)
        patch = 2 if self.image_size == 8 else 4        # 16 patches either way
        return ModelConfig(**_base_config(
            dim=dim, depth=depth, n_heads=heads, max_seq_len=512, prediction="v", objective=objective,
            modalities=(ModalityConfig("image", "image", channels=1, patch_size=patch,
                                       max_size=self.image_size),)))

    def _text(self, caption: str) -> torch.Tensor:
        return torch.tensor(self.tokenizer.encode(caption), dtype=torch.long)

    def training_samples(self, batch_size: int, step: int) -> list:
        """``batch_size`` samples for training step ``step`` (deterministic given seed and step)."""
        rng = random.Random(self.seed * 1_000_003 + step)
        images, labels = self.data.train_images, self.data.train_labels
        samples = []
        for _ in range(batch_size):
            i = rng.randrange(len(labels))
            label = int(labels[i])
            if rng.random() < self.caption_fraction:
                samples.append([images[i], self._text(data_mod.caption_for(label))])
            else:
                samples.append([self._text(data_mod.caption_for(label, rng)), images[i]])
        return samples

    # ------------------------------------------------------------------ sampling
    def generate_images(self, model: Model, per_digit: int, steps: int, cfg_scale: float, seed: int,
                        chunk: int = 100, progress: bool = False, sampler: str | None = None):
        """``per_digit`` images per digit, the captions cycling through every template;
        returns images ``(10·per_digit, 1, S, S)``, requested labels and the captions used."""
        captions, labels = [], []
        for k in range(per_digit):
            for label in range(10):
                template = data_mod.CAPTION_TEMPLATES[k % len(data_mod.CAPTION_TEMPLATES)]
                captions.append(template.format(w=data_mod.DIGIT_WORDS[label], d=label))
                labels.append(label)
        shape = (1, self.image_size, self.image_size)
        images = []
        for start in range(0, len(captions), chunk):
            prompts = [[torch.tensor(self.tokenizer.encode(c) + [BOI], dtype=torch.long)]
                       for c in captions[start:start + chunk]]
            outs = model.generate(prompts, max_new_tokens=0, num_inference_steps=steps,
                                  cfg_scale=cfg_scale, seed=seed + start, span_shape=shape,
                                  progress=progress, sampler=sampler)
            images.extend(_first_span(o, shape) for o in outs)
        return torch.stack(images), torch.tensor(labels), captions

    def caption_images(self, model: Model, images: torch.Tensor, seed: int, chunk: int = 200,
                       max_new_tokens: int = 32) -> list:
        """Greedy captions of ``images`` ``(N, 1, S, S)``."""
        captions = []
        for start in range(0, len(images), chunk):
            prompts = [[img] for img in images[start:start + chunk]]
            outs = model.generate(prompts, max_new_tokens=max_new_tokens, temperature=0.0,
                                  seed=seed + start, progress=False)
            captions.extend(self.tokenizer.decode(torch.cat([t for t in o if not t.is_floating_point()])
                                                  if o else []).strip() for o in outs)
        return captions

    def sample(self, model: Model, out_dir: str, *, per_digit: int | None = None, steps: int | None = None,
               cfg_scale: float | None = None, seed: int = 0, progress: bool = True,
               held_out: int | None = None, sampler: str | None = None, weights: str = "raw") -> dict:
        """Generate ``per_digit`` images for every digit and a caption for every held-out image
        (the first ``held_out`` of them when given); write ``samples.png`` (one row per digit),
        ``captions.txt`` and ``samples.pt``. ``None`` takes the preset's value (of the model's
        objective); ``weights`` ("ema" or "raw") is recorded with the settings."""
        defaults = preset(self.name, model.config.objective)
        per_digit = defaults.per_digit if per_digit is None else per_digit
        steps = defaults.sample_steps if steps is None else steps
        cfg_scale = defaults.cfg_scale if cfg_scale is None else cfg_scale
        sampler = defaults.sampler if sampler is None else sampler
        os.makedirs(out_dir, exist_ok=True)
        t0 = time.perf_counter()
        images, labels, captions = self.generate_images(model, per_digit, steps, cfg_scale, seed,
                                                        progress=progress, sampler=sampler)
        t_images = time.perf_counter() - t0
        order = torch.argsort(labels, stable=True)                   # rows: digit 0 … 9
        metrics.digit_grid_png(os.path.join(out_dir, "samples.png"), images[order], rows=10)
        t0 = time.perf_counter()
        count = len(self.data.test_images) if held_out is None else held_out
        if not 1 <= count <= len(self.data.test_images):
            raise ValueError(f"held_out must lie in [1, {len(self.data.test_images)}], got {held_out!r}")
        generated_captions = self.caption_images(model, self.data.test_images[:count], seed)
        caption_labels = self.data.test_labels[:count]
        t_captions = time.perf_counter() - t0
        with open(os.path.join(out_dir, "captions.txt"), "w") as handle:
            for i, (caption, label) in enumerate(zip(generated_captions, caption_labels.tolist())):
                handle.write(f"held-out #{i}\ttrue: {data_mod.DIGIT_WORDS[label]}\tgenerated: {caption}\n")
        torch.save({"images": images, "labels": labels, "prompts": captions,
                    "captions": generated_captions, "caption_labels": caption_labels,
                    "settings": {"per_digit": per_digit, "steps": steps, "cfg_scale": cfg_scale,
                                 "seed": seed, "sampler": sampler, "objective": model.config.objective,
                                 "weights": weights}}, os.path.join(out_dir, "samples.pt"))
        return {"images": len(images), "image_seconds": t_images, "captions": len(generated_captions),
                "caption_seconds": t_captions}

    def evaluate(self, out_dir: str) -> dict:
        """Conditional accuracy, captioning accuracy and the Fréchet distance of ``samples.pt``."""
        saved = torch.load(os.path.join(out_dir, "samples.pt"), weights_only=False)
        classifier = metrics.digit_classifier(self.seed)
        real = self.data.test_images
        return {
            "task": self.name,
            "conditional_accuracy": metrics.conditional_accuracy(classifier, saved["images"],
                                                                 saved["labels"]),
            "captioning_accuracy": metrics.captioning_accuracy(saved["captions"], saved["caption_labels"]),
            "frechet_distance": metrics.frechet_distance(classifier.features(real),
                                                         classifier.features(saved["images"])),
            "classifier_accuracy_on_held_out": classifier.accuracy(real, self.data.test_labels),
            "frechet_distance_train_vs_held_out": metrics.frechet_distance(
                classifier.features(real), classifier.features(self.data.train_images)),
            "generated_images": int(len(saved["images"])),
            "captioned_images": int(len(saved["captions"])),
            "sampler": dict({"sampler": "ddim"}, **saved["settings"]),
        }


def _first_span(items: list, shape) -> torch.Tensor:
    for item in items:
        if item.is_floating_point():
            return item.reshape(shape)
    raise RuntimeError(f"generation returned no span (items: {[tuple(i.shape) for i in items]})")


# ---------------------------------------------------------------------------------- time series
class SeriesTask:
    """Unconditional time-series windows: the sine benchmark or sliding windows of a CSV file."""

    def __init__(self, kind: str = "sine", length: int | None = None, features: int = 5,
                 num_samples: int | None = None, data_path: str | None = None, seed: int = 0):
        if kind not in ("sine", "csv"):
            raise ValueError(f"kind must be 'sine' or 'csv', got {kind!r}")
        length = preset(kind).length if length is None else length
        num_samples = preset(kind).num_samples if num_samples is None else num_samples
        if kind == "csv" and not data_path:
            raise ValueError("--task csv needs --data FILE.csv")
        if not isinstance(length, int) or length < 2:
            raise ValueError(f"--length must be an int >= 2 (frames per window), got {length!r}")
        if kind == "sine" and (not isinstance(num_samples, int) or num_samples < data_mod.MIN_WINDOWS):
            raise ValueError(f"--num-samples must be an int >= {data_mod.MIN_WINDOWS} (windows to split into "
                             f"training and held-out sets), got {num_samples!r}")
        self.name, self.length, self.seed, self.data_path = kind, length, seed, data_path
        self.num_samples = num_samples
        self.scaler = None
        if kind == "sine":
            windows = data_mod.sine_windows(num_samples, length, features, seed=seed)
        else:
            windows, self.scaler = data_mod.csv_windows(data_path, length)
        self.features = int(windows.shape[2])
        self.train_windows, self.test_windows = data_mod.split_windows(windows, seed=seed)
        self.train_model = torch.from_numpy(data_mod.to_model_range(self.train_windows))

    def spec(self) -> dict:
        return {"task": self.name, "length": self.length, "features": self.features,
                "num_samples": self.num_samples, "data_path": self.data_path, "seed": self.seed}

    def patch_size(self) -> int:
        """Frames per span row: the largest of 8, 4, 2, 1 that divides L and keeps >= 12 rows."""
        for p in (8, 4, 2):
            if self.length % p == 0 and self.length // p >= 12:
                return p
        return 1

    def model_config(self, dim: int | None = None, depth: int | None = None,
                     heads: int | None = None, objective: str = "ddpm") -> ModelConfig:
        """The model for this task; ``None`` takes the size from the task's preset."""
        dim, depth, heads = _model_size(self.name, dim, depth, heads)
        return ModelConfig(**_base_config(
            dim=dim, depth=depth, n_heads=heads, cfg_drop_prob=0.0, conditioning="adaln_zero", prediction="v",
            objective=objective,
            max_seq_len=max(512, self.length + 8),
            modalities=(ModalityConfig("series", "sequence", channels=self.features,
                                       patch_size=self.patch_size(), max_size=self.length),)))

    def training_samples(self, batch_size: int, step: int) -> list:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        idx = torch.randint(0, len(self.train_model), (batch_size,), generator=gen)
        return [[("series", self.train_model[i])] for i in idx.tolist()]

    def generate_windows(self, model: Model, count: int, steps: int, seed: int, chunk: int = 200,
                         progress: bool = False, sampler: str | None = None) -> np.ndarray:
        """``count`` generated windows ``(count, L, F)`` in [0, 1]."""
        shape = (self.length, self.features)
        out = []
        for start in range(0, count, chunk):
            prompts = [[torch.tensor([BOI], dtype=torch.long)] for _ in range(min(chunk, count - start))]
            gens = model.generate(prompts, max_new_tokens=0, num_inference_steps=steps, cfg_scale=1.0,
                                  seed=seed + start, span_shape=shape, progress=progress, sampler=sampler)
            out.extend(_first_span(g, shape) for g in gens)
        windows = data_mod.from_model_range(torch.stack(out).clamp(-1, 1)).numpy()
        return windows.astype(np.float32)

    def sample(self, model: Model, out_dir: str, *, count: int | None = None, steps: int | None = None,
               seed: int = 0, progress: bool = True, sampler: str | None = None, weights: str = "raw",
               **_unused) -> dict:
        """Generate as many windows as the held-out set holds (or ``count``); write
        ``samples.npy`` ([0, 1]) and, for CSV data, ``samples_original_units.npy``. ``steps`` and
        ``sampler``: default the preset's (of the model's objective)."""
        defaults = preset(self.name, model.config.objective)
        steps = defaults.sample_steps if steps is None else steps
        sampler = defaults.sampler if sampler is None else sampler
        os.makedirs(out_dir, exist_ok=True)
        count = count or len(self.test_windows)
        t0 = time.perf_counter()
        windows = self.generate_windows(model, count, steps, seed, progress=progress, sampler=sampler)
        np.save(os.path.join(out_dir, "samples.npy"), windows)
        if self.scaler is not None:
            np.save(os.path.join(out_dir, "samples_original_units.npy"), self.scaler.inverse(windows))
        with open(os.path.join(out_dir, "sample_settings.json"), "w") as handle:
            json.dump({"steps": steps, "seed": seed, "count": count, "sampler": sampler, "weights": weights}, handle)
        return {"windows": count, "seconds": time.perf_counter() - t0}

    def evaluate(self, out_dir: str, iterations: int | None = None, hidden: int = 16) -> dict:
        """LDS and LPS of ``samples.npy`` against the held-out windows, and ``pca.png``;
        ``iterations`` of the metric networks' training, default the preset's."""
        iterations = preset(self.name).metric_iterations if iterations is None else iterations
        synthetic = np.load(os.path.join(out_dir, "samples.npy"))
        real = self.test_windows
        metrics.pca_png(os.path.join(out_dir, "pca.png"), real, synthetic)
        rng = np.random.default_rng(self.seed)
        real_train = self.train_windows[rng.permutation(len(self.train_windows))[:len(synthetic)]]
        lps = metrics.predictive_score(synthetic, real, iterations=iterations, hidden=hidden, seed=self.seed)
        lps_real = metrics.predictive_score(real_train, real, iterations=iterations, hidden=hidden,
                                            seed=self.seed)
        return {
            "task": self.name, "length": self.length, "features": self.features,
            "lds": metrics.discriminative_score(real, synthetic, iterations=iterations, hidden=hidden,
                                                seed=self.seed),
            "lps": lps, "lps_real_data": lps_real, "lps_ratio": lps / lps_real,
            "lds_real_vs_real": metrics.discriminative_score(real, real_train, iterations=iterations,
                                                             hidden=hidden, seed=self.seed),
            "synthetic_windows": int(len(synthetic)), "held_out_windows": int(len(real)),
            "metric_settings": {"iterations": iterations, "hidden": hidden},
        }


# ---------------------------------------------------------------------------------- task lookup
def make_task(spec: dict):
    """The task described by ``spec`` (``{"task": "digits" | "sine" | "csv", ...}``)."""
    spec = dict(spec)
    kind = spec.pop("task", None)
    if kind == "digits":
        return DigitsTask(**{k: spec[k] for k in ("image_size", "seed", "caption_fraction") if k in spec})
    if kind in ("sine", "csv"):
        keys = ("length", "features", "num_samples", "data_path", "seed")
        return SeriesTask(kind, **{k: spec[k] for k in keys if k in spec and spec[k] is not None})
    raise ValueError(f"task must be one of {TASKS}, got {kind!r}")


def task_from_checkpoint(path: str, device="cpu", use_ema: bool = True):
    """``(task, model, info)`` rebuilt from a checkpoint written by
    :func:`transfusion_fast.app.trainer.train`, with its EMA weights when it kept an EMA and
    ``use_ema`` (``info["weights"]``: "ema" or "raw")."""
    model, info = load_model(path, use_ema=use_ema)
    spec = info["extra"].get("task")
    if not spec:
        raise ValueError(f"checkpoint {path!r} holds no task description (it was not written by "
                         f"transfusion-fast train)")
    return make_task(spec), model.to(device), info
