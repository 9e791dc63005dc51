"""Checkpoints: safetensors round trip with the config, mismatch errors, atomic writes, exact resume."""
import json
import os

import pytest
import torch
from safetensors import safe_open

import transfusion_fast as tf
import transfusion_fast.checkpoint as ckpt
from transfusion_fast import Model, ModelConfig, load_checkpoint, load_config, pack, save_checkpoint
from transfusion_fast.testing import IMAGE

CONFIG = ModelConfig(dim=32, depth=1, n_heads=2, modalities=(IMAGE,), conditioning="adaln_zero")


pytestmark = pytest.mark.usefixtures("reference_backend")


def samples_for_step(step: int):
    g = torch.Generator().manual_seed(100 + step)
    return [[torch.randint(0, 250, (4,), generator=g), torch.randn(1, 4, 4, generator=g)],
            [torch.randn(1, 2, 4, generator=g), torch.randint(0, 250, (3,), generator=g)]]


def train(model, opt, steps):
    losses = []
    for step in steps:
        out = model(pack(samples_for_step(step), model.config, seed=step))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    return losses


def test_round_trip_with_embedded_config(tmp_path):
    torch.manual_seed(0)
    model = Model(CONFIG)
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, model, step=7, extra={"note": "hi"})
    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()["config"]) == CONFIG.to_dict()
    assert load_config(path) == CONFIG
    loaded, info = load_checkpoint(path)                 # built from the embedded config
    assert info["step"] == 7 and info["extra"] == {"note": "hi"} and info["config"] == CONFIG
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    batch = pack(samples_for_step(0), CONFIG, seed=0)
    assert torch.equal(model(batch)["loss"], loaded(batch)["loss"])


def test_mismatched_config_is_a_clear_error(tmp_path):
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, Model(CONFIG))
    other = Model(ModelConfig(dim=64, depth=1, n_heads=2, modalities=(IMAGE,), conditioning="adaln_zero"))
    with pytest.raises(ValueError) as info:
        load_checkpoint(path, other)
    message = str(info.value)
    assert "dim: checkpoint 32, model 64" in message and "head_dim: checkpoint 16, model 32" in message


def test_not_a_checkpoint(tmp_path):
    from safetensors.torch import save_file
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="not a transfusion_fast checkpoint"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.safetensors")
    save_checkpoint(tmp_path / "m.safetensors", Model(CONFIG))
    with pytest.raises(ckpt.CheckpointError, match="holds no optimizer state"):
        m = Model(CONFIG)
        load_checkpoint(tmp_path / "m.safetensors", m, torch.optim.SGD(m.parameters(), lr=0.1))


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = Model(CONFIG)
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, model, step=1)
    before = path.read_bytes()

    def crash_midway(filename, tensors, metadata):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr(ckpt, "_write_file", crash_midway)
    with torch.no_grad():
        model.output.weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model, step=2)
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["model.safetensors"]
    assert load_checkpoint(path)[1]["step"] == 1


def test_resume_reproduces_the_uninterrupted_loss_trajectory(tmp_path):
    torch.manual_seed(0)
    model = Model(CONFIG)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    uninterrupted = train(model, opt, range(6))

    torch.manual_seed(0)
    first = Model(CONFIG)
    first_opt = torch.optim.AdamW(first.parameters(), lr=3e-3)
    head = train(first, first_opt, range(3))
    path = tmp_path / "step3.safetensors"
    save_checkpoint(path, first, first_opt, step=3)
    del first, first_opt

    torch.manual_seed(123)                               # a different init, overwritten by the load
    resumed = Model(CONFIG)
    resumed_opt = torch.optim.AdamW(resumed.parameters(), lr=3e-3)
    _, info = load_checkpoint(path, resumed, resumed_opt)
    tail = train(resumed, resumed_opt, range(info["step"], 6))
    assert head + tail == uninterrupted


# ----------------------------------------------------------------------------- one atomic unit
def trained(steps=2):
    torch.manual_seed(0)
    model = Model(CONFIG)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ema = tf.EMA(model, 0.5)
    for step in range(steps):
        train(model, opt, [step])
        ema.update(model)
    return model, opt, ema


def test_weights_optimizer_ema_rng_and_step_live_in_one_file(tmp_path):
    model, opt, ema = trained()
    path = tmp_path / "run.safetensors"
    torch.manual_seed(77)
    rng = torch.get_rng_state()
    save_checkpoint(path, model, opt, step=2, extra={"task": "x"}, ema=ema)
    assert os.listdir(tmp_path) == ["run.safetensors"]           # no .optim.pt, no temp file
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        assert meta["format"] == ckpt.CHECKPOINT_FORMAT and meta["checksum"].startswith("sha256:")
        assert json.loads(meta["contents"]) == ["weights", "optimizer", "ema", "rng"]
        assert ckpt.TRAINING_STATE_KEY in f.keys()

    torch.manual_seed(5)
    fresh = Model(CONFIG)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=3e-3)
    fresh_ema = tf.EMA(fresh, 0.5)
    _, info = load_checkpoint(path, fresh, fresh_opt, ema=fresh_ema)
    assert info["step"] == 2 and info["extra"] == {"task": "x"}
    assert torch.equal(torch.get_rng_state(), rng)
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    assert fresh_ema.num_updates == ema.num_updates
    for a, b in zip(ema.averages, fresh_ema.averages):
        assert torch.equal(a, b)
    for a, b in zip(opt.state.values(), fresh_opt.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_ema_without_optimizer_and_missing_parts_are_named(tmp_path):
    model, _, ema = trained(1)
    path = tmp_path / "ema_only.safetensors"
    save_checkpoint(path, model, ema=ema)
    other = tf.EMA(Model(CONFIG), 0.5)
    load_checkpoint(path, Model(CONFIG), ema=other)
    assert all(torch.equal(a, b) for a, b in zip(ema.averages, other.averages))
    m = Model(CONFIG)
    with pytest.raises(ckpt.CheckpointError, match=r"ema_only.safetensors.*holds no optimizer state"):
        load_checkpoint(path, m, torch.optim.SGD(m.parameters(), lr=0.1))
    save_checkpoint(path, model)
    with pytest.raises(ckpt.CheckpointError, match="holds no ema state"):
        load_checkpoint(path, Model(CONFIG), ema=tf.EMA(Model(CONFIG)))


def _flip(path, offset, mask):
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("where", ["last weight byte", "training state", "header config"])
def test_flipped_bytes_are_detected(tmp_path, where):
    model, opt, ema = trained(1)
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, model, opt, step=1, ema=ema)
    data = path.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + header_len])
    if where == "header config":
        offset = data.index(b'\\"dim\\": 32') + len(b'\\"dim\\": 3')
        mask = 0x04                                                  # dim 32 -> 36: still a valid config
    else:
        name = ckpt.TRAINING_STATE_KEY if where == "training state" else "output.weight"
        offset = 8 + header_len + header[name]["data_offsets"][1] - 2
        mask = 0x10
    _flip(path, offset, mask)
    with pytest.raises(ckpt.CheckpointError, match=r"c.safetensors' is corrupt: its checksum does not match"):
        load_checkpoint(path)


def test_every_unreadable_file_names_the_path_and_the_problem(tmp_path):
    model, opt, _ = trained(1)
    good = tmp_path / "good.safetensors"
    save_checkpoint(good, model, opt, step=1)
    data = good.read_bytes()
    cases = {"truncated.safetensors": (data[:len(data) // 2], "not a readable safetensors file"),
             "empty.safetensors": (b"", "not a readable safetensors file"),
             "garbage.safetensors": (os.urandom(300), "not a readable safetensors file")}
    for name, (content, words) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ckpt.CheckpointError, match=rf"'{tmp_path / name}'.*{words}"):
            load_checkpoint(tmp_path / name)
    with pytest.raises(ckpt.CheckpointError, match="is a directory"):
        load_checkpoint(tmp_path)
    with pytest.raises(ckpt.CheckpointError, match="is a directory"):
        save_checkpoint(tmp_path, model)

    # Valid safetensors, bad metadata: a field that is not JSON, a config that does not validate.
    from safetensors.torch import save_file
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    meta = {"format": ckpt.CHECKPOINT_FORMAT, "config": "{not json", "step": "1", "extra": "{}", "contents": "[]"}
    save_file(weights, str(tmp_path / "badjson.safetensors"), metadata=meta)
    with pytest.raises(ckpt.CheckpointError, match=r"badjson.safetensors.*metadata field 'config' is not valid JSON"):
        load_checkpoint(tmp_path / "badjson.safetensors")
    meta["config"] = json.dumps({**CONFIG.to_dict(), "dim": -1})
    save_file(weights, str(tmp_path / "badconfig.safetensors"), metadata=meta)
    with pytest.raises(ckpt.CheckpointError, match=r"badconfig.safetensors.*embedded ModelConfig is invalid.*dim"):
        load_config(tmp_path / "badconfig.safetensors")

    # A training state that is not a torch archive, under a checksum that matches it.
    tensors = dict(weights)
    tensors[ckpt.TRAINING_STATE_KEY] = torch.tensor(list(b"not a zip archive"), dtype=torch.uint8)
    meta = {"format": ckpt.CHECKPOINT_FORMAT, "config": CONFIG.to_json(), "step": "1", "extra": "{}",
            "contents": "[]"}
    meta["checksum"] = ckpt._digest(meta, tensors)
    save_file(tensors, str(tmp_path / "badstate.safetensors"), metadata=meta)
    m = Model(CONFIG)
    with pytest.raises(ckpt.CheckpointError, match=r"badstate.safetensors.*optimizer / EMA / RNG state cannot be read"):
        load_checkpoint(tmp_path / "badstate.safetensors", m, torch.optim.SGD(m.parameters(), lr=0.1))


def test_a_save_removes_what_killed_saves_left(tmp_path):
    import socket
    import subprocess
    import sys
    path = tmp_path / "c.safetensors"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead_pid = int(dead.stdout)
    host = socket.gethostname()
    leftovers = [f".c.safetensors.saving.{host}.{dead_pid}.0a1b2c3d.tmp",   # a killed save of this format
                 ".c.safetensors.k2j4h5g6.tmp", ".c.safetensors.optim.pt.ab12cd34.tmp"]   # the previous format's
    alive = f".c.safetensors.saving.{host}.{os.getppid()}.0a1b2c3d.tmp"    # a save in progress elsewhere
    unrelated = [".other.safetensors.k2j4h5g6.tmp", "c.safetensors.notes.txt"]
    for name in leftovers + [alive] + unrelated:
        (tmp_path / name).write_bytes(b"x" * 100)
    save_checkpoint(path, Model(CONFIG), step=1)
    assert sorted(os.listdir(tmp_path)) == sorted(["c.safetensors", alive] + unrelated)


def _legacy_checkpoint(path, model, opt, weights_step, optim_step):
    """Files as the previous version wrote them: format 1 weights + .optim.pt beside."""
    from safetensors.torch import save_file
    meta = {"format": ckpt.LEGACY_FORMAT, "config": model.config.to_json(), "step": json.dumps(weights_step),
            "extra": json.dumps({"old": True})}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=meta)
    torch.save({"optimizer": opt.state_dict(), "step": optim_step, "rng": torch.get_rng_state()},
               str(path) + ".optim.pt")


def test_previous_format_is_read_with_a_warning_and_a_mixture_is_refused(tmp_path):
    model, opt, _ = trained(1)
    path = tmp_path / "old.safetensors"
    _legacy_checkpoint(path, model, opt, weights_step=1, optim_step=1)
    fresh = Model(CONFIG)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=3e-3)
    with pytest.warns(UserWarning, match="previous format"):
        _, info = load_checkpoint(path, fresh, fresh_opt)
    assert info["step"] == 1 and info["extra"] == {"old": True} and info["format"] == ckpt.LEGACY_FORMAT
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    assert len(fresh_opt.state) == len(opt.state)

    _legacy_checkpoint(path, model, opt, weights_step=3, optim_step=1)      # killed between the two writes
    with pytest.warns(UserWarning), pytest.raises(ckpt.CheckpointError, match="from step 1 but the weights .* step 3"):
        load_checkpoint(path, Model(CONFIG), torch.optim.AdamW(Model(CONFIG).parameters()))
    with pytest.warns(UserWarning):
        load_checkpoint(path)                                            # the weights alone are fine
    save_checkpoint(path, model, opt, step=3)                            # converts; the stale file goes
    assert sorted(os.listdir(tmp_path)) == ["old.safetensors"]
    assert load_checkpoint(path)[1]["format"] == ckpt.CHECKPOINT_FORMAT


def test_bad_save_arguments(tmp_path):
    model = Model(CONFIG)
    with pytest.raises(ValueError, match="step must be an int >= 0, got float 1.5"):
        save_checkpoint(tmp_path / "a", model, step=1.5)
    with pytest.raises(ValueError, match="extra must be a JSON-serializable dict"):
        save_checkpoint(tmp_path / "a", model, extra={"x": object()})
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        save_checkpoint(tmp_path / "a", model, "adam")
    with pytest.raises(TypeError, match="ema must be a transfusion_fast.EMA"):
        save_checkpoint(tmp_path / "a", model, ema={})
    assert os.listdir(tmp_path) == []
