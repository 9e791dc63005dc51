"""The CLI end to end on a tiny budget: train -> checkpoint -> resume -> sample -> eval, both tasks."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from transfusion_fast.app.cli import main
from transfusion_fast.checkpoint import load_checkpoint

TINY = ["--dim", "64", "--depth", "1", "--heads", "4", "--batch-size", "6", "--threads", "1",
        "--backend", "reference", "--no-progress"]


def _png_size(path):
    with open(path, "rb") as handle:
        head = handle.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def test_digits_train_resume_sample_eval(tmp_path):
    out = str(tmp_path / "digits")
    main(["train", "--out", out, "--steps", "3", "--checkpoint-every", "2", *TINY])
    ckpt = os.path.join(out, "checkpoint.safetensors")
    _, info = load_checkpoint(ckpt)
    assert info["step"] == 3 and info["extra"]["task"]["task"] == "digits"

    main(["train", "--out", out, "--steps", "5", "--resume", *TINY])
    _, info = load_checkpoint(ckpt)
    assert info["step"] == 5
    summary = json.load(open(os.path.join(out, "train_summary.json")))
    assert summary["steps"] == 5 and summary["tokens_per_second"] > 0

    main(["sample", "--out", out, "--per-digit", "1", "--sample-steps", "2", "--held-out", "12",
          "--threads", "1", "--backend", "reference", "--no-progress"])
    # 10 rows (one per digit) of 1 image of 8x8 pixels at scale 4 with 1-pixel gaps.
    assert _png_size(os.path.join(out, "samples.png")) == (1 * 33 + 1, 10 * 33 + 1)
    lines = open(os.path.join(out, "captions.txt")).read().splitlines()
    assert len(lines) == 12 and lines[0].startswith("held-out #0\ttrue: ")

    main(["eval", "--out", out, "--threads", "1"])
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    for key in ("conditional_accuracy", "captioning_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["frechet_distance"] > metrics["frechet_distance_train_vs_held_out"]
    assert metrics["generated_images"] == 10 and metrics["captioned_images"] == 12
    assert metrics["classifier_accuracy_on_held_out"] > 0.9


def test_sine_train_sample_eval(tmp_path):
    out = str(tmp_path / "sine")
    main(["demo", "--task", "sine", "--length", "16", "--num-samples", "40", "--out", out,
          "--steps", "2", "--sample-steps", "2", "--metric-iterations", "3", *TINY])
    samples = np.load(os.path.join(out, "samples.npy"))
    assert samples.shape == (8, 16, 5) and samples.min() >= 0.0 and samples.max() <= 1.0
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert 0.0 <= metrics["lds"] <= 0.5 and metrics["lps"] > 0 and metrics["lps_real_data"] > 0
    assert metrics["length"] == 16 and metrics["features"] == 5
    assert _png_size(os.path.join(out, "pca.png")) == (400, 400)


def test_csv_task(tmp_path):
    path = tmp_path / "energy.csv"
    t = np.arange(60)
    # The date column is not numeric: it is skipped, two features remain.
    path.write_text("date,a,b\n" + "".join(f"day{i},{np.sin(i / 5):.4f},{np.cos(i / 7):.4f}\n" for i in t))
    out = str(tmp_path / "csv")
    main(["demo", "--task", "csv", "--data", str(path), "--length", "8", "--out", out, "--steps", "2",
          "--sample-steps", "2", "--metric-iterations", "3", *TINY])
    assert np.load(os.path.join(out, "samples.npy")).shape == (11, 8, 2)
    original = np.load(os.path.join(out, "samples_original_units.npy"))
    assert original.min() >= -1.0 - 1e-3 and original.max() <= 1.0 + 1e-3


def _fails(capsys, argv, *words):
    """``main(argv)`` exits with status 2 and one line on stderr holding ``words``."""
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"transfusion-fast {argv[0]}: error: "), lines
    for word in words:
        assert word in lines[0], (word, lines[0])


def test_bad_arguments(tmp_path, capsys):
    _fails(capsys, ["train", "--task", "csv", "--out", str(tmp_path), *TINY], "--task csv needs --data FILE.csv")
    _fails(capsys, ["sample", "--out", str(tmp_path / "nothing")], "no checkpoint at")
    _fails(capsys, ["train", "--out", str(tmp_path / "empty"), "--resume", "--steps", "1", *TINY],
           "--resume: no checkpoint")
    _fails(capsys, ["train", "--out", str(tmp_path), "--threads", "0"], "--threads", "got 0")
    with pytest.raises(SystemExit) as info:
        main(["train", "--backend", "cuda-magic"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "argument --backend: invalid choice: 'cuda-magic'" in err[0]
    # --debug re-raises with the traceback instead
    with pytest.raises(ValueError, match="--task csv needs --data FILE.csv"):
        main(["train", "--task", "csv", "--out", str(tmp_path), "--debug", *TINY])


def test_module_entry_point_help():
    result = subprocess.run([sys.executable, "-m", "transfusion_fast", "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0
    for command in ("train", "sample", "eval", "demo"):
        assert command in result.stdout


def test_train_with_bf16_precision_keeps_fp32_parameters(tmp_path):
    out = str(tmp_path / "bf16")
    main(["train", "--out", out, "--steps", "2", "--precision", "bf16", *TINY])
    model, info = load_checkpoint(os.path.join(out, "checkpoint.safetensors"))
    assert info["extra"]["train"]["precision"] == "bf16"
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    summary = json.load(open(os.path.join(out, "train_summary.json")))
    assert np.isfinite(summary["final_loss"])
    with pytest.raises(SystemExit):      # argparse names the choices
        main(["train", "--out", out, "--precision", "fp8", *TINY])
