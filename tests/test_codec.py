"""LatentCodec: the diffusers AutoencoderKL adapter (built small and random in the test, nothing
downloaded), scaling and shift from its config, freezing, determinism, precomputed latents, checks."""
from types import SimpleNamespace

import pytest
import torch

from transfusion_fast.codec import LatentCodec, Latents

diffusers = pytest.importorskip("diffusers", reason="diffusers is a test dependency (requirements-test.txt)")


def _vae(seed=0, **config):
    torch.manual_seed(seed)
    kwargs = dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, sample_size=16)
    kwargs.update(config)
    return diffusers.AutoencoderKL(**kwargs)


def _images(batch=2, size=16, seed=1):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _modality(**fields):
    base = dict(name="image", kind="image", channels=4, patch_size=2, max_size=8)
    base.update(fields)
    return SimpleNamespace(**base)


def test_round_trip_shapes_and_attributes():
    codec = LatentCodec.from_diffusers(_vae())
    assert (codec.latent_channels, codec.downsample, codec.image_channels) == (4, 2, 3)
    for size in (16, 8, 24):
        images = _images(size=size)
        latents = codec.encode(images)
        assert latents.shape == (2, 4, size // 2, size // 2) and latents.dtype == images.dtype
        decoded = codec.decode(latents)
        assert decoded.shape == images.shape and decoded.dtype == images.dtype
    assert codec.latent_shape((3, 32, 16)) == (4, 16, 8)


def test_scaling_and_shift_come_from_the_config():
    vae = _vae(scaling_factor=0.5, shift_factor=0.25)
    codec = LatentCodec.from_diffusers(vae)
    images = _images()
    with torch.no_grad():
        z = vae.encode(images).latent_dist.mean
        expected_images = vae.decode(z).sample
    latents = codec.encode(images)
    torch.testing.assert_close(latents, (z - 0.25) * 0.5, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(codec.decode(latents), expected_images, rtol=1e-5, atol=1e-5)
    # shift_factor None (the AutoencoderKL default) is 0; scaling_factor default 0.18215
    default = LatentCodec.from_diffusers(_vae())
    assert default.shift_factor == 0.0 and default.scaling_factor == pytest.approx(0.18215)
    with torch.no_grad():
        z = default.modules[0].encode(images).latent_dist.mean
    torch.testing.assert_close(default.encode(images), z * 0.18215, rtol=1e-6, atol=1e-6)


def test_per_channel_latents_mean_and_std():
    mean, std = [0.1, -0.2, 0.3, 0.0], [0.5, 1.0, 2.0, 4.0]
    vae = _vae(scaling_factor=0.75, latents_mean=mean, latents_std=std)
    codec = LatentCodec.from_diffusers(vae)
    images = _images()
    with torch.no_grad():
        z = vae.encode(images).latent_dist.mean
    m, s = torch.tensor(mean).reshape(1, 4, 1, 1), torch.tensor(std).reshape(1, 4, 1, 1)
    latents = codec.encode(images)
    torch.testing.assert_close(latents, (z - m) * 0.75 / s, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        expected = vae.decode(z).sample
    torch.testing.assert_close(codec.decode(latents), expected, rtol=1e-4, atol=1e-5)


def test_the_vae_stays_frozen_and_gets_no_gradient():
    vae = _vae()
    vae.train()
    codec = LatentCodec.from_diffusers(vae)
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    images = _images().requires_grad_(True)
    head = torch.nn.Conv2d(4, 4, 1)                               # a trainable consumer of the latents
    latents = codec.encode(images)
    decoded = codec.decode(head(latents))                         # decode a graph that needs grad
    assert not latents.requires_grad and not decoded.requires_grad
    (head(latents).pow(2).mean() + decoded.sum()).backward()
    assert head.weight.grad is not None
    assert all(p.grad is None for p in vae.parameters())
    assert images.grad is None
    # a parent's .train() flips the VAE back; the codec puts it in eval again before running
    vae.train()
    codec.encode(images)
    assert not vae.training


def test_mean_is_deterministic_and_sample_follows_the_generator():
    vae = _vae()
    images = _images()
    mean_codec = LatentCodec.from_diffusers(vae)
    assert torch.equal(mean_codec.encode(images), mean_codec.encode(images))
    sampling = LatentCodec.from_diffusers(vae, sample_posterior=True)
    a = sampling.encode(images, generator=torch.Generator().manual_seed(3))
    b = sampling.encode(images, generator=torch.Generator().manual_seed(3))
    c = sampling.encode(images, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # samples scatter around the mean by the posterior's std (scaled)
    with torch.no_grad():
        dist = vae.encode(images).latent_dist
    residual = (a - mean_codec.encode(images)) / (dist.std * mean_codec.scaling_factor)
    assert abs(float(residual.std()) - 1) < 0.2


def test_precomputed_latents():
    codec = LatentCodec.from_diffusers(_vae())
    images = [_images(1, 16, seed=i)[0] for i in range(3)] + [_images(1, 8, seed=9)[0]]
    cached = codec.encode_items(images)
    assert all(isinstance(item, Latents) for item in cached)
    for image, item in zip(images, cached):
        torch.testing.assert_close(item.tensor, codec.encode(image[None])[0], rtol=1e-5, atol=1e-6)
    modality = _modality(max_size=8)
    assert codec.check_item(cached[0], modality) == (4, 8, 8)
    assert codec.check_item(images[0], modality) == (4, 8, 8)    # pixels: the shape they encode to
    assert codec.decode(cached[3]).shape == (1, 3, 8, 8)
    with pytest.raises(ValueError, match="Latents.tensor must be a floating-point"):
        Latents(torch.zeros(4, 8))


def test_generic_codec_and_fixed_size():
    def encode(images, generator):
        return torch.nn.functional.avg_pool2d(images, 4).repeat(1, 2, 1, 1)

    def decode(latents):
        return torch.nn.functional.interpolate(latents[:, :1], scale_factor=4.0)

    codec = LatentCodec(encode, decode, latent_channels=2, downsample=4, image_channels=1, latent_size=4)
    assert codec.encode(torch.randn(3, 1, 16, 16)).shape == (3, 2, 4, 4)
    codec.check_modality(_modality(channels=2, max_size=4))
    with pytest.raises(ValueError, match=r"max_size: expected 4 \(the codec's latent_size\), got 8"):
        codec.check_modality(_modality(channels=2, max_size=8))
    with pytest.raises(ValueError, match=r"image size: expected 16x16 .*got 32x32"):
        codec.encode(torch.randn(1, 1, 32, 32))
    wrong = LatentCodec(encode, decode, latent_channels=3, downsample=4, image_channels=1)
    with pytest.raises(ValueError, match=r"encode returned .* expected shape \(1, 3, 4, 4\)"):
        wrong.encode(torch.randn(1, 1, 16, 16))


@pytest.mark.parametrize("fields,match", [
    (dict(channels=3), r"modality 'image': channels: expected 4 \(the codec's latent channels\), got 3"),
    (dict(kind="sequence"), r"kind: expected 'image' .*got 'sequence'"),
    (dict(max_size=9), r"max_size: expected a multiple of patch_size=2 .*got 9"),
])
def test_check_modality(fields, match):
    codec = LatentCodec.from_diffusers(_vae())
    codec.check_modality(_modality())
    with pytest.raises(ValueError, match=match):
        codec.check_modality(_modality(**fields))


def test_check_item_and_bad_input():
    codec = LatentCodec.from_diffusers(_vae())
    modality = _modality(max_size=8)
    with pytest.raises(ValueError, match=r"latent height: expected a multiple of patch_size=2 in \[2, 8\].*got 12"):
        codec.check_item(_images(1, 24)[0], modality)
    with pytest.raises(ValueError, match=r"Latents channels: expected 4 .*got 3"):
        codec.check_item(Latents(torch.zeros(3, 8, 8)), modality)
    with pytest.raises(ValueError, match=r"latent width: expected a multiple of patch_size=2.*got 3"):
        codec.check_item(Latents(torch.zeros(4, 8, 3)), modality)
    with pytest.raises(ValueError, match=r"image channels: expected 3 .*got 1"):
        codec.encode(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match=r"image height and width: expected positive multiples of 2 .*got 15x16"):
        codec.encode(torch.zeros(1, 3, 15, 16))
    with pytest.raises(ValueError, match=r"latents channels: expected 4 .*got 3"):
        codec.decode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="images must be a floating-point"):
        codec.encode(torch.zeros(3, 16, 16))
    with pytest.raises(ValueError, match="generator must be a torch.Generator"):
        codec.encode(_images(), generator=1)
    with pytest.raises(ValueError, match="vae must be a diffusers AutoencoderKL"):
        LatentCodec.from_diffusers(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"vae.config.scaling_factor must be a finite float > 0, got 0"):
        LatentCodec.from_diffusers(_vae(scaling_factor=0))
    with pytest.raises(ValueError, match="latents_mean and latents_std must be both set"):
        LatentCodec.from_diffusers(_vae(latents_mean=[0.0] * 4))
    with pytest.raises(ValueError, match="latent_channels must be a positive int"):
        LatentCodec(lambda x, g: x, lambda z: z, latent_channels=0, downsample=1)
