"""Checkpoints: safetensors round trip with the config, mismatch errors, atomic writes, exact resume."""
import json
import os

import pytest
import torch
from safetensors import safe_open

import transfusion_fast as tf
import transfusion_fast.checkpoint as ckpt
from transfusion_fast import ModalityConfig, Model, ModelConfig, load_checkpoint, load_config, pack, save_checkpoint

IMAGE = ModalityConfig("image", "image", channels=1, patch_size=2, max_size=8)
CONFIG = ModelConfig(dim=32, depth=1, n_heads=2, modalities=(IMAGE,), conditioning="adaln_zero")


@pytest.fixture(autouse=True)
def reference_backend():
    with tf.use_backend("reference"):
        yield


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
    with pytest.raises(FileNotFoundError, match="optimizer state"):
        m = Model(CONFIG)
        load_checkpoint(tmp_path / "m.safetensors", m, torch.optim.SGD(m.parameters(), lr=0.1))


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = Model(CONFIG)
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, model, step=1)
    before = path.read_bytes()

    def crash_midway(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr(ckpt, "save_file", crash_midway)
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
