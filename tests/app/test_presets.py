"""The preset registry is the one source of a run's defaults: the CLI, the tasks and the trainer
read it, and the CLI's options only override it."""
import pytest

from transfusion_fast.app import presets
from transfusion_fast.app.cli import _setting, build_parser
from transfusion_fast.app.tasks import DigitsTask, SeriesTask

PRESET_OPTIONS = ("steps", "batch_size", "lr", "dim", "depth", "heads", "checkpoint_every", "sample_steps",
                  "cfg_scale", "per_digit", "metric_iterations", "length", "num_samples", "image_size",
                  "objective", "ema_decay", "sampler")


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


def test_objective_flow_takes_the_flow_preset():
    args = build_parser().parse_args(["demo", "--objective", "flow"])
    flow = presets.preset("digits", "flow")
    assert flow == presets.FLOW_PRESETS["digits"] and flow.objective == "flow"
    assert flow.sampler == "euler" and flow.sample_steps <= 25
    for name in ("sample_steps", "sampler", "objective", "steps", "ema_decay"):
        assert _setting(args, name, "digits") == getattr(flow, name)
    # A task without a flow preset of its own: its DDPM preset with the flow objective and Euler.
    sine = presets.preset("sine", "flow")
    assert (sine.objective, sine.sampler, sine.steps) == ("flow", "euler", presets.PRESETS["sine"].steps)
    assert DigitsTask().model_config(objective="flow").objective == "flow"
    with pytest.raises(ValueError, match=r"objective must be one of \('ddpm', 'flow'\), got 'edm'"):
        presets.preset("digits", "edm")
