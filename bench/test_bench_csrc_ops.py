"""Compiled (csrc/) ops suite: patchify / unpatchify, add_noise and the sampler steps (DDPM / DDIM and the flow steps Euler / Heun, with classifier-free guidance), with 1 and 2
threads, against their eager PyTorch compositions and a plain copy (``clone``) of the same bytes.

Goals (issue 5): at least 2x faster than eager, and at least 70% of the copy's bandwidth for the
pure data-movement ops (patchify / unpatchify). add_noise generates its noise (Philox + Box-Muller)
in the same pass, so its bandwidth against a copy is reported without a goal.
"""
from __future__ import annotations

import functools

import pytest
import torch

import benchlib
from benchlib import CONFIG, RECORD, Compare, measure
from transfusion_fast import ops
from transfusion_fast.schedules import get_schedule

SUITE = "csrc ops"
THREAD_COUNTS = (1, 2)
IMPLS = ("ours", "eager", "copy")
DTYPE = torch.float32

if CONFIG.full:
    IMAGES = (16, 4, 256, 256) if not CONFIG.on_gpu else (64, 4, 512, 512)
    NOISE_ROWS, NOISE_DIM = (65536, 64) if not CONFIG.on_gpu else (1 << 20, 64)
else:
    IMAGES = (2, 3, 16, 16)
    NOISE_ROWS, NOISE_DIM = (64, 12)
PATCH = 2


def _mb(t: torch.Tensor) -> str:
    return f"{t.numel() * t.element_size() / 2**20:.0f} MiB" if t.numel() * t.element_size() >= 2**20 \
        else f"{t.numel() * t.element_size() / 2**10:.0f} KiB"


@functools.lru_cache(maxsize=None)
def _data() -> dict:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(*IMAGES, generator=g).to(benchlib.device(), DTYPE)
    patches = ops.patchify_reference(images, PATCH).contiguous()
    x0 = torch.randn(NOISE_ROWS, NOISE_DIM, generator=g).to(benchlib.device(), DTYPE)
    schedule = get_schedule("cosine", 1000)
    timesteps = torch.randint(0, schedule.num_steps, (NOISE_ROWS,), generator=g).to(benchlib.device())
    return {"images": images, "patches": patches, "x0": x0, "timesteps": timesteps, "schedule": schedule}


def _eager_add_noise(x0, timesteps, schedule):
    """The eager composition of q_sample: randn + two multiplies (and the add)."""
    noise = torch.randn_like(x0)
    alpha_bar = schedule.alphas_cumprod_on(x0.device, torch.float32)[timesteps][:, None]
    return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise, noise


def _sampler_fn(name: str):
    """The public sampler step ``name`` or None (the sampler ops may not exist yet)."""
    fn = getattr(ops, name, None)
    if fn is None:
        sampler, _ = benchlib.try_import("transfusion_fast.ops.sampler")
        fn = getattr(sampler, name, None)
    return fn


@functools.lru_cache(maxsize=None)
def _step_data() -> dict:
    d = _data()
    g = torch.Generator().manual_seed(1)
    cond, uncond = (torch.randn(NOISE_ROWS, NOISE_DIM, generator=g).to(benchlib.device(), DTYPE)
                    for _ in range(2))
    t = torch.randint(1, d["schedule"].num_steps, (NOISE_ROWS,), generator=g).to(benchlib.device())
    return {"cond": cond, "uncond": uncond, "t": t, "t_prev": torch.clamp(t - 4, min=-1)}


def _eager_step(kind: str, x_t, cond, uncond, t, t_prev, schedule, cfg_scale):
    """The eager fp32 composition of one guided epsilon-prediction step (DDPM adds its noise)."""
    table = schedule.alphas_cumprod_on(x_t.device, torch.float32)
    ab_t = table[t][:, None]
    ab_prev = torch.where(t_prev[:, None] >= 0, table[t_prev.clamp(min=0)][:, None], torch.ones_like(ab_t))
    eps = uncond + cfg_scale * (cond - uncond)
    x0 = (x_t - (1 - ab_t).sqrt() * eps) / ab_t.sqrt()
    if kind == "ddim_step":
        return ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps
    beta = 1 - ab_t / ab_prev
    mean = (ab_prev.sqrt() * beta / (1 - ab_t)) * x0 + ((ab_t / ab_prev).sqrt() * (1 - ab_prev) / (1 - ab_t)) * x_t
    sigma = ((1 - ab_prev) / (1 - ab_t) * beta).clamp(min=1e-20).sqrt() * (t[:, None] > 0)
    return mean + sigma * torch.randn_like(x_t)


def _step_case(kind: str) -> dict:
    d, sd = _data(), _step_data()
    x_t, schedule = d["x0"], d["schedule"]
    args = (x_t, sd["cond"], sd["t"], sd["t_prev"], schedule)
    seed = {"seed": 0} if kind == "ddpm_step" else {}
    fn = _sampler_fn(kind)
    return {
        "ours": None if fn is None else (lambda: fn(*args, uncond_out=sd["uncond"], cfg_scale=5.0, **seed)),
        "eager": lambda: _eager_step(kind, x_t, sd["cond"], sd["uncond"], sd["t"], sd["t_prev"], schedule, 5.0),
        "copy": lambda: x_t.clone(),
        # read x_t, the conditional and unconditional outputs and two timesteps per row; write x_prev
        "bytes": 4 * x_t.numel() * x_t.element_size() + 2 * sd["t"].numel() * sd["t"].element_size(),
        "copy_bytes": 2 * x_t.numel() * x_t.element_size(),
        "bandwidth_goal": None,
        "missing": None if fn is not None else f"transfusion_fast.ops.{kind} does not exist yet",
    }


@functools.lru_cache(maxsize=None)
def _flow_data() -> dict:
    g = torch.Generator().manual_seed(2)
    t = (torch.rand(NOISE_ROWS, generator=g) * 0.9 + 0.1).to(benchlib.device())
    x_pred = torch.randn(NOISE_ROWS, NOISE_DIM, generator=g).to(benchlib.device(), DTYPE)
    return {"t": t, "t_next": t * 0.9, "x_pred": x_pred}


def _eager_flow_step(kind: str, x_t, x_pred, cond, uncond, t, t_next, cfg_scale):
    """The eager fp32 composition of one guided flow step: Euler x + h·v, Heun's corrector
    x/2 + x_pred/2 + h/2·v."""
    h = (t_next - t)[:, None]
    v = uncond + cfg_scale * (cond - uncond)
    if kind == "euler_step":
        return x_t + h * v
    return 0.5 * x_t + (0.5 * h) * v + 0.5 * x_pred


def _flow_step_args(kind: str):
    d, sd, fd = _data(), _step_data(), _flow_data()
    head = (d["x0"],) if kind == "euler_step" else (d["x0"], fd["x_pred"])
    return (*head, sd["cond"], fd["t"], fd["t_next"]), dict(uncond_out=sd["uncond"], cfg_scale=5.0)


def _flow_step_case(kind: str) -> dict:
    d, sd, fd = _data(), _step_data(), _flow_data()
    x_t = d["x0"]
    args, kwargs = _flow_step_args(kind)
    fn = _sampler_fn(kind)
    inputs = 4 if kind == "euler_step" else 5     # x_t (x_pred), cond, uncond read; out written
    return {
        "ours": None if fn is None else (lambda: fn(*args, **kwargs)),
        "eager": lambda: _eager_flow_step(kind, x_t, fd["x_pred"], sd["cond"], sd["uncond"], fd["t"], fd["t_next"],
                                          5.0),
        "copy": lambda: x_t.clone(),
        "bytes": inputs * x_t.numel() * x_t.element_size() + 2 * fd["t"].numel() * fd["t"].element_size(),
        "copy_bytes": 2 * x_t.numel() * x_t.element_size(),
        "bandwidth_goal": None,
        "missing": None if fn is not None else f"transfusion_fast.ops.{kind} does not exist yet",
    }


def _ops() -> dict:
    d = _data()
    images, patches, x0, t, sched = d["images"], d["patches"], d["x0"], d["timesteps"], d["schedule"]
    height, width = IMAGES[2], IMAGES[3]
    return {
        f"patchify {tuple(IMAGES)} p={PATCH} ({_mb(images)})": {
            "ours": lambda: ops.patchify(images, PATCH),
            "eager": lambda: ops.patchify_reference(images, PATCH).contiguous(),
            "copy": lambda: images.clone(),
            "bytes": 2 * images.numel() * images.element_size(),
            "copy_bytes": 2 * images.numel() * images.element_size(),
            "bandwidth_goal": 0.7,
        },
        f"unpatchify {tuple(patches.shape)} p={PATCH} ({_mb(patches)})": {
            "ours": lambda: ops.unpatchify(patches, PATCH, height, width),
            "eager": lambda: ops.unpatchify_reference(patches, PATCH, height, width).contiguous(),
            "copy": lambda: patches.clone(),
            "bytes": 2 * patches.numel() * patches.element_size(),
            "copy_bytes": 2 * patches.numel() * patches.element_size(),
            "bandwidth_goal": 0.7,
        },
        f"add_noise ({NOISE_ROWS},{NOISE_DIM}) ({_mb(x0)})": {
            "ours": lambda: ops.add_noise(x0, t, sched, seed=0),
            "eager": lambda: _eager_add_noise(x0, t, sched),
            "copy": lambda: x0.clone(),
            # read x0 (and the timestep per row), write x_t and the noise
            "bytes": 3 * x0.numel() * x0.element_size() + t.numel() * t.element_size(),
            "copy_bytes": 2 * x0.numel() * x0.element_size(),
            "bandwidth_goal": None,
        },
        f"ddpm_step cfg ({NOISE_ROWS},{NOISE_DIM}) ({_mb(x0)})": _step_case("ddpm_step"),
        f"ddim_step cfg eta=0 ({NOISE_ROWS},{NOISE_DIM}) ({_mb(x0)})": _step_case("ddim_step"),
        f"euler_step cfg ({NOISE_ROWS},{NOISE_DIM}) ({_mb(x0)})": _flow_step_case("euler_step"),
        f"heun_step cfg ({NOISE_ROWS},{NOISE_DIM}) ({_mb(x0)})": _flow_step_case("heun_step"),
    }


OPS = _ops()


def _check(case: str, result):
    d = _data()
    if case.startswith("patchify"):
        assert torch.equal(result, ops.patchify_reference(d["images"], PATCH))
    elif case.startswith("unpatchify"):
        assert torch.equal(result, d["images"])
    elif case.startswith(("ddpm_step", "ddim_step")):
        kind = case.split()[0]
        sampler, _ = benchlib.try_import("transfusion_fast.ops.sampler")
        reference = getattr(sampler, f"{kind}_reference")
        sd = _step_data()
        seed = {"seed": 0} if kind == "ddpm_step" else {}
        expected = reference(d["x0"], sd["cond"], sd["t"], sd["t_prev"], d["schedule"],
                             uncond_out=sd["uncond"], cfg_scale=5.0, **seed)
        torch.testing.assert_close(result, expected, atol=1e-4, rtol=1e-4)
    elif case.startswith(("euler_step", "heun_step")):
        kind = case.split()[0]
        sampler, _ = benchlib.try_import("transfusion_fast.ops.sampler")
        args, kwargs = _flow_step_args(kind)
        # the reference twin follows the kernel's operations: the same bits
        assert torch.equal(result, getattr(sampler, f"{kind}_reference")(*args, **kwargs))
    else:
        x_t, noise = result
        expected = ops.add_noise_reference(d["x0"], d["timesteps"], d["schedule"], noise)
        torch.testing.assert_close(x_t, expected, atol=1e-5, rtol=1e-5)
        assert abs(float(noise.float().std()) - 1) < 0.2


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("threads", THREAD_COUNTS)
@pytest.mark.parametrize("case", list(OPS), ids=[c.split()[0] for c in OPS])
def test_csrc_op(benchmark, case: str, threads: int, impl: str):
    spec = OPS[case]
    label = f"{case} {threads} thr"
    if impl == "ours":
        compare = (Compare("eager", "speedup", 2.0), Compare("copy", "per_work", spec["bandwidth_goal"]))
    else:
        compare = ()
    moved = spec["copy_bytes"] if impl == "copy" else spec["bytes"]
    if impl == "ours":
        missing = spec.get("missing") or benchlib.probe(spec["ours"])
        if missing:
            RECORD.mark_unavailable(SUITE, label, "ours", missing)
            return
    with benchlib.num_threads(threads):
        result = measure(benchmark, spec[impl], suite=SUITE, case=label,
                         impl="ours-compiled" if impl == "ours" else impl, dtype=DTYPE, threads=threads,
                         moved_bytes=moved, work=moved, work_unit="bytes", compare=compare,
                         rounds=20, warmup=2)
    if impl == "copy":
        assert result.shape == (spec["copy"]().shape)
    elif impl == "ours":
        _check(case, result)
