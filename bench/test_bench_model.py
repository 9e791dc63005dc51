"""Model suite: one training step (forward + backward + AdamW) and one generation of an image span,
at a fixed small config, tokens/s, for each backend available on the platform.

Backends: ``auto`` (our kernels: the compiled CPU attention on CPU, Triton on CUDA) against
``reference`` (the plain PyTorch paths). ``triton`` is the same as ``auto`` on CUDA and only runs
under the interpreter on CPU, so it is not timed there.
"""
from __future__ import annotations

import functools

import pytest
import torch

import benchlib
from benchlib import CONFIG, RECORD, Compare, measure
from transfusion_fast import use_backend

SUITE = "model"
BACKENDS = ("auto", "reference")
THREADS = 2

if CONFIG.full:
    MODEL = dict(dim=256, depth=4, n_heads=4, max_seq_len=4096)
    IMAGE_SIZE, TEXT_TOKENS, SAMPLES, GEN_STEPS = 32, 64, 4, 25
else:
    MODEL = dict(dim=64, depth=1, n_heads=2, max_seq_len=512)
    IMAGE_SIZE, TEXT_TOKENS, SAMPLES, GEN_STEPS = 8, 8, 2, 2


def _api():
    """(Model, ModelConfig, ModalityConfig, pack, generate) or raise ImportError/AttributeError."""
    from transfusion_fast.generate import generate
    from transfusion_fast.model import ModalityConfig, Model, ModelConfig
    from transfusion_fast.pack import pack
    return Model, ModelConfig, ModalityConfig, pack, generate


@functools.lru_cache(maxsize=None)
def _setup():
    Model, ModelConfig, ModalityConfig, pack, generate = _api()
    config = ModelConfig(modalities=(ModalityConfig("image", channels=3, patch_size=2, max_size=IMAGE_SIZE),),
                         **MODEL)
    g = torch.Generator().manual_seed(0)
    text = lambda: torch.randint(0, 256, (TEXT_TOKENS,), generator=g)  # noqa: E731
    samples = [[text(), torch.rand(3, IMAGE_SIZE, IMAGE_SIZE, generator=g) * 2 - 1, text()]
               for _ in range(SAMPLES)]
    batch = pack(samples, config, seed=0, cfg_drop_prob=0.0, device=CONFIG.device)
    return config, batch


def _fresh_model():
    Model = _api()[0]
    config, _ = _setup()
    torch.manual_seed(0)
    return Model(config).to(benchlib.device())


def _case(kind: str) -> str:
    return (f"{kind} dim={MODEL['dim']} depth={MODEL['depth']} heads={MODEL['n_heads']} "
            f"{SAMPLES}x(text {TEXT_TOKENS}, image {IMAGE_SIZE}px, text {TEXT_TOKENS})"
            if kind == "train step" else
            f"{kind} image {IMAGE_SIZE}px, {GEN_STEPS} DDIM steps, cfg 5")


def _compare(backend: str) -> tuple:
    return (Compare("reference"),) if backend == "auto" else ()


def _available(case: str, backend: str, attempt=None) -> bool:
    """Whether the model API exists and ``attempt`` runs; a missing piece is recorded, not fatal."""
    reason = benchlib.probe(_setup)
    if not reason and attempt is not None:
        reason = benchlib.probe(attempt)
    if reason:
        RECORD.mark_unavailable(SUITE, case, backend, reason)
    return not reason


def _train_once(model, backend: str) -> float:
    _, batch = _setup()
    with use_backend(backend):
        loss = model(batch)["loss"]
        loss.backward()
    return loss.detach().item()


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_step(benchmark, backend: str):
    case = _case("train step")
    with benchlib.num_threads(THREADS):
        if not _available(case, backend, lambda: _train_once(_fresh_model(), backend)):
            return
        _, batch = _setup()
        model = _fresh_model()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        reference_loss = _train_once(_fresh_model(), "reference")

        def step():
            with use_backend(backend):
                loss = model(batch)["loss"]
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            return loss.detach()
        loss = measure(benchmark, step, suite=SUITE, case=case, impl=backend, threads=THREADS,
                       dtype=torch.float32, tokens=batch.tokens.numel(), compare=_compare(backend),
                       rounds=3, warmup=1)
    assert torch.isfinite(loss)
    # The first step of a fresh model sees the initial weights: both backends compute one loss.
    first = _train_once(_fresh_model(), backend)
    assert abs(first - reference_loss) <= 1e-3 * max(1.0, abs(reference_loss))


@pytest.mark.parametrize("backend", BACKENDS)
def test_generate_image_span(benchmark, backend: str):
    case = _case("generate")
    with benchlib.num_threads(THREADS):
        if not _available(case, backend):      # the model API itself
            return
        config, _ = _setup()
        generate = _api()[4]
        model = _fresh_model().eval()
        prompt = [[torch.tensor([1, 2, 3, config.boi_id])]]     # a BOI forces an image span first
        shape = (3, IMAGE_SIZE, IMAGE_SIZE)

        def run():
            with use_backend(backend), torch.no_grad():
                return generate(model, prompt, max_new_tokens=1, num_inference_steps=GEN_STEPS,
                                cfg_scale=5.0, span_shape=shape, progress=False, seed=0)
        if not _available(case, backend, run):
            return
        patches = (IMAGE_SIZE // 2) ** 2
        # The availability probe above ran one whole generation: it is the warm-up.
        out = measure(benchmark, run, suite=SUITE, case=case, impl=backend, threads=THREADS,
                      dtype=torch.float32, tokens=patches, compare=_compare(backend), rounds=2, warmup=0)
    spans = [item for item in out[0] if item.dim() > 1]
    assert spans and tuple(spans[0].shape) == shape and torch.isfinite(spans[0]).all()
