"""The U-Net patch encoder / decoder: shapes over image and patch sizes, packed spans of mixed sizes,
gradients to every parameter, timestep conditioning, backends, bad input."""
from types import SimpleNamespace

import pytest
import torch

from transfusion_fast import ops, use_backend
from transfusion_fast.encoders import UNetPatchCoder, UNetState

TIME_DIM = 16
DIM = 24


def _coder(channels=3, patch_size=2, seed=0, **kwargs):
    torch.manual_seed(seed)
    kwargs = {"base_channels": 8, "groups": 4, **kwargs}
    return UNetPatchCoder(channels, patch_size, DIM, TIME_DIM, **kwargs)


def _temb(batch, seed=1):
    return torch.randn(batch, TIME_DIM, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("patch_size,size", [(1, (4, 6)), (2, (8, 8)), (2, (6, 10)), (4, (8, 16)), (8, (16, 8))])
@pytest.mark.parametrize("channels", [1, 4])
def test_image_shapes(patch_size, size, channels):
    coder = _coder(channels, patch_size)
    assert coder.levels == patch_size.bit_length() - 1 and len(coder.downsample) == coder.levels
    x = torch.randn(2, channels, *size)
    tokens, skips = coder.encode_images(x, _temb(2))
    n = (size[0] // patch_size) * (size[1] // patch_size)
    assert tokens.shape == (2, n, DIM)
    assert len(skips) == coder.levels + 1
    for level, skip in enumerate(skips):
        assert skip.shape == (2, coder.widths[level], size[0] >> level, size[1] >> level)
    patches = coder.decode_images(tokens, skips, _temb(2))
    assert patches.shape == (2, n, patch_size * patch_size * channels) and patches.dtype == x.dtype


def test_tokens_and_rows_follow_patchify_order():
    """Token n sits at grid cell (n // (W/p), n % (W/p)), and the decoder's rows are ops.patchify of
    its output image: the order the linear head, the loss and the samplers use."""
    coder = _coder(2, 4)
    captured = {}
    coder.to_tokens.register_forward_hook(lambda m, i, o: captured.__setitem__("grid", o))
    coder.conv_out.register_forward_hook(lambda m, i, o: captured.__setitem__("image", o))
    x = torch.randn(2, 2, 8, 12)
    tokens, skips = coder.encode_images(x, _temb(2))
    grid = captured["grid"]                                       # (B, dim, 2, 3)
    for n in range(6):
        assert torch.equal(tokens[:, n], grid[:, :, n // 3, n % 3])
    patches = coder.decode_images(tokens, skips, _temb(2))
    assert torch.equal(patches, ops.patchify_reference(captured["image"], 4))


def test_packed_spans_of_mixed_sizes_equal_per_image_runs():
    coder = _coder(3, 2)
    sizes = [(8, 8), (4, 6), (8, 8), (6, 4), (4, 6)]
    images = [torch.randn(3, h, w, generator=torch.Generator().manual_seed(i)) for i, (h, w) in enumerate(sizes)]
    x_t, offsets = ops.patchify_packed(images, 2)
    temb = _temb(len(sizes))
    tokens, state = coder.encode(x_t, temb, sizes)
    assert tokens.shape == (x_t.shape[0], DIM) and isinstance(state, UNetState)
    assert len(state.groups) == 3                                 # (8,8), (4,6), (6,4)
    h = torch.randn_like(tokens)
    out = coder.decode(h, state)
    assert out.shape == x_t.shape
    for i, image in enumerate(images):                            # each span alone gives the same rows
        lo, hi = int(offsets[i]), int(offsets[i + 1])
        single_tokens, skips = coder.encode_images(image[None], temb[i:i + 1])
        torch.testing.assert_close(tokens[lo:hi], single_tokens[0], rtol=1e-5, atol=1e-5)
        single_out = coder.decode_images(h[lo:hi][None], skips, temb[i:i + 1])
        torch.testing.assert_close(out[lo:hi], single_out[0], rtol=1e-5, atol=1e-5)


def test_one_size_needs_no_gather():
    coder = _coder(3, 2)
    images = [torch.randn(3, 8, 8) for _ in range(3)]
    x_t, _ = ops.patchify_packed(images, 2)
    tokens, state = coder.encode(x_t, _temb(3), [(8, 8)] * 3)
    assert len(state.groups) == 1 and state.groups[0].rows is None
    batched, _ = coder.encode_images(torch.stack(images), _temb(3))
    torch.testing.assert_close(tokens, batched.reshape(-1, DIM), rtol=0, atol=0)


def test_gradients_reach_every_parameter_and_the_input():
    coder = _coder(2, 4, num_res_blocks=2)
    sizes = [(8, 8), (8, 12)]
    x_t = torch.randn(4 + 6, 4 * 4 * 2, requires_grad=True)
    temb = _temb(2).requires_grad_(True)
    tokens, state = coder.encode(x_t, temb, sizes)
    mixer = torch.randn(DIM, DIM)                                 # stands in for the transformer
    out = coder.decode(torch.tanh(tokens @ mixer), state)
    (out.pow(2).mean() + tokens.pow(2).mean()).backward()
    for name, p in coder.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name
    assert bool(x_t.grad.abs().sum() > 0) and bool(temb.grad.abs().sum() > 0)


def test_timestep_conditioning_changes_the_output():
    coder = _coder(3, 2)
    x = torch.randn(2, 3, 8, 8)
    tokens_a, skips_a = coder.encode_images(x, _temb(2, seed=1))
    tokens_b, skips_b = coder.encode_images(x, _temb(2, seed=2))
    assert not torch.allclose(tokens_a, tokens_b, atol=1e-4)
    same = coder.decode_images(tokens_a, skips_a, _temb(2, seed=1))
    other = coder.decode_images(tokens_a, skips_a, _temb(2, seed=2))
    assert not torch.allclose(same, other, atol=1e-4)
    # per image: image 1's embedding does not touch image 0's tokens
    temb = _temb(2, seed=1)
    temb2 = temb.clone()
    temb2[1] += 1.0
    tokens_c, _ = coder.encode_images(x, temb2)
    assert torch.equal(tokens_c[0], tokens_a[0]) and not torch.equal(tokens_c[1], tokens_a[1])


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_backends_agree(backend):
    coder = _coder(3, 2)
    sizes = [(8, 8), (4, 6)]
    images = [torch.randn(3, h, w) for h, w in sizes]
    x_t, _ = ops.patchify_packed(images, 2)
    temb = _temb(2)
    with use_backend("reference"):
        tokens_ref, state_ref = coder.encode(x_t, temb, sizes)
        out_ref = coder.decode(tokens_ref, state_ref)
    with use_backend(backend):
        tokens, state = coder.encode(x_t, temb, sizes)
        out = coder.decode(tokens, state)
    # patchify / unpatchify move bits: the backends give the same values
    assert torch.equal(tokens, tokens_ref) and torch.equal(out, out_ref)


def test_for_modality_and_sequence_modalities():
    image = SimpleNamespace(name="image", kind="image", channels=4, patch_size=2)
    coder = UNetPatchCoder.for_modality(image, DIM, TIME_DIM, base_channels=8, groups=4)
    assert coder.channels == 4 and coder.patch_dim == 16
    series = SimpleNamespace(name="series", kind="sequence", channels=3, patch_size=4)
    with pytest.raises(ValueError, match=r"encoder='unet' needs kind='image'.*got kind='sequence' for modality "
                                         r"'series'"):
        UNetPatchCoder.for_modality(series, DIM, TIME_DIM)


@pytest.mark.parametrize("kwargs,match", [
    (dict(patch_size=3), "patch_size must be a power of two"),
    (dict(patch_size=0), "patch_size must be a positive int"),
    (dict(channels=2.0), "channels must be a positive int"),
    (dict(channel_mult=(1,)), r"channel_mult must be 2 positive ints"),
    (dict(base_channels=6, groups=4), r"groups must divide every level's width"),
])
def test_bad_construction(kwargs, match):
    args = dict(channels=3, patch_size=2, dim=DIM, time_dim=TIME_DIM, base_channels=8, groups=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        UNetPatchCoder(args.pop("channels"), args.pop("patch_size"), args.pop("dim"), args.pop("time_dim"), **args)


def test_bad_calls():
    coder = _coder(3, 2)
    x_t = torch.randn(16 + 6, 12)
    with pytest.raises(ValueError, match=r"sizes give 22 patch rows, got x_t with 21 rows"):
        coder.encode(x_t[:21], _temb(2), [(8, 8), (4, 6)])
    with pytest.raises(ValueError, match=r"sizes\[1\] must be \(height, width\), positive multiples of patch_size=2"):
        coder.encode(x_t, _temb(2), [(8, 8), (5, 6)])
    with pytest.raises(ValueError, match=r"temb must be a floating-point \(2, 16\) tensor"):
        coder.encode(x_t, _temb(3), [(8, 8), (4, 6)])
    with pytest.raises(ValueError, match=r"x_t must be a \(N, 12\) tensor"):
        coder.encode(torch.randn(22, 13), _temb(2), [(8, 8), (4, 6)])
    tokens, state = coder.encode(x_t, _temb(2), [(8, 8), (4, 6)])
    with pytest.raises(ValueError, match=r"h must be a \(22, 24\) tensor"):
        coder.decode(tokens[:5], state)
    with pytest.raises(ValueError, match="state must be the UNetState"):
        coder.decode(tokens, None)
    with pytest.raises(ValueError, match=r"x must be a floating-point \(B, 3, H, W\) tensor"):
        coder.encode_images(torch.randn(1, 2, 8, 8), _temb(1))
    with pytest.raises(ValueError, match="multiples of patch_size=2"):
        coder.encode_images(torch.randn(1, 3, 7, 8), _temb(1))
