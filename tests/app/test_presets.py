"""The preset registry is the one source of a run's defaults: the CLI, the tasks and the trainer
read it, and the CLI's options only override it."""
import pytest

from transfusion_fast.app import presets
from transfusion_fast.app.cli import _setting, build_parser
from transfusion_fast.app.tasks import DigitsTask, SeriesTask

PRESET_OPTIONS = ("steps", "batch_size", "lr", "dim", "depth", "heads", "checkpoint_every", "sample_steps",
                  "cfg_scale", "per_digit", "metric_iterations", "length", "num_samples", "image_size")


def test_cli_options_default_to_the_preset():
    args = build_parser().parse_args(["demo"])
    for name in PRESET_OPTIONS:
        assert getattr(args, name) is None, name          # no default of its own
        assert _setting(args, name, args.task) == getattr(presets.preset(args.task), name)
    args = build_parser().parse_args(["demo", "--task", "sine", "--steps", "7", "--lr", "0.5"])
    assert _setting(args, "steps", "sine") == 7 and _setting(args, "lr", "sine") == 0.5
    assert _setting(args, "dim", "sine") == presets.PRESETS["sine"].dim
    assert build_parser().parse_args(["train"]).task == presets.TASKS[0] == "digits"


def test_tasks_take_their_sizes_from_the_preset():
    digits = DigitsTask()
    config = digits.model_config()
    expected = presets.PRESETS["digits"]
    assert digits.image_size == expected.image_size
    assert (config.dim, config.depth, config.n_heads) == (expected.dim, expected.depth, expected.heads)
    assert digits.model_config(dim=64, heads=2).dim == 64
    sine = SeriesTask("sine", num_samples=20)
    assert sine.length == presets.PRESETS["sine"].length
    assert sine.model_config().dim == presets.PRESETS["sine"].dim


def test_unknown_task_is_refused():
    assert set(presets.TASKS) == {"digits", "sine", "csv"}
    with pytest.raises(ValueError, match=r"task must be one of \('digits', 'sine', 'csv'\), got 'mnist'"):
        presets.preset("mnist")
