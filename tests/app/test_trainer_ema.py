"""The trainer's EMA of the weights (kept, saved with the checkpoint, restored on resume, used for
sampling by default) and the flow-matching variant of the demo through the CLI."""
import os

import pytest
import torch

from transfusion_fast import Model, get_backend, set_backend
from transfusion_fast.app.cli import main
from transfusion_fast.app.tasks import DigitsTask, task_from_checkpoint
from transfusion_fast.app.trainer import CHECKPOINT_NAME, load_model, train
from transfusion_fast.checkpoint import load_checkpoint

TINY = ["--dim", "32", "--depth", "1", "--heads", "2", "--batch-size", "4", "--threads", "1",
        "--backend", "reference", "--no-progress"]


@pytest.fixture(scope="module")
def task():
    return DigitsTask()


@pytest.fixture(autouse=True)
def restore_backend():
    """main(--backend ...) sets the process-wide backend; later test files expect theirs."""
    before = get_backend()
    yield
    set_backend(before)


def _train(task, out, steps, **kwargs):
    config = kwargs.pop("model_config", None) or task.model_config(dim=32, depth=1, heads=2,
                                                                  objective=kwargs.pop("objective", "ddpm"))
    kwargs = {"batch_size": 4, "lr": 1e-2, "warmup": 1, "checkpoint_every": 2, "progress": False,
              "model_config": config, **kwargs}
    return train(task, str(out), steps=steps, **kwargs)


def _params(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_ema_is_saved_and_used_for_sampling_by_default(task, tmp_path):
    model, history = _train(task, tmp_path, 4, ema_decay=0.9)
    ema = history["ema"]
    assert ema is not None and ema.num_updates == 4 and ema.decay == 0.9
    raw = _params(model)
    averages = dict(zip(ema.names, ema.averages))
    assert any(not torch.equal(averages[name], raw[name]) for name in raw)

    path = os.path.join(tmp_path, CHECKPOINT_NAME)
    with_ema, info = load_model(path)
    assert info["weights"] == "ema" and info["extra"]["train"]["ema_decay"] == 0.9
    for name, p in with_ema.named_parameters():
        assert torch.equal(p, averages[name]), name
    trained, info = load_model(path, use_ema=False)
    assert info["weights"] == "raw"
    for name, p in trained.named_parameters():
        assert torch.equal(p, raw[name]), name
    # What the sample command loads (task_from_checkpoint) is the EMA model unless told otherwise.
    _, sampled, info = task_from_checkpoint(path)
    assert info["weights"] == "ema" and all(torch.equal(p, averages[n]) for n, p in sampled.named_parameters())


def test_resume_restores_the_ema(task, tmp_path):
    straight, history = _train(task, tmp_path / "straight", 4, ema_decay=0.9)
    _train(task, tmp_path / "resumed", 2, ema_decay=0.9)
    resumed, resumed_history = train(task, str(tmp_path / "resumed"), steps=4, resume=True, progress=False,
                                     batch_size=4, lr=1e-2, warmup=1, checkpoint_every=2)
    ema, again = history["ema"], resumed_history["ema"]
    assert again.num_updates == 4 and again.decay == 0.9        # the checkpoint's decay, not the preset's
    for name, a, b in zip(ema.names, ema.averages, again.averages):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)


def test_resume_of_a_run_without_ema_starts_one(task, tmp_path):
    _train(task, tmp_path, 2, ema_decay=0.0)
    resumed, history = train(task, str(tmp_path), steps=3, resume=True, progress=False, batch_size=4,
                             ema_decay=0.5)
    ema = history["ema"]
    assert ema.decay == 0.5 and ema.num_updates == 1
    loaded, info = load_model(os.path.join(tmp_path, CHECKPOINT_NAME))
    assert info["weights"] == "ema" and info["extra"]["train"]["ema_decay"] == 0.5


def test_ema_decay_zero_disables_it(task, tmp_path):
    model, history = _train(task, tmp_path, 2, ema_decay=0.0)
    assert history["ema"] is None
    loaded, info = load_model(os.path.join(tmp_path, CHECKPOINT_NAME))
    assert info["weights"] == "raw" and all(torch.equal(p, q) for p, q in zip(loaded.parameters(), model.parameters()))


@pytest.mark.parametrize("decay", [1.0, -0.1, "0.9", True])
def test_bad_ema_decay(task, tmp_path, decay):
    with pytest.raises(ValueError, match=r"ema_decay must be a float in \[0, 1\).*" + repr(decay).replace(".", r"\.")):
        _train(task, tmp_path, 1, ema_decay=decay)


def test_flow_variant_through_the_cli(tmp_path):
    out = str(tmp_path / "flow")
    main(["train", "--objective", "flow", "--out", out, "--steps", "2", "--ema-decay", "0.5", *TINY])
    model, info = load_checkpoint(os.path.join(out, CHECKPOINT_NAME))
    assert model.config.objective == "flow" and info["extra"]["train"]["ema_decay"] == 0.5
    main(["sample", "--out", out, "--per-digit", "1", "--sample-steps", "2", "--sampler", "heun",
          "--held-out", "2", "--threads", "1", "--backend", "reference", "--no-progress"])
    settings = torch.load(os.path.join(out, "samples.pt"), weights_only=False)["settings"]
    assert settings == {"per_digit": 1, "steps": 2, "cfg_scale": 3.0, "seed": 0, "sampler": "heun",
                        "objective": "flow", "weights": "ema"}
    main(["sample", "--out", out, "--per-digit", "1", "--held-out", "2", "--raw-weights", "--threads", "1",
          "--backend", "reference", "--no-progress"])
    settings = torch.load(os.path.join(out, "samples.pt"), weights_only=False)["settings"]
    assert settings["weights"] == "raw" and settings["sampler"] == "euler" and settings["steps"] == 25
    # A DDPM sampler on the flow model is refused by name.
    task, flow_model, _ = task_from_checkpoint(os.path.join(out, CHECKPOINT_NAME))
    assert isinstance(flow_model, Model)
    with pytest.raises(ValueError, match=r"sampler must be one of \('euler', 'heun'\).*'flow'.*got 'ddim'"):
        task.sample(flow_model, out, per_digit=1, steps=2, sampler="ddim", held_out=1, progress=False)


def test_bf16_flow_training_keeps_an_fp32_ema_that_resumes(task, tmp_path):
    """precision='bf16' (autocast, fp32 parameters) with the EMA: the averages stay fp32, are saved
    with the checkpoint and continue exactly on resume."""
    straight, history = _train(task, tmp_path / "straight", 4, ema_decay=0.9, objective="flow", precision="bf16")
    ema = history["ema"]
    assert ema.num_updates == 4 and all(a.dtype == torch.float32 for a in ema.averages)
    assert all(p.dtype == torch.float32 for p in straight.parameters())
    _train(task, tmp_path / "resumed", 2, ema_decay=0.9, objective="flow", precision="bf16")
    _, again = train(task, str(tmp_path / "resumed"), steps=4, resume=True, progress=False, batch_size=4, lr=1e-2,
                     warmup=1, checkpoint_every=2, precision="bf16")
    for name, a, b in zip(ema.names, ema.averages, again["ema"].averages):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
    _, info = load_model(os.path.join(tmp_path / "resumed", CHECKPOINT_NAME))
    assert info["extra"]["train"]["precision"] == "bf16" and info["weights"] == "ema"


@pytest.mark.parametrize("value", ["1", "-0.5", "nan"])
def test_cli_refuses_a_bad_ema_decay(tmp_path, capsys, value):
    code = main(["train", "--out", str(tmp_path), "--steps", "1", "--ema-decay", value, *TINY])
    err = capsys.readouterr().err
    assert code == 2 and "--ema-decay must be a number in [0, 1)" in err and f"got {float(value)}" in err


def test_the_trainer_encodes_a_latent_modality_with_a_frozen_vae(task, tmp_path):
    """train(codecs=...): the digits (1 x 8 x 8 pixels) reach the model as 4 x 4 x 4 latents of a
    tiny random AutoencoderKL; the VAE gets no gradient, stays unchanged and out of the checkpoint."""
    import dataclasses

    diffusers = pytest.importorskip("diffusers", reason="diffusers is a test dependency (requirements-test.txt)")
    from transfusion_fast import LatentCodec, ModalityConfig

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                                  sample_size=8)
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    latent = ModalityConfig("image", "image", channels=4, patch_size=2, max_size=4)
    config = dataclasses.replace(task.model_config(dim=32, depth=1, heads=2, objective="flow"), modalities=(latent,))
    with pytest.raises(ValueError, match=r"channels"):      # the pixels do not fit the latent config
        _train(task, tmp_path / "pixels", 1, model_config=config)
    model, history = _train(task, tmp_path / "latent", 2, model_config=config, ema_decay=0.5,
                            codecs={"image": LatentCodec.from_diffusers(vae)})
    assert all(torch.isfinite(torch.tensor(history["loss"]))) and history["diffusion_loss"][-1] > 0
    assert all(p.grad is None and not p.requires_grad for p in vae.parameters())
    for k, v in vae.state_dict().items():
        assert torch.equal(v, before[k]), k
    loaded, _ = load_checkpoint(os.path.join(tmp_path / "latent", CHECKPOINT_NAME))
    assert set(loaded.state_dict()) == set(model.state_dict()) and loaded.codecs == {}
    with pytest.raises(ValueError, match=r"codecs must be a dict"):
        _train(task, tmp_path / "bad", 1, model_config=config, codecs=[vae])
