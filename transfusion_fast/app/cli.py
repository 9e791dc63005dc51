"""``transfusion-fast train | sample | eval | demo`` (also ``python -m transfusion_fast ...``).

* ``train``: train on ``--task digits | sine | csv`` (``--data FILE.csv`` for csv) into ``--out``;
  periodic checkpoints (``--checkpoint-every``), ``--resume`` continues from ``--out``.
* ``sample``: from the checkpoint in ``--out``: digits → ``samples.png`` (one row per digit),
  ``captions.txt`` (captions of the held-out images), ``samples.pt``; series → ``samples.npy``.
* ``eval``: the metrics of those samples → ``metrics.json`` (and ``pca.png`` for series).
* ``demo``: train + sample + eval with the defaults of the task, then print the metrics.

``--objective flow`` trains with rectified flow (and the task's flow preset: Euler sampling in
fewer steps); ``--sampler`` picks the sampler (``ddim``/``ddpm`` for DDPM, ``euler``/``heun`` for
flow). Training keeps an EMA of the weights (``--ema-decay``, 0 disables it); sampling uses the
EMA weights unless ``--raw-weights``.

``--backend auto | triton | reference`` goes through :func:`transfusion_fast.set_backend`. Every
option left out takes the task's preset (:mod:`transfusion_fast.app.presets`, the registry that
``make demo`` runs with too).

The main-job commands (figures in the README)::

    python -m transfusion_fast demo                                   # digits, text <-> image
    python -m transfusion_fast demo --objective flow --out runs/flow   # the same, rectified flow
    python -m transfusion_fast demo --task sine --length 100 --out runs/sine100
    python -m transfusion_fast demo --task csv --data prices.csv --length 24 --out runs/prices
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from ..backend import BACKENDS, set_backend
from ..checkpoint import load_checkpoint
from .presets import OBJECTIVES, TASKS, preset
from .tasks import DigitsTask, SeriesTask, make_task, task_from_checkpoint
from .trainer import CHECKPOINT_NAME, train

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="transfusion-fast", description="Train, sample and evaluate "
                                     "Transfusion models on the main-job data (digits, sine, CSV).",
                                     epilog="Options left out take the task's preset "
                                     "(transfusion_fast/app/presets.py).")
    commands = parser.add_subparsers(dest="command", required=True)

    def common(p, with_task: bool):
        p.add_argument("--out", default="runs/main", help="run directory (checkpoint, samples, metrics)")
        p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
        p.add_argument("--backend", default="auto", choices=BACKENDS, help="kernel backend")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
        # One thread by default: the demo's ops are small, and with more threads each step
        # spends its time in threads waiting on each other, most of all on a shared machine.
        p.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default 1)")
        if with_task:
            p.add_argument("--task", default=TASKS[0], choices=TASKS)
            p.add_argument("--data", default=None, help="CSV file for --task csv (rows = time)")
            p.add_argument("--length", type=int, default=None, help="window length L (time series)")
            p.add_argument("--num-samples", type=int, default=None, help="sine windows to generate")
            p.add_argument("--image-size", type=int, default=None, choices=(8, 16), help="digit size")

    def training(p):
        p.add_argument("--steps", type=int, default=None, help="total optimizer steps")
        p.add_argument("--batch-size", type=int, default=None, help="samples packed per step")
        p.add_argument("--lr", type=float, default=None, help="peak learning rate")
        p.add_argument("--dim", type=int, default=None)
        p.add_argument("--depth", type=int, default=None)
        p.add_argument("--heads", type=int, default=None)
        p.add_argument("--checkpoint-every", type=int, default=None)
        p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
        p.add_argument("--objective", default=None, choices=OBJECTIVES,
                       help="training objective of the spans (default ddpm; flow: rectified flow)")
        p.add_argument("--ema-decay", type=float, default=None,
                       help="decay of the EMA of the weights used for sampling (0 disables it)")

    def sampling(p):
        p.add_argument("--sample-steps", type=int, default=None, help="DDIM steps per span")
        p.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance (digits)")
        p.add_argument("--per-digit", type=int, default=None, help="generated images per digit")
        p.add_argument("--held-out", type=int, default=None,
                       help="caption only the first N held-out images (default: all 359)")
        p.add_argument("--sampler", default=None, choices=("ddim", "ddpm", "euler", "heun"),
                       help="span sampler: ddim | ddpm (objective ddpm), euler | heun (objective flow)")
        p.add_argument("--raw-weights", action="store_true",
                       help="sample with the trained weights instead of their EMA")

    p = commands.add_parser("train", help="train a model")
    common(p, True)
    training(p)
    p = commands.add_parser("sample", help="sample from the checkpoint in --out")
    common(p, False)
    sampling(p)
    p = commands.add_parser("eval", help="evaluate the samples in --out, write metrics.json")
    common(p, False)
    p.add_argument("--metric-iterations", type=int, default=None,
                   help="training iterations of the LDS/LPS networks (time series)")
    p = commands.add_parser("demo", help="train, sample, evaluate and print the metrics")
    common(p, True)
    training(p)
    sampling(p)
    p.add_argument("--metric-iterations", type=int, default=None)
    return parser


def _setting(args, name: str, task_name: str, objective: str | None = None):
    """The option ``name`` as given on the command line, else the task's preset for ``objective``
    (default: ``--objective``, else ddpm)."""
    value = getattr(args, name, None)
    objective = objective or getattr(args, "objective", None) or "ddpm"
    return getattr(preset(task_name, objective), name) if value is None else value


def _make_task(args):
    if args.task == "digits":
        return DigitsTask(image_size=args.image_size, seed=args.seed)
    return SeriesTask(args.task, length=args.length, num_samples=args.num_samples,
                      data_path=args.data, seed=args.seed)


def _checkpoint_path(args) -> str:
    path = os.path.join(args.out, CHECKPOINT_NAME)
    if not os.path.exists(path):
        raise SystemExit(f"no checkpoint at {path!r}: run `transfusion-fast train --out {args.out}` first")
    return path


def cmd_train(args) -> dict:
    task = _make_task(args)
    steps = _setting(args, "steps", task.name)
    config = task.model_config(dim=_setting(args, "dim", task.name), depth=_setting(args, "depth", task.name),
                               heads=_setting(args, "heads", task.name),
                               objective=_setting(args, "objective", task.name))
    t0 = time.perf_counter()
    model, history = train(task, args.out, steps=steps, batch_size=_setting(args, "batch_size", task.name),
                           lr=_setting(args, "lr", task.name), model_config=config, device=args.device,
                           checkpoint_every=_setting(args, "checkpoint_every", task.name),
                           resume=args.resume, progress=not args.no_progress, seed=args.seed,
                           ema_decay=args.ema_decay if args.resume else _setting(args, "ema_decay", task.name))
    summary = {"task": task.name, "steps": steps, "objective": model.config.objective,
               "ema_decay": 0.0 if history["ema"] is None else history["ema"].decay,
               "parameters": model.num_parameters(), "train_seconds": time.perf_counter() - t0,
               "tokens_per_second": history["tokens_per_second"],
               "final_loss": history["loss"][-1] if history["loss"] else None}
    with open(os.path.join(args.out, "train_summary.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    print(f"trained {summary['parameters']:,} parameters for {summary['steps']} steps in "
          f"{summary['train_seconds']:.0f} s ({summary['tokens_per_second']:,.0f} tokens/s) -> "
          f"{_checkpoint_path(args)}")
    return summary


def cmd_sample(args) -> dict:
    task, model, info = task_from_checkpoint(_checkpoint_path(args), device=args.device,
                                             use_ema=not args.raw_weights)
    objective = model.config.objective
    kwargs = {"steps": _setting(args, "sample_steps", task.name, objective), "seed": args.seed,
              "progress": not args.no_progress, "sampler": _setting(args, "sampler", task.name, objective),
              "weights": info["weights"]}
    if task.name == "digits":
        kwargs.update(per_digit=_setting(args, "per_digit", task.name, objective),
                      cfg_scale=_setting(args, "cfg_scale", task.name, objective),
                      held_out=args.held_out)
    result = task.sample(model, args.out, **kwargs)
    print(f"sampled with the {info['weights']} weights into {args.out}: "
          + ", ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
    return result


def cmd_eval(args) -> dict:
    _, info = load_checkpoint(_checkpoint_path(args))
    task = make_task(info["extra"]["task"])
    t0 = time.perf_counter()
    if task.name == "digits":
        result = task.evaluate(args.out)
    else:
        result = task.evaluate(args.out, iterations=_setting(args, "metric_iterations", task.name))
    result["eval_seconds"] = time.perf_counter() - t0
    summary_path = os.path.join(args.out, "train_summary.json")
    if os.path.exists(summary_path):
        with open(summary_path) as handle:
            result["train"] = json.load(handle)
    with open(os.path.join(args.out, "metrics.json"), "w") as handle:
        json.dump(result, handle, indent=2)
    print(json.dumps(result, indent=2))
    return result


def cmd_demo(args) -> dict:
    t0 = time.perf_counter()
    cmd_train(args)
    cmd_sample(args)
    result = cmd_eval(args)
    print(f"demo finished in {time.perf_counter() - t0:.0f} s; metrics in "
          f"{os.path.join(args.out, 'metrics.json')}")
    return result


COMMANDS = {"train": cmd_train, "sample": cmd_sample, "eval": cmd_eval, "demo": cmd_demo}


def main(argv=None) -> int:
    """Entry point of the ``transfusion-fast`` console script."""
    args = build_parser().parse_args(argv)
    set_backend(args.backend)
    if args.threads < 1:
        raise SystemExit(f"--threads must be a positive int, got {args.threads}")
    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available on this machine")
    COMMANDS[args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
