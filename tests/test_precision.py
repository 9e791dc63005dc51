"""Mixed precision: the Model under torch.autocast with fp32 parameters (docs/mixed_precision.md).

Training forward + backward, generation and the trainer run under autocast (bf16 on CPU and CUDA,
fp16 too); the loss stays within the autocast dtype's tolerance of the fp32 loss, every gradient is
finite and fp32, a short overfit converges like fp32. Settings a device or backend cannot honour
raise an error naming the setting.
"""
import pytest
import torch

import transfusion_fast as tf
from transfusion_fast import Model, ModelConfig, pack
from transfusion_fast.app.trainer import autocast
from transfusion_fast.testing import IMAGE, SERIES

#: relative tolerance of the loss and of each gradient tensor (in norm) against the fp32 run
LOSS_RTOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}
GRAD_RTOL = {torch.bfloat16: 5e-2, torch.float16: 1e-2}


def config(**overrides) -> ModelConfig:
    base = dict(dim=32, depth=2, n_heads=2, n_kv_heads=1, modalities=(IMAGE, SERIES))
    base.update(overrides)
    return ModelConfig(**base)


def samples(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.tensor([1, 2, 3]), torch.randn(1, 4, 4, generator=g), torch.tensor([5, 6])],
            [torch.randn(8, 3, generator=g)],
            [torch.tensor([7, 8, 9, 10, 11])],
            [torch.randn(1, 2, 4, generator=g), torch.tensor([12]), torch.randn(1, 4, 2, generator=g)]]


def run(model, batch, device, dtype):
    model.zero_grad(set_to_none=True)
    with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None):
        out = model(batch)
    out["loss"].backward()
    return out, {n: p.grad for n, p in model.named_parameters()}


def check_against_fp32(model, batch, device, dtype):
    want, want_grads = run(model, batch, device, None)
    got, grads = run(model, batch, device, dtype)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    for key in ("loss", "lm_loss", "diffusion_loss"):
        assert got[key].dtype == torch.float32
        torch.testing.assert_close(got[key], want[key], rtol=LOSS_RTOL[dtype], atol=1e-4, msg=key)
    for name, g in grads.items():
        assert g is not None and g.dtype == torch.float32, name
        assert torch.isfinite(g).all(), name
        error = (g - want_grads[name]).norm() / want_grads[name].norm().clamp_min(1e-6)
        assert error <= GRAD_RTOL[dtype], (name, float(error))


@pytest.mark.parametrize("backend, dtype", [("reference", torch.bfloat16), ("auto", torch.bfloat16),
                                            ("auto", torch.float16)])
@pytest.mark.parametrize("conditioning", ["patch_add", "adaln_zero"])
def test_autocast_matches_fp32_on_cpu(backend, dtype, conditioning):
    cfg = config(conditioning=conditioning, span_positions="axial" if conditioning == "adaln_zero" else "sequential")
    torch.manual_seed(0)
    model = Model(cfg)
    batch = pack(samples(), cfg, seed=0, cfg_drop_prob=0.0)
    with tf.use_backend(backend):
        check_against_fp32(model, batch, "cpu", dtype)


def test_autocast_through_the_triton_kernels(triton_device):
    """The Triton path under autocast (the interpreter on CPU runs fp16: its bf16 dots are wrong)."""
    dtype = torch.bfloat16 if triton_device == "cuda" else torch.float16
    cfg = config(depth=1, modalities=(IMAGE,))
    torch.manual_seed(0)
    model = Model(cfg).to(triton_device)
    batch = pack([[torch.tensor([1, 2]), torch.randn(1, 4, 4), torch.tensor([3])], [torch.tensor([4, 5, 6])]],
                 cfg, seed=0, device=triton_device)
    with tf.use_backend("triton"):
        check_against_fp32(model, batch, triton_device, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_matches_fp32_on_cuda(dtype):
    """CPU twin: test_autocast_matches_fp32_on_cpu."""
    cfg = config(dim=64, n_heads=4, n_kv_heads=2)
    torch.manual_seed(0)
    model = Model(cfg).cuda()
    batch = pack(samples(), cfg, seed=0, cfg_drop_prob=0.0, device="cuda")
    check_against_fp32(model, batch, "cuda", dtype)


def _overfit(dtype, steps=25):
    cfg = config(depth=1, modalities=(IMAGE,), diffusion_loss_weight=1.0)
    torch.manual_seed(0)
    model = Model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2, weight_decay=0.0)
    g = torch.Generator().manual_seed(3)
    data = [[torch.tensor([10, 20, 30, 40]), torch.randn(1, 4, 4, generator=g)],
            [torch.tensor([50, 60]), torch.randn(1, 4, 4, generator=g), torch.tensor([70, 80, 90])]]
    batch = pack(data, cfg, seed=0, cfg_drop_prob=0.0, timesteps=[600, 800])
    history = []
    for _ in range(steps):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            out = model(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        history.append([float(out[k].detach()) for k in ("lm_loss", "diffusion_loss")])
    return torch.tensor(history)


def test_bf16_overfit_converges_like_fp32():
    fp32, bf16 = _overfit(None), _overfit(torch.bfloat16)
    for curve in (fp32, bf16):
        assert (curve[-1] < 0.1 * curve[0]).all(), curve[[0, -1]]
    # Step by step the two runs stay together (both losses, as a fraction of their start).
    gap = ((bf16 - fp32).abs() / fp32[0]).max()
    assert gap < 0.05, float(gap)


def test_generate_under_autocast():
    cfg = config(depth=1)
    torch.manual_seed(0)
    model = Model(cfg).eval()
    prompt = [[torch.tensor([1, 2, cfg.boi_id])], [torch.tensor([4, 5])]]
    kwargs = dict(max_new_tokens=4, num_inference_steps=4, seed=0, progress=False, temperature=0.0)
    want = model.generate(prompt, **kwargs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model.generate(prompt, **kwargs)
    span, span_fp32 = got[0][0], want[0][0]
    assert span.dtype == torch.float32 and span.shape == span_fp32.shape == (1, 8, 8)
    assert torch.isfinite(span).all()
    # The same noise through the same 4 DDIM steps: the bf16 backbone moves the span a little.
    assert (span - span_fp32).abs().max() < 0.1 * span_fp32.abs().max()
    assert all(item.dtype == torch.int64 for item in got[1])


# ------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("device, precision, words", [
    ("cpu", "fp8", ["precision must be one of", "'fp8'"]),
    ("meta", "bf16", ["precision='bf16'", "cpu or cuda", "'meta'"]),
])
def test_precision_the_device_cannot_honour_is_refused(device, precision, words):
    with pytest.raises(ValueError) as info:
        autocast(device, precision)
    for word in words:
        assert word in str(info.value)


def test_triton_interpreter_refuses_bf16_attention(triton_device):
    if triton_device == "cuda":
        pytest.skip("the refusal is for the interpreter; on a GPU bf16 runs (test_autocast_matches_fp32_on_cuda)")
    q = torch.randn(8, 2, 16, dtype=torch.bfloat16)
    layout = tf.Layout.causal(torch.tensor([0, 8]))
    with tf.use_backend("triton"), pytest.raises(ValueError, match="backend 'triton' runs bf16 on a GPU only"):
        tf.ops.attention(q, q, q, layout)
