"""``transfusion-fast train | sample | eval | demo`` (also ``python -m transfusion_fast ...``).

* ``train``: train on ``--task digits | sine | csv`` (``--data FILE.csv`` for csv) into ``--out``;
  periodic checkpoints (``--checkpoint-every``), ``--resume`` continues from ``--out``.
* ``sample``: from the checkpoint in ``--out``: digits → ``samples.png`` (one row per digit),
  ``captions.txt`` (captions of the held-out images), ``samples.pt``; series → ``samples.npy``.
* ``eval``: the metrics of those samples → ``metrics.json`` (and ``pca.png`` for series).
* ``demo``: train + sample + eval with the defaults of the task, then print the metrics.

``--backend auto | triton | reference`` goes through :func:`transfusion_fast.set_backend`;
``--precision fp32 | bf16 | fp16`` runs training and sampling under ``torch.autocast`` (fp32
parameters; :func:`transfusion_fast.app.trainer.autocast`). A failure on the input prints one line
naming the option or the file and exits with status 2 (``--debug`` or ``TRANSFUSION_FAST_DEBUG=1``
shows the traceback instead). Every
option left out takes the task's preset (:mod:`transfusion_fast.app.presets`, the registry that
``make demo`` runs with too).

The main-job commands (figures in the README)::

    python -m transfusion_fast demo                                   # digits, text <-> image
    python -m transfusion_fast demo --task sine --length 100 --out runs/sine100
    python -m transfusion_fast demo --task csv --data prices.csv --length 24 --out runs/prices
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time

import torch

from ..backend import BACKENDS, set_backend
from ..checkpoint import load_checkpoint
from ..checks import MAX_SIZE
from .presets import TASKS, preset
from .tasks import DigitsTask, SeriesTask, make_task, task_from_checkpoint
from .trainer import CHECKPOINT_NAME, MAX_TRAIN_SEED, PRECISIONS, autocast, train

__all__ = ["main", "build_parser"]


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line, like every other error of the CLI."""

    def error(self, message):
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="transfusion-fast", description="Train, sample and evaluate "
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
        p.add_argument("--debug", action="store_true",
                       help=f"show the traceback of an error (also {DEBUG_ENV}=1)")
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
        precision(p)

    def precision(p):
        p.add_argument("--precision", default="fp32", choices=tuple(PRECISIONS),
                       help="fp32, or bf16 / fp16 under torch.autocast with fp32 parameters")

    def sampling(p):
        p.add_argument("--sample-steps", type=int, default=None, help="DDIM steps per span")
        p.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance (digits)")
        p.add_argument("--per-digit", type=int, default=None, help="generated images per digit")
        p.add_argument("--held-out", type=int, default=None,
                       help="caption only the first N held-out images (default: all 359)")

    p = commands.add_parser("train", help="train a model")
    common(p, True)
    training(p)
    p = commands.add_parser("sample", help="sample from the checkpoint in --out")
    common(p, False)
    sampling(p)
    precision(p)
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


def _setting(args, name: str, task_name: str):
    """The option ``name`` as given on the command line, else the task's preset."""
    value = getattr(args, name, None)
    return getattr(preset(task_name), name) if value is None else value


def _make_task(args):
    if args.task == "digits":
        return DigitsTask(image_size=args.image_size, seed=args.seed)
    return SeriesTask(args.task, length=args.length, num_samples=args.num_samples,
                      data_path=args.data, seed=args.seed)


def _checkpoint_path(args) -> str:
    path = os.path.join(args.out, CHECKPOINT_NAME)
    if not os.path.exists(path):
        raise UsageError(f"no checkpoint at {path!r}: run `transfusion-fast train --out {args.out}` first")
    return path


# ----------------------------------------------------------------------------- errors
#: Set to 1 to see the traceback of an error (as --debug does).
DEBUG_ENV = "TRANSFUSION_FAST_DEBUG"
#: Exit status of a run that failed on its input (a bad argument, an unreadable file).
EXIT_ERROR = 2


class UsageError(ValueError):
    """A bad command line or input file; its message names the argument or the file."""


def _positive_int(args, flag: str, high: int = MAX_SIZE, low: int = 1) -> None:
    value = getattr(args, flag[2:].replace("-", "_"), None)
    if value is not None and not low <= value <= high:
        raise UsageError(f"{flag} must be an int in [{low}, {high}], got {value}")


def _validate(args) -> None:
    """Check every option before any work: the message names the option and the value."""
    for flag in ("--steps", "--batch-size", "--dim", "--depth", "--heads", "--checkpoint-every", "--length",
                 "--num-samples", "--sample-steps", "--per-digit", "--held-out", "--metric-iterations",
                 "--threads"):
        _positive_int(args, flag)
    _positive_int(args, "--seed", MAX_TRAIN_SEED, low=0)
    for flag, low, low_open in (("--lr", 0.0, True), ("--cfg-scale", 0.0, False)):
        value = getattr(args, flag[2:].replace("-", "_"), None)
        if value is not None and not (math.isfinite(value) and (value > low if low_open else value >= low)):
            raise UsageError(f"{flag} must be a finite number {'>' if low_open else '>='} {low:g}, got {value}")
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError) as error:
        raise UsageError(f"--device {args.device!r} is not a torch device: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device must be cpu or cuda[:N], got {args.device!r}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out!r} is a file; it must be a run directory")
    data = getattr(args, "data", None)
    if data is not None and not os.path.isfile(data):
        raise UsageError(f"--data {data!r}: {'is a directory' if os.path.isdir(data) else 'no such file'}")


def _one_line(error: BaseException) -> str:
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        message = f"{error.strerror}: {error.filename!r}"
    else:
        message = str(error) or type(error).__name__
    return " ".join(message.split())


def cmd_train(args) -> dict:
    task = _make_task(args)
    steps = _setting(args, "steps", task.name)
    dim, depth, heads = (_setting(args, name, task.name) for name in ("dim", "depth", "heads"))
    try:
        config = task.model_config(dim=dim, depth=depth, heads=heads)
    except ValueError as error:
        raise UsageError(f"--dim {dim} --depth {depth} --heads {heads} give no valid model: {error}") from None
    t0 = time.perf_counter()
    model, history = train(task, args.out, steps=steps, batch_size=_setting(args, "batch_size", task.name),
                           lr=_setting(args, "lr", task.name), model_config=config, device=args.device,
                           checkpoint_every=_setting(args, "checkpoint_every", task.name),
                           resume=args.resume, progress=not args.no_progress, seed=args.seed,
                           precision=args.precision)
    summary = {"task": task.name, "steps": steps,
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
    task, model, _ = task_from_checkpoint(_checkpoint_path(args), device=args.device)
    steps = _setting(args, "sample_steps", task.name)
    if steps > model.config.diffusion_steps:
        raise UsageError(f"--sample-steps must be at most the model's {model.config.diffusion_steps} diffusion "
                         f"steps, got {steps}")
    held_out = getattr(args, "held_out", None)
    if task.name == "digits" and held_out is not None and held_out > len(task.data.test_images):
        raise UsageError(f"--held-out must be at most {len(task.data.test_images)} (the held-out images), "
                         f"got {held_out}")
    kwargs = {"steps": steps, "seed": args.seed, "progress": not args.no_progress}
    if task.name == "digits":
        kwargs.update(per_digit=_setting(args, "per_digit", task.name),
                      cfg_scale=_setting(args, "cfg_scale", task.name),
                      held_out=args.held_out)
    with autocast(args.device, args.precision):
        result = task.sample(model, args.out, **kwargs)
    print(f"sampled into {args.out}: " + ", ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                                                  for k, v in result.items()))
    return result


def cmd_eval(args) -> dict:
    path = _checkpoint_path(args)
    spec = load_checkpoint(path)[1]["extra"].get("task")
    if not spec:
        raise UsageError(f"checkpoint {path!r} holds no task description (it was not written by "
                         f"transfusion-fast train)")
    task = make_task(spec)
    samples = os.path.join(args.out, "samples.pt" if task.name == "digits" else "samples.npy")
    if not os.path.isfile(samples):
        raise UsageError(f"no samples at {samples!r}: run `transfusion-fast sample --out {args.out}` first")
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
    """Entry point of the ``transfusion-fast`` console script.

    Returns 0 on success. A failure on the input (a bad option, a missing, unreadable or corrupt file:
    ValueError, OSError and their kin) prints one line ``transfusion-fast <command>: error: ...`` on
    stderr, naming the option or the file, and returns 2 (argparse's own usage errors exit with 2 too);
    with ``--debug`` or ``TRANSFUSION_FAST_DEBUG=1`` it raises instead, with its traceback. Ctrl-C
    returns 130. Anything else is a bug and keeps its traceback.
    """
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        _validate(args)
        set_backend(args.backend)
        torch.set_num_threads(args.threads)
        COMMANDS[args.command](args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"transfusion-fast {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, csv.Error) as error:       # UnicodeDecodeError, CheckpointError: ValueErrors
        if debug:
            raise
        print(f"transfusion-fast {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
