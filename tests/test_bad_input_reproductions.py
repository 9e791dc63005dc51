"""Every reproduction of issue 19's bad-input campaign, one test each, with the issue's exact inputs.

Each asserts a clear exception naming the argument (the message is matched) or the reference
backend's answer. The cases that crashed the process (C++ ops with extreme sizes) run in a child
process, so that a crash fails the test instead of killing pytest.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

import transfusion_fast as tf
from transfusion_fast import (EMA, Layout, ModalityConfig, Model, ModelConfig, Schedule, generate, get_schedule,
                              load_checkpoint, ops, pack, save_checkpoint, use_backend)
from transfusion_fast.app.cli import main
from transfusion_fast.checkpoint import LEGACY_FORMAT, CheckpointError

# ----------------------------------------------------------------------------------- helpers

def run_isolated(code: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter; a crash (signal) shows as a negative return code."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def assert_raises_in_child(code: str, exception: str, pattern: str) -> None:
    """``code`` (a statement) must raise ``exception`` whose message matches ``pattern``, in a child."""
    result = run_isolated(f"""
        import re, torch, transfusion_fast as tf
        from transfusion_fast import ops
        try:
            {code}
        except {exception} as error:
            assert re.search({pattern!r}, str(error)), str(error)
            print("RAISED", type(error).__name__, error)
        else:
            print("NO ERROR")
        """)
    assert result.returncode == 0, f"child died with {result.returncode}: {result.stderr[-2000:]}"
    assert "RAISED" in result.stdout, result.stdout + result.stderr[-2000:]


def cli(argv, capsys):
    """Run the CLI in-process: (exit status, stderr lines)."""
    try:
        status = main(argv)
    except SystemExit as exit_:                      # argparse's own usage errors
        status = exit_.code
    err = capsys.readouterr().err
    return status, [line for line in err.splitlines() if line.strip()]


def assert_one_line_error(argv, capsys, *names):
    status, lines = cli(argv, capsys)
    assert status == 2, (status, lines)
    assert len(lines) == 1, lines                    # one line, no traceback
    assert "Traceback" not in lines[0]
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


IMAGE = ModalityConfig("image", "image", channels=1, patch_size=2, max_size=4)
SMALL = ModelConfig(dim=64, depth=1, n_heads=4, modalities=(IMAGE,), max_seq_len=128)


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return Model(SMALL).eval()


# ----------------------------------------------------------------------------------- crash
def test_unpatchify_2_to_32_raises_instead_of_sigfpe():
    assert_raises_in_child("ops.unpatchify(torch.empty(1, 1, 0), 2**32, 2**32, 2**32)", "ValueError",
                           r"\b(p|height|width)\b")


def test_unpatchify_p_2_to_33_raises_instead_of_sigfpe():
    assert_raises_in_child("ops.unpatchify(torch.empty(1, 1, 0), 2**33, 2**33, 2**33)", "ValueError",
                           r"\b(p|height|width)\b")


def test_unpatchify_packed_2_to_32_raises_instead_of_sigfpe():
    assert_raises_in_child("ops.unpatchify_packed(torch.empty(1, 0), torch.tensor([0, 1]), 2**32, "
                           "[(2**32, 2**32)])", "ValueError", r"\b(p|sizes)\b")


# ----------------------------------------------------------------------------------- hangs
def test_get_schedule_10_to_9_steps_raises():
    with pytest.raises(ValueError, match="num_steps"):
        get_schedule("cosine", 10**9)


def test_model_config_10_to_9_diffusion_steps_raises():
    with pytest.raises(ValueError, match="diffusion_steps"):
        Model(ModelConfig(dim=64, depth=1, n_heads=4, diffusion_steps=10**9))


def test_inference_timesteps_10_to_9_raises():
    with pytest.raises(ValueError, match="num_train_steps"):
        ops.inference_timesteps(10**9, 10**9)


# ----------------------------------------------------------------------------------- silent wrong answers
def _strided_add_noise(**kwargs):
    t = torch.tensor([0, 999, 0, 999, 0, 999])[::2]
    x0 = torch.ones(3, 2)
    out = ops.add_noise(x0, t, get_schedule(), **kwargs)[0]
    with use_backend("reference"):
        ref = ops.add_noise(x0, t, get_schedule(), **kwargs)[0]
    return out, ref


def test_add_noise_strided_int64_timesteps_match_reference():
    out, ref = _strided_add_noise(noise=torch.zeros(3, 2))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(out[:, 0], torch.full((3,), float(get_schedule().alphas_cumprod[0]) ** 0.5))


def test_add_noise_strided_int64_timesteps_with_seed_match_reference():
    out, ref = _strided_add_noise(seed=3)
    torch.testing.assert_close(out, ref)


def _attention_both(q, k, v, layout):
    out = ops.attention(q, k, v, layout)
    with use_backend("reference"):
        ref = ops.attention(q, k, v, layout)
    return out, ref


def _assert_same_nan_semantics(out, ref):
    assert torch.equal(torch.isnan(out), torch.isnan(ref)), (torch.isnan(out).any(-1).any(-1),
                                                             torch.isnan(ref).any(-1).any(-1))
    finite = ~torch.isnan(ref)
    torch.testing.assert_close(out[finite], ref[finite], atol=2e-5, rtol=2e-5)


def _qkv(rows, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, 2, 32, generator=g) for _ in range(3)]


def test_attention_nan_key_propagates_to_the_whole_document_as_in_the_reference():
    q, k, v = _qkv(4)
    k[0, 0, 0] = float("nan")
    out, ref = _attention_both(q, k, v, Layout.causal(torch.tensor([0, 4])))
    assert bool(torch.isnan(ref[:, 0]).all())        # IEEE: every row that sees key 0 is NaN
    _assert_same_nan_semantics(out, ref)


def test_attention_inf_score_matches_the_reference():
    q, k, v = _qkv(4, 1)
    q[1, 0] = 0.0
    q[1, 0, 0] = float("inf")                         # row 1, head 0 sees keys 0 and 1: scores +inf, -inf
    k[0, 0, 0], k[1, 0, 0] = 1.0, -1.0
    out, ref = _attention_both(q, k, v, Layout.causal(torch.tensor([0, 4])))
    _assert_same_nan_semantics(out, ref)


@pytest.mark.parametrize("make", [
    Layout.causal, Layout.bidirectional])
def test_attention_nan_value_spreads_as_in_the_reference(make):
    q, k, v = _qkv(128, 2)
    v[99, 0, 0] = float("nan")
    out, ref = _attention_both(q, k, v, make(torch.tensor([0, 128])))
    _assert_same_nan_semantics(out, ref)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_generate_nan_inf_cfg_scale_raises(small_model, value):
    with pytest.raises(ValueError, match="cfg_scale"):
        generate(small_model, [[torch.tensor([1, 2])]], cfg_scale=value, progress=False)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_generate_nan_inf_temperature_raises(small_model, value):
    with pytest.raises(ValueError, match="temperature"):
        generate(small_model, [[torch.tensor([1, 2])]], temperature=value, progress=False)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_generate_nan_inf_eta_raises(small_model, value):
    with pytest.raises(ValueError, match="eta"):
        generate(small_model, [[torch.tensor([1, 2])]], eta=value, progress=False)


def _step_args():
    x = torch.randn(3, 4)
    return x, torch.randn(3, 4), torch.tensor([500, 500, 500]), torch.tensor([400, 400, 400]), get_schedule()


@pytest.mark.parametrize("step", ["ddim_step", "ddpm_step"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_sampler_step_nan_inf_cfg_scale_raises(step, value):
    x, out, t, t_prev, schedule = _step_args()
    with pytest.raises(ValueError, match="cfg_scale"):
        getattr(ops, step)(x, out, t, t_prev, schedule, uncond_out=torch.randn(3, 4), cfg_scale=value, seed=0)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_ddim_step_nan_inf_eta_raises(value):
    x, out, t, t_prev, schedule = _step_args()
    with pytest.raises(ValueError, match="eta"):
        ops.ddim_step(x, out, t, t_prev, schedule, eta=value, seed=0)


def test_cli_sample_cfg_scale_nan_is_one_line_and_non_zero(tmp_path, capsys):
    assert_one_line_error(["sample", "--out", str(tmp_path), "--cfg-scale", "nan"], capsys, "--cfg-scale")


def test_cli_eval_metric_iterations_0_is_one_line_and_non_zero(tmp_path, capsys):
    assert_one_line_error(["eval", "--out", str(tmp_path), "--metric-iterations", "0"], capsys,
                          "--metric-iterations")


def test_generate_prompt_close_to_max_seq_len_is_not_silently_empty():
    torch.manual_seed(0)
    model = Model(ModelConfig(dim=64, depth=1, n_heads=4, modalities=(IMAGE,), max_seq_len=40)).eval()
    prompt = torch.arange(1, 31)                      # 30 tokens, 31 rows with BOS: room for 9
    try:
        out = generate(model, [[prompt]], max_new_tokens=64, progress=False)
    except ValueError as error:
        assert "max_seq_len" in str(error) and "max_new_tokens" in str(error)
    else:
        assert out != [[]], "a prompt with room for 9 tokens gave nothing and no error"


def test_schedule_from_beta_1_5_raises():
    with pytest.raises(ValueError, match="betas"):
        Schedule("custom", torch.tensor([0.1, 1.5], dtype=torch.float64))


def test_ddim_step_eta_0_with_terminal_beta_1_needs_no_noise_and_matches_reference():
    betas = torch.tensor([0.1, 0.2, 1.0], dtype=torch.float64)
    schedule = Schedule("zero-snr", betas)
    x, out = torch.randn(2, 3), torch.randn(2, 3)
    t, t_prev = torch.tensor([2, 2]), torch.tensor([0, 0])
    got = ops.ddim_step(x, out, t, t_prev, schedule, prediction="v", eta=0.0)
    with use_backend("reference"):
        ref = ops.ddim_step(x, out, t, t_prev, schedule, prediction="v", eta=0.0)
    assert bool(torch.isfinite(got).all())
    torch.testing.assert_close(got, ref)


# silent coercions
def test_float_spans_are_refused_not_truncated():
    with pytest.raises(ValueError, match="spans"):
        Layout.transfusion(torch.tensor([0, 8]), [[1.7, 4.9]])


def test_float_q_lens_are_refused_not_truncated():
    with pytest.raises(ValueError, match="q_lens"):
        Layout.decode(torch.tensor([0, 8]), [1.7])


def test_float_timesteps_are_refused_not_truncated():
    with pytest.raises(ValueError, match="timesteps"):
        ops.add_noise(torch.ones(2, 2), torch.tensor([1.7, 4.9]), get_schedule(), seed=0)
    with pytest.raises(ValueError, match="timesteps"):
        pack([[torch.tensor([1, 2]), torch.zeros(1, 4, 4)]], SMALL, timesteps=[1.7])


def test_float_seeds_are_refused_not_truncated(small_model):
    with pytest.raises(ValueError, match="seed"):
        pack([[torch.tensor([1, 2])]], SMALL, seed=1.7)
    with pytest.raises(ValueError, match="seed"):
        ops.add_noise(torch.ones(2, 2), torch.tensor([1, 4]), get_schedule(), seed=1.7)
    with pytest.raises(ValueError, match="seed"):
        generate(small_model, [[torch.tensor([1, 2])]], seed=1.7, progress=False)


def test_true_is_refused_for_scale_eps_and_block_sizes():
    q, k, v = _qkv(4)
    with pytest.raises(ValueError, match="scale"):
        ops.attention(q, k, v, Layout.causal(torch.tensor([0, 4])), scale=True)
    with pytest.raises(ValueError, match="eps"):
        ops.rms_norm(torch.randn(2, 8), torch.ones(8), eps=True)
    with pytest.raises(ValueError, match="block_m"):
        Layout.causal(torch.tensor([0, 4])).tile_counts(True, 16)


def test_interleaved_no_is_refused():
    q, k, _ = _qkv(4)
    with pytest.raises(ValueError, match="interleaved"):
        ops.apply_rope(q, k, torch.arange(4), interleaved="no")


def test_unknown_modality_key_in_span_shape_is_refused(small_model):
    with pytest.raises(ValueError, match="span_shape.*unknown"):
        generate(small_model, [[torch.tensor([1, SMALL.boi_id])]], span_shape={"imgae": (1, 4, 4)},
                 progress=False)


def test_rms_norm_eps_inf_raises():
    with pytest.raises(ValueError, match="eps"):
        ops.rms_norm(torch.randn(2, 8), torch.ones(8), eps=float("inf"))


def test_diffusion_loss_weight_inf_raises():
    with pytest.raises(ValueError, match="diffusion_loss_weight"):
        ModelConfig(diffusion_loss_weight=float("inf"))


# ----------------------------------------------------------------------------------- checkpoints
TINY = ModelConfig(dim=64, depth=1, n_heads=4, modalities=(IMAGE,))


def _model_and_optimizer(fill: float):
    torch.manual_seed(0)
    model = Model(TINY)
    opt = torch.optim.AdamW(model.parameters(), lr=fill)
    for p in model.parameters():
        p.grad = torch.full_like(p, fill)
    opt.step()
    return model, opt


def _legacy_checkpoint(path, weights_step: int, optim_step: int):
    model, opt = _model_and_optimizer(1.0)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, path, metadata={"format": LEGACY_FORMAT, "config": TINY.to_json(),
                                     "step": json.dumps(weights_step), "extra": "{}"})
    torch.save({"step": optim_step, "optimizer": opt.state_dict(), "rng": torch.get_rng_state()},
               path + ".optim.pt")


def test_legacy_weights_of_step_3_with_optimizer_of_step_1_are_refused(tmp_path):
    path = str(tmp_path / "ckpt.safetensors")
    _legacy_checkpoint(path, 3, 1)
    model, opt = _model_and_optimizer(2.0)
    with pytest.warns(UserWarning, match="previous format"), \
            pytest.raises(CheckpointError, match=r"step 1.*step 3"):
        load_checkpoint(path, model, opt)


def _saved(tmp_path, name="ckpt.safetensors"):
    model, opt = _model_and_optimizer(1.0)
    path = str(tmp_path / name)
    save_checkpoint(path, model, opt, step=3, ema=EMA(model, 0.9))
    return path


def test_flipped_bytes_in_tensor_data_fail_the_checksum(tmp_path):
    path = _saved(tmp_path)
    data = bytearray(open(path, "rb").read())
    data[-100] ^= 0xFF                                # inside the last tensor's bytes
    open(path, "wb").write(bytes(data))
    with pytest.raises(CheckpointError, match=r"checksum") as info:
        load_checkpoint(path)
    assert path in str(info.value)


def test_killed_saves_temp_files_are_removed_by_the_next_save(tmp_path):
    import socket
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = str(tmp_path / "ckpt.safetensors")
    leftovers = [f".ckpt.safetensors.saving.{socket.gethostname()}.{dead.pid}.0a1b2c3d.tmp",
                 ".ckpt.safetensors.abcdefgh.tmp", ".ckpt.safetensors.optim.pt.abcdefgh.tmp"]
    for name in leftovers:
        open(tmp_path / name, "wb").write(b"\0" * 1000)
    model, opt = _model_and_optimizer(1.0)
    save_checkpoint(path, model, opt, step=1)
    assert sorted(os.listdir(tmp_path)) == ["ckpt.safetensors"]


def _assert_load_names_path(path, pattern):
    with pytest.raises(CheckpointError, match=pattern) as info:
        load_checkpoint(path)
    assert repr(path) in str(info.value) or path in str(info.value)


def test_loading_a_directory_names_the_path(tmp_path):
    _assert_load_names_path(str(tmp_path), "directory")


def test_loading_a_truncated_checkpoint_names_the_path(tmp_path):
    path = _saved(tmp_path)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    _assert_load_names_path(path, "truncated|corrupt")


@pytest.mark.parametrize("content", [b"", b"garbage, not a checkpoint" * 10, b"\xff" * 64])
def test_loading_a_garbage_file_names_the_path(tmp_path, content):
    path = str(tmp_path / "garbage.safetensors")
    open(path, "wb").write(content)
    _assert_load_names_path(path, "not a readable safetensors file")


def test_loading_bad_metadata_json_names_the_path_and_the_field(tmp_path):
    path = str(tmp_path / "bad.safetensors")
    save_file({"w": torch.zeros(2)}, path, metadata={"format": tf.checkpoint.CHECKPOINT_FORMAT,
                                                      "config": "{not json", "step": "1"})
    _assert_load_names_path(path, r"'config' is not valid JSON")


def test_loading_a_corrupt_legacy_optim_pt_names_both_paths(tmp_path):
    path = str(tmp_path / "ckpt.safetensors")
    _legacy_checkpoint(path, 1, 1)
    open(path + ".optim.pt", "wb").write(b"\x80\x04garbage")
    model, opt = _model_and_optimizer(2.0)
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="cannot be read") as info:
        load_checkpoint(path, model, opt)
    assert path in str(info.value) and path + ".optim.pt" in str(info.value)


# ----------------------------------------------------------------------------------- unclear errors: the CLI
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny sine run directory with a checkpoint and no samples."""
    out = str(tmp_path_factory.mktemp("run"))
    assert main(["train", "--task", "sine", "--length", "16", "--num-samples", "20", "--steps", "1",
                 "--dim", "64", "--depth", "1", "--heads", "4", "--batch-size", "4", "--threads", "1",
                 "--backend", "reference", "--no-progress", "--out", out]) == 0
    return out


def _run_with_checkpoint(tmp_path, trained_run, mangle):
    out = tmp_path / "run"
    out.mkdir()
    data = open(os.path.join(trained_run, "checkpoint.safetensors"), "rb").read()
    target = out / "checkpoint.safetensors"
    mangle(target, data)
    return str(out)


@pytest.mark.parametrize("mangle", ["truncated", "garbage", "empty", "directory", "flipped"])
@pytest.mark.parametrize("command", ["sample", "eval"])
def test_cli_bad_checkpoints_are_one_line(tmp_path, trained_run, capsys, mangle, command):
    def write(target, data):
        if mangle == "truncated":
            target.write_bytes(data[: len(data) // 2])
        elif mangle == "garbage":
            target.write_bytes(b"not a checkpoint\n" * 50)
        elif mangle == "empty":
            target.write_bytes(b"")
        elif mangle == "directory":
            target.mkdir()
        else:
            flipped = bytearray(data)
            flipped[-50] ^= 0xFF
            target.write_bytes(bytes(flipped))
    out = _run_with_checkpoint(tmp_path, trained_run, write)
    assert_one_line_error([command, "--out", out, "--no-progress"], capsys, "checkpoint.safetensors")


CSV_CASES = {
    "missing": None,
    "empty": "",
    "header-only": "a,b,c\n",
    "non-numeric": "a,b\n1,2\nx,y\n3,4\n",
    "binary": b"\x00\x01\x02\xff\xfe" * 100,
    "too-short": "a,b\n" + "".join(f"{i},{i + 1}\n" for i in range(5)),
}


@pytest.mark.parametrize("case", sorted(CSV_CASES))
def test_cli_bad_csv_is_one_line_naming_the_file(tmp_path, capsys, case):
    path = tmp_path / "data.csv"
    content = CSV_CASES[case]
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    assert_one_line_error(["train", "--task", "csv", "--data", str(path), "--length", "16", "--steps", "1",
                           "--out", str(tmp_path / "run"), "--no-progress"], capsys, "data.csv")


@pytest.mark.parametrize("argv, name", [
    (["train", "--task", "csv"], "--data"),
    (["train", "--steps", "0"], "--steps"),
    (["train", "--batch-size", "0"], "--batch-size"),
    (["train", "--lr", "nan"], "--lr"),
    (["train", "--task", "sine", "--heads", "3"], "--heads"),
    (["train", "--dim", "0"], "--dim"),
    (["train", "--device", "bogus"], "--device"),
    (["sample", "--sample-steps", "0"], "--sample-steps"),
])
def test_cli_bad_options_are_one_line(tmp_path, capsys, argv, name):
    assert_one_line_error([*argv, "--out", str(tmp_path / "run"), "--no-progress"], capsys, name)


def test_cli_out_being_a_file_is_one_line(tmp_path, capsys):
    out = tmp_path / "file"
    out.write_text("x")
    assert_one_line_error(["train", "--out", str(out), "--no-progress"], capsys, "--out")


def test_cli_eval_without_samples_is_one_line(trained_run, capsys):
    assert_one_line_error(["eval", "--out", trained_run, "--no-progress"], capsys, "samples")


# ----------------------------------------------------------------------------------- unclear errors: the API
def test_model_on_a_batch_packed_with_another_config_names_the_mismatch(small_model):
    other = ModelConfig(dim=64, depth=1, n_heads=4, modalities=(ModalityConfig("image", "image", channels=3,
                                                                                patch_size=2, max_size=8),))
    batch = pack([[torch.tensor([1, 2]), torch.zeros(3, 4, 4)]], other)
    with pytest.raises(ValueError, match="config"):
        small_model(batch)


def test_generate_with_no_modalities_is_text_only_or_a_clear_error():
    torch.manual_seed(0)
    model = Model(ModelConfig(dim=64, depth=1, n_heads=4, modalities=())).eval()
    try:
        out = generate(model, [[torch.tensor([1, 2])]], max_new_tokens=8, progress=False)
    except ValueError as error:
        assert "modalit" in str(error)
    else:
        assert len(out) == 1 and out[0]
        assert all(isinstance(item, torch.Tensor) and item.dtype == torch.long for item in out[0])


@pytest.mark.parametrize("positions", [None, [0, 1, 2, 3]])
def test_apply_rope_positions_none_or_list_names_positions(positions):
    q, k, _ = _qkv(4)
    with pytest.raises((TypeError, ValueError), match="positions"):
        ops.apply_rope(q, k, positions)


@pytest.mark.parametrize("call", ["generate", "pack", "add_noise"])
def test_seed_2_to_70_names_seed(small_model, call):
    with pytest.raises(ValueError, match="seed"):
        if call == "generate":
            generate(small_model, [[torch.tensor([1, 2])]], seed=2**70, progress=False)
        elif call == "pack":
            pack([[torch.tensor([1, 2])]], SMALL, seed=2**70)
        else:
            ops.add_noise(torch.ones(2, 2), torch.tensor([1, 4]), get_schedule(), seed=2**70)


def test_layout_causal_beyond_int32_names_cu_seqlens():
    with pytest.raises(ValueError, match="cu_seqlens"):
        Layout.causal(torch.tensor([0, 2**31 + 8]))


@pytest.mark.parametrize("backend", ["auto", "reference", "triton"])
def test_double_backward_through_attention_is_a_clear_error(backend):
    q, k, v = (t.requires_grad_() for t in _qkv(4))
    with tf.use_backend(backend):
        out = ops.attention(q, k, v, Layout.causal(torch.tensor([0, 4])))
    (gq,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match=r"(?i)attention.*(double|twice|second)"):
        gq.sum().backward()
