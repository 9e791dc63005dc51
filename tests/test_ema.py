"""EMA of the trainable parameters: the update rule (with and without warmup), frozen parameters,
low-precision parameters, swapping the averages in and out, state round trip, bad input."""
import pytest
import torch
import torch.nn as nn

from transfusion_fast.ema import EMA


def _model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    model.register_buffer("counter", torch.zeros(3))
    return model


def _perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.mark.parametrize("warmup", [False, True])
def test_update_matches_the_formula(warmup):
    model = _model()
    ema = EMA(model, decay=0.9, warmup=warmup)
    expected = {name: p.detach().clone() for name, p in model.named_parameters()}
    for step in range(5):
        _perturb(model, step)
        d = min(0.9, (1 + step) / (10 + step)) if warmup else 0.9
        assert ema.current_decay() == pytest.approx(d)
        ema.update(model)
        for name, p in model.named_parameters():
            expected[name] = d * expected[name] + (1 - d) * p.detach()
    assert ema.num_updates == 5
    for name, average in zip(ema.names, ema.averages):
        torch.testing.assert_close(average, expected[name], rtol=1e-6, atol=1e-6)


def test_decay_edges():
    model = _model()
    frozen_copy = [p.detach().clone() for p in model.parameters()]
    ema = EMA(model, decay=1.0)
    _perturb(model, 0)
    ema.update(model)
    assert all(torch.equal(a, b) for a, b in zip(ema.averages, frozen_copy))   # decay 1: never moves
    follow = EMA(model, decay=0.0)
    _perturb(model, 1)
    follow.update(model)
    assert all(torch.equal(a, p) for a, p in zip(follow.averages, model.parameters()))   # decay 0: copies


def test_frozen_parameters_are_skipped():
    model = _model()
    model[0].weight.requires_grad_(False)
    ema = EMA(model, decay=0.5)
    assert "0.weight" not in ema.names and len(ema.names) == len(list(model.parameters())) - 1
    before = model[0].weight.detach().clone()
    _perturb(model, 0)
    ema.update(model)
    with ema.average_parameters(model):
        assert torch.equal(model[0].weight, before)              # not averaged, not touched
    assert torch.equal(model[0].weight, before)


def test_average_parameters_swaps_in_and_restores():
    model = _model()
    ema = EMA(model, decay=0.5)
    _perturb(model, 0)
    ema.update(model)
    _perturb(model, 1)
    trained = {name: p.detach().clone() for name, p in model.named_parameters()}
    x = torch.randn(3, 4)
    with torch.no_grad():
        out_trained = model(x)
    with ema.average_parameters(model) as swapped:
        assert swapped is model
        for name, average in zip(ema.names, ema.averages):
            assert torch.equal(dict(model.named_parameters())[name], average)
        with torch.no_grad():
            out_ema = model(x)
    assert not torch.equal(out_ema, out_trained)
    for name, p in model.named_parameters():
        assert torch.equal(p, trained[name])
    assert torch.equal(model.counter, torch.zeros(3))
    # restored on an exception too
    with pytest.raises(RuntimeError, match="boom"):
        with ema.average_parameters(model):
            raise RuntimeError("boom")
    for name, p in model.named_parameters():
        assert torch.equal(p, trained[name])
    # the model still trains after a swap: its parameters are the same objects, with their grads
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_copy_to():
    model = _model()
    ema = EMA(model, decay=0.5)
    _perturb(model, 0)
    ema.update(model)
    target = _model(seed=5)
    ema.copy_to(target)
    for name, average in zip(ema.names, ema.averages):
        assert torch.equal(dict(target.named_parameters())[name], average)


def test_low_precision_parameters_average_in_float32():
    model = _model().to(torch.bfloat16)
    ema = EMA(model, decay=0.9999)
    assert all(a.dtype == torch.float32 for a in ema.averages)
    start = [a.clone() for a in ema.averages]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    for _ in range(3):
        ema.update(model)
    # each step moves the average by ~1e-4: visible in float32, lost in bfloat16
    for a, s in zip(ema.averages, start):
        moved = a - s
        assert bool((moved > 2e-4).all()) and bool((moved < 4e-4).all())
    with ema.average_parameters(model):
        assert next(model.parameters()).dtype == torch.bfloat16


def test_state_dict_round_trip():
    model = _model()
    ema = EMA(model, decay=0.99, warmup=True)
    for step in range(3):
        _perturb(model, step)
        ema.update(model)
    state = ema.state_dict()
    fresh = EMA(_model(seed=1), decay=0.5)
    fresh.load_state_dict(state)
    assert (fresh.decay, fresh.warmup, fresh.num_updates) == (0.99, True, 3)
    assert all(torch.equal(a, b) for a, b in zip(fresh.averages, ema.averages))
    # the state holds copies: later updates do not leak into it
    _perturb(model, 9)
    ema.update(model)
    assert not torch.equal(state["averages"][ema.names[0]], ema.averages[0])
    assert fresh.current_decay() == pytest.approx(min(0.99, 4 / 13))
    # through torch.save / torch.load
    import io
    buffer = io.BytesIO()
    torch.save(ema.state_dict(), buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert fresh.num_updates == 4


def test_update_is_foreach_fast_path_equivalent():
    """Many tensors of mixed shapes (the foreach path groups them) give the per-tensor formula."""
    model = nn.ModuleList(nn.Linear(i + 1, i + 2) for i in range(20))
    ema = EMA(model, decay=0.75)
    old = [a.clone() for a in ema.averages]
    _perturb(model, 3)
    ema.update(model)
    for a, o, p in zip(ema.averages, old, model.parameters()):
        torch.testing.assert_close(a, 0.75 * o + 0.25 * p.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("call,match", [
    (lambda m: EMA(m, decay=1.5), r"decay must be a float in \[0, 1\], got 1.5"),
    (lambda m: EMA(m, decay=float("nan")), r"decay must be a float in \[0, 1\]"),
    (lambda m: EMA(m, decay=True), r"decay must be a float in \[0, 1\]"),
    (lambda m: EMA(m, warmup=1), "warmup must be a bool"),
    (lambda m: EMA("model"), "model must be an nn.Module"),
    (lambda m: EMA(m).update(nn.Linear(4, 8)), "model has no parameter '0.weight'"),
    (lambda m: EMA(m).update(nn.Sequential(nn.Linear(4, 9), nn.LayerNorm(8), nn.Linear(8, 2))),
     r"parameter '0.weight': expected shape \(8, 4\), got \(9, 4\)"),
    (lambda m: EMA(m).load_state_dict({"decay": 0.9}), "state must be an EMA state_dict"),
    (lambda m: EMA(m).load_state_dict({**EMA(m).state_dict(), "averages": {}}), "state averages must name exactly"),
    (lambda m: EMA(m).load_state_dict({**EMA(m).state_dict(), "num_updates": -1}), "num_updates must be an int"),
    (lambda m: EMA(m).load_state_dict({**EMA(m).state_dict(), "decay": 2.0}), r"decay must be a float in \[0, 1\]"),
])
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call(_model())


def test_model_without_trainable_parameters():
    model = _model().requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter that requires grad"):
        EMA(model)


def test_failed_load_leaves_the_ema_unchanged():
    model = _model()
    ema = EMA(model, decay=0.9)
    state = ema.state_dict()
    name = ema.names[-1]
    state["averages"][name] = torch.zeros(5)
    before = [a.clone() for a in ema.averages]
    with pytest.raises(ValueError, match=f"state average '{name}': expected shape"):
        ema.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(ema.averages, before)) and ema.decay == 0.9
