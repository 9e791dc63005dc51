"""Model.generate: well-formed mixed-modal output, KV cache = full recompute, determinism, CFG, errors."""
import pytest
import torch

import transfusion_fast as tf
from transfusion_fast import Model, ModelConfig
from transfusion_fast.generate import KVCache, _Forward, sample_tokens
from transfusion_fast.pack import prepare_sample
from transfusion_fast.testing import IMAGE, SERIES, EOS, BOI, EOI



pytestmark = pytest.mark.usefixtures("reference_backend")


def tiny_model(**overrides):
    config = ModelConfig(**{**dict(dim=32, depth=2, n_heads=2, n_kv_heads=1, modalities=(IMAGE, SERIES)),
                            **overrides})
    torch.manual_seed(0)
    return Model(config).eval()


def steer(model, plan):
    """Make the k-th next-token prediction favour ``plan[k]`` (a forward hook on the LM head)."""
    calls = []

    def hook(module, inputs, logits):
        target = plan[min(len(calls), len(plan) - 1)]
        calls.append(target)
        logits = logits.clone()
        logits[:, target] += 1e4
        return logits
    return model.output.register_forward_hook(hook)


def greedy_by_full_recompute(model, items, steps):
    """Greedy text continuation recomputing the whole prompt every step (no cache reuse)."""
    tokens = []
    for _ in range(steps):
        sample = prepare_sample(items + [torch.tensor(tokens, dtype=torch.long)], model.config,
                                add_eos=False, allow_empty=True)
        spans = [(off, m, shape, x) for off, m, x, shape, _ in sample.spans]
        cache = KVCache(model.config.depth)
        fwd = _Forward(model, cache, [cache.new_doc()], [(sample.tokens, spans)])
        h = fwd({name: (torch.cat([x for _, mm, _, x in spans if mm.name == name]),
                        torch.zeros(rows.numel(), dtype=torch.long)) for name, rows in fwd.rows.items()})
        tokens.append(int(model.output(h[fwd.last_rows]).argmax(-1)))
    return tokens


def test_generated_sequence_is_well_formed():
    model = tiny_model()
    # LM-head calls: prompt, after 5, after BOI (unused: the span comes next), after EOI, after 7.
    handle = steer(model, [5, BOI, 0, 7, EOS])
    try:
        out = model.generate([[torch.tensor([1, 2])]], max_new_tokens=10, temperature=0.0,
                             num_inference_steps=4, span_shape=(4, 6), progress=False)
    finally:
        handle.remove()
    text_before, image, text_after = out[0]
    assert text_before.tolist() == [5, BOI]
    assert image.shape == (1, 4, 6) and image.dtype == torch.float32 and torch.isfinite(image).all()
    assert text_after.tolist() == [EOI, 7, EOS]


def test_forced_span_for_each_modality_and_batching():
    model = tiny_model()
    prompts = [[torch.tensor([1, BOI])], [torch.tensor([250])], [torch.tensor([3])]]
    out = model.generate(prompts, max_new_tokens=3, num_inference_steps=3, seed=0, progress=False,
                         span_shape={"image": (1, 4, 4), "series": (8, 3)}, stop_at_eos=False)
    assert out[0][0].shape == (1, 4, 4) and out[0][1][0] == EOI
    assert out[1][0].shape == (8, 3) and out[1][1][0] == 251
    assert out[2][0].dtype == torch.long and out[2][0].numel() == 3 or out[2][0][-1] == BOI
    for items in out:   # the span is always followed by its EOI; text budget counts sampled tokens
        texts = [t for t in items if t.dtype == torch.long]
        assert sum(t.numel() for t in texts) - sum(int((t == EOI).sum() + (t == 251).sum()) for t in texts) <= 3


def test_deterministic_given_seed():
    model = tiny_model()
    prompts = [[torch.tensor([1, BOI])], [torch.tensor([4, 5])]]
    kwargs = dict(max_new_tokens=4, num_inference_steps=3, span_shape=(4, 4), progress=False, top_k=50,
                  top_p=0.9)
    a = model.generate(prompts, seed=11, **kwargs)
    b = model.generate(prompts, seed=11, **kwargs)
    c = model.generate(prompts, seed=12, **kwargs)
    flat = lambda out: [x for items in out for x in items]  # noqa: E731
    assert len(flat(a)) == len(flat(b)) and all(torch.equal(x, y) for x, y in zip(flat(a), flat(b)))
    assert not torch.equal(a[0][0], c[0][0])     # a different seed samples a different image


def test_kv_cache_matches_full_recompute_with_an_image_in_the_prompt():
    """Captioning: an image in the prompt, greedy text out, equal to recomputing from scratch."""
    model = tiny_model(span_positions="axial", conditioning="adaln_zero")
    # adaLN-Zero starts as identity on spans: perturb it so the image actually matters.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    prompt = [torch.tensor([1, 2]), torch.randn(1, 4, 4, generator=g), torch.tensor([3])]
    out = model.generate([prompt], max_new_tokens=6, temperature=0.0, stop_at_eos=False, progress=False)
    assert len(out[0]) == 1 and out[0][0].tolist() == greedy_by_full_recompute(model, prompt, 6)


def test_text_after_a_generated_span_sees_the_clean_span():
    """The span's committed KV equals a fresh prefill of the sequence holding the clean span."""
    model = tiny_model()
    prompt = [torch.tensor([1, BOI])]
    out = model.generate([prompt], max_new_tokens=4, temperature=0.0, num_inference_steps=3,
                         span_shape=(4, 4), stop_at_eos=False, cfg_scale=2.0, progress=False)
    image, after = out[0]
    assert after[0] == EOI
    rebuilt = [torch.tensor([1]), image]   # prepare_sample re-inserts BOI … EOI around the image
    assert after[1:].tolist() == greedy_by_full_recompute(model, rebuilt, 4)


def test_batched_text_equals_one_prompt_at_a_time():
    model = tiny_model()
    prompts = [[torch.tensor([1, 2, 3, 4, 5])], [torch.tensor([9])], [torch.randn(1, 2, 2)]]
    together = model.generate(prompts, max_new_tokens=5, temperature=0.0, stop_at_eos=False, progress=False)
    for prompt, items in zip(prompts, together):
        alone = model.generate([prompt], max_new_tokens=5, temperature=0.0, stop_at_eos=False, progress=False)
        assert torch.equal(alone[0][0], items[0])


@pytest.mark.parametrize("cfg_scale, twin_rows", [(1.0, 0), (5.0, 2)])
def test_prefix_kv_is_computed_once(cfg_scale, twin_rows):
    """Rows through the first layer: prompt once, then only the span rows per diffusion step."""
    model = tiny_model()
    rows = []
    handle = model.layers[0].attention.wqkv.register_forward_hook(lambda m, i, o: rows.append(o.shape[0]))
    prompt_len, steps, n = 1 + 7, 5, 4         # BOS + 6 text tokens + BOI; a 4x4 image = 4 patches
    try:
        model.generate([[torch.tensor([1, 2, 3, 4, 5, 6, BOI])]], max_new_tokens=0, num_inference_steps=steps,
                       span_shape=(4, 4), cfg_scale=cfg_scale, progress=False)
    finally:
        handle.remove()
    guided = 2 if cfg_scale != 1.0 else 1
    expected = [prompt_len] + ([twin_rows] if twin_rows else []) + [guided * n] * steps + [n, 1]
    assert rows == expected


def test_cfg_changes_the_sample_and_ddpm_runs():
    model = tiny_model()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    prompt = [[torch.tensor([1, 2, BOI])]]
    common = dict(max_new_tokens=0, num_inference_steps=4, span_shape=(4, 4), seed=3, progress=False)
    plain = model.generate(prompt, cfg_scale=1.0, **common)[0][0]
    guided = model.generate(prompt, cfg_scale=5.0, **common)[0][0]
    assert not torch.allclose(plain, guided)
    d1 = model.generate(prompt, sampler="ddpm", **common)[0][0]
    d2 = model.generate(prompt, sampler="ddpm", **common)[0][0]
    assert torch.equal(d1, d2) and not torch.allclose(d1, guided)


def test_progress_bar(capsys):
    model = tiny_model()
    model.generate([[torch.tensor([BOI])]], max_new_tokens=0, num_inference_steps=3, span_shape=(2, 2),
                   progress=True)
    assert "diffusion[image]" in capsys.readouterr().err
    model.generate([[torch.tensor([BOI])]], max_new_tokens=0, num_inference_steps=3, span_shape=(2, 2),
                   progress=False)
    assert "diffusion" not in capsys.readouterr().err


def test_sample_tokens_filters():
    logits = torch.tensor([[2.0, 3.0, 2.9, -5.0]] * 64)
    g = torch.Generator().manual_seed(0)
    assert sample_tokens(logits, 0.0, None, None, g).tolist() == [1] * 64
    assert sample_tokens(logits, 1.0, 1, None, g).tolist() == [1] * 64
    assert set(sample_tokens(logits, 1.0, 2, None, g).tolist()) == {1, 2}
    assert sample_tokens(logits, 1.0, None, 0.3, g).tolist() == [1] * 64
    assert set(sample_tokens(logits, 1.0, None, 1.0, g).tolist()) >= {0, 1, 2}


@pytest.mark.parametrize("kwargs, words", [
    (dict(temperature=-1.0), ["temperature", "-1.0"]),
    (dict(top_k=0), ["top_k", "0"]),
    (dict(top_p=0.0), ["top_p", "0.0"]),
    (dict(sampler="euler"), ["sampler", "'euler'"]),
    (dict(num_inference_steps=0), ["num_inference_steps", "<= 1000", "0"]),
    (dict(span_shape=(5, 4)), ["span_shape", "height", "patch size 2", "got 5"]),
    (dict(modality="video"), ["modality", "'video'"]),
    (dict(max_new_tokens=-1), ["max_new_tokens", "-1"]),
])
def test_bad_arguments(kwargs, words):
    model = tiny_model()
    with pytest.raises(ValueError) as info:
        model.generate([[torch.tensor([1])]], progress=False, **kwargs)
    for word in words:
        assert word in str(info.value)


def test_bad_prompts():
    model = tiny_model()
    with pytest.raises(ValueError, match="prompts must be a non-empty list"):
        model.generate([], progress=False)
    with pytest.raises(ValueError, match=r"prompts\[1\]\[0\].*vocab_size=260.*999"):
        model.generate([[torch.tensor([1])], [torch.tensor([999])]], progress=False)
    with pytest.raises(ValueError, match=r"prompts\[0\]\[0\].*1 channels, got 3"):
        model.generate([[torch.randn(3, 4, 4)]], progress=False)


def test_default_backend_generation_equals_reference():
    """The decode layouts through the compiled CPU kernels give the reference's tokens and spans."""
    model = tiny_model(span_positions="axial")
    prompts = [[torch.tensor([1, 2, BOI])], [torch.tensor([3]), torch.randn(1, 2, 4), torch.tensor([4])]]
    kwargs = dict(max_new_tokens=4, temperature=0.0, num_inference_steps=3, span_shape=(4, 4),
                  stop_at_eos=False, progress=False)
    expected = model.generate(prompts, **kwargs)
    with tf.use_backend("auto"):
        got = model.generate(prompts, **kwargs)
    for items, ref_items in zip(got, expected):
        assert len(items) == len(ref_items)
        for x, ref in zip(items, ref_items):
            if ref.dtype == torch.long:
                assert torch.equal(x, ref)
            else:
                torch.testing.assert_close(x, ref, rtol=1e-4, atol=1e-4)


def test_generation_stops_at_max_seq_len():
    model = tiny_model(max_seq_len=12)
    out = model.generate([[torch.tensor([1, 2, 3])]], max_new_tokens=50, stop_at_eos=False, span_shape=(8, 8),
                         num_inference_steps=2, progress=False)
    # BOS + 3 prompt tokens + 8 sampled = 12 rows.
    assert out[0][0].numel() == 8


def test_a_prompt_that_cannot_hold_what_it_asks_for_is_refused():
    model = tiny_model(max_seq_len=12)
    # An 8x8 image (16 patches) cannot fit after BOS 1 BOI: refused, not an empty answer.
    with pytest.raises(ValueError, match=r"prompts\[1\] ends with a BOI.*max_seq_len=12 leaves room for 9"):
        model.generate([[torch.tensor([1, 2, 3])], [torch.tensor([1, BOI])]], max_new_tokens=50,
                       span_shape=(8, 8), num_inference_steps=2, progress=False)
    with pytest.raises(ValueError, match=r"prompts\[0\] is 12 rows long .* no room under max_seq_len=12"):
        model.generate([[torch.arange(11)]], max_new_tokens=1, progress=False)
    assert model.generate([[torch.arange(11)]], max_new_tokens=0, progress=False) == [[]]


@pytest.mark.parametrize("prediction", ["v", "x0"])
def test_every_prediction_type_generates(prediction):
    model = tiny_model(prediction=prediction, conditioning="adaln_zero")
    out = model.generate([[torch.tensor([1, BOI])], [torch.tensor([2, BOI])]], max_new_tokens=0,
                         num_inference_steps=3, span_shape=(4, 4), progress=False, sampler="ddpm")
    assert [o[1].tolist() for o in out] == [[EOI], [EOI]]
    assert all(o[0].shape == (1, 4, 4) and torch.isfinite(o[0]).all() for o in out)
    assert not torch.equal(out[0][0], out[1][0])
