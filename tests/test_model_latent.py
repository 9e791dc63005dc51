"""Latent modalities end to end with a tiny random diffusers AutoencoderKL built here (nothing
downloaded): pack encodes pixels before patchify, precomputed Latents give the same batch, no
gradient reaches the VAE and it stays out of the model's parameters and checkpoints, generation
decodes to pixels, captioning encodes the prompt's image, and codecs that do not fit are refused."""
import pytest
import torch

from transfusion_fast import LatentCodec, Latents, ModalityConfig, Model, ModelConfig, load_checkpoint, pack
from transfusion_fast import save_checkpoint
from transfusion_fast.pack import encode_latent_items, to_patches
from transfusion_fast.testing import BOI, EOI

diffusers = pytest.importorskip("diffusers", reason="diffusers is a test dependency (requirements-test.txt)")

LATENT = ModalityConfig("image", "image", channels=4, patch_size=2, max_size=8)     # latent units


pytestmark = pytest.mark.usefixtures("reference_backend")


def tiny_vae(seed=0):
    torch.manual_seed(seed)
    return diffusers.AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                                   norm_num_groups=8, sample_size=16, scaling_factor=0.5)


def config(**overrides):
    base = dict(dim=32, depth=1, n_heads=2, modalities=(LATENT,))
    base.update(overrides)
    return ModelConfig(**base)


def pixels(size=16, seed=1, count=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, size, size, generator=g) * 2 - 1 for _ in range(count)]


def test_pack_encodes_before_patchify_and_accepts_precomputed_latents():
    codec = LatentCodec.from_diffusers(tiny_vae())
    images = pixels(16, count=2) + pixels(8, seed=2)
    data = [[torch.tensor([1, 2]), images[0]], [images[1], torch.tensor([3])], [("image", images[2])]]
    batch = pack(data, config(), seed=0, cfg_drop_prob=0.0, codecs={"image": codec})
    latents = [codec.encode(img[None])[0] for img in images]
    assert [tuple(z.shape) for z in latents] == [(4, 8, 8), (4, 8, 8), (4, 4, 4)]
    expected = torch.cat([to_patches(LATENT, z) for z in latents])
    torch.testing.assert_close(batch.spans["image"].x0, expected)
    assert batch.spans["image"].shapes == [(4, 8, 8), (4, 8, 8), (4, 4, 4)]
    # A data pipeline's cached latents give the same batch without the codec.
    cached = [[torch.tensor([1, 2]), Latents(latents[0])], [Latents(latents[1]), torch.tensor([3])],
              [("image", Latents(latents[2]))]]
    again = pack(cached, config(), seed=0, cfg_drop_prob=0.0)
    for field in ("noise", "timesteps", "rows"):
        assert torch.equal(getattr(again.spans["image"], field), getattr(batch.spans["image"], field)), field
    for field in ("x0", "x_t"):     # batched vs one-by-one encoding: the same up to conv rounding
        torch.testing.assert_close(getattr(again.spans["image"], field), getattr(batch.spans["image"], field))
    assert torch.equal(again.tokens, batch.tokens)
    # encode_items (what a pipeline caches) matches too
    assert torch.equal(codec.encode_items(images[:1])[0].tensor, latents[0])


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_training_never_reaches_the_vae(objective, tmp_path):
    vae = tiny_vae()
    vae.train()
    codec = LatentCodec.from_diffusers(vae)
    model = Model(config(objective=objective), codecs={"image": codec})
    model.train()
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    assert not any(name.startswith("vae") or ".encoder.down_blocks" in name for name, _ in model.named_parameters())
    assert model.num_parameters() == sum(p.numel() for p in Model(config(objective=objective)).parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(2):
        batch = pack([[torch.tensor([1]), *pixels(16, seed=step)]], model.config, seed=step, codecs=model.codecs)
        out = model(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        assert not batch.spans["image"].x0.requires_grad
    assert not vae.training and all(p.grad is None and not p.requires_grad for p in vae.parameters())
    for k, v in vae.state_dict().items():
        assert torch.equal(v, before[k]), k
    path = tmp_path / "latent.safetensors"
    save_checkpoint(path, model)
    loaded, _ = load_checkpoint(path)
    assert set(loaded.state_dict()) == set(model.state_dict()) and loaded.codecs == {}


@pytest.mark.parametrize("objective, sampler", [("ddpm", "ddim"), ("flow", "euler")])
def test_generation_returns_decoded_images(objective, sampler):
    vae = tiny_vae()
    codec = LatentCodec.from_diffusers(vae)
    model = Model(config(objective=objective)).eval()
    prompts = [[torch.tensor([1, BOI])], [torch.tensor([2, BOI])]]
    kwargs = dict(max_new_tokens=0, num_inference_steps=2, sampler=sampler, cfg_scale=2.0, seed=0,
                  span_shape=(4, 8), progress=False)
    latent_out = model.generate(prompts, **kwargs)                          # no codec: latents
    model.attach_codec("image", codec)
    decoded = model.generate(prompts, **kwargs)
    assert latent_out[0][0].shape == (4, 4, 8)
    for lat, items in zip(latent_out, decoded):
        assert items[0].shape == (3, 8, 16) and items[0].dtype == torch.float32
        torch.testing.assert_close(items[0], codec.decode(lat[0][None])[0], rtol=1e-5, atol=1e-5)
        assert items[1].tolist() == [EOI]
    explicit = Model(config(objective=objective)).eval()
    explicit.load_state_dict(model.state_dict())
    torch.testing.assert_close(explicit.generate(prompts, codecs={"image": codec}, **kwargs)[0][0], decoded[0][0])


def test_captioning_encodes_the_prompt_image():
    codec = LatentCodec.from_diffusers(tiny_vae())
    model = Model(config(), codecs={"image": codec}).eval()
    image = pixels(16)[0]
    kwargs = dict(max_new_tokens=4, temperature=0.0, progress=False, stop_at_eos=False)
    from_pixels = model.generate([[image]], **kwargs)
    from_latents = model.generate([[Latents(codec.encode(image[None])[0])]], **kwargs)
    assert torch.equal(from_pixels[0][0], from_latents[0][0]) and from_pixels[0][0].numel() == 4


def test_codecs_that_do_not_fit_are_refused():
    codec = LatentCodec.from_diffusers(tiny_vae())
    wrong_channels = config(modalities=(ModalityConfig("image", "image", channels=3, patch_size=2, max_size=8),))
    with pytest.raises(ValueError, match=r"modality 'image': channels: expected 4 .*latent channels.*got 3"):
        Model(wrong_channels, codecs={"image": codec})
    with pytest.raises(ValueError, match=r"channels: expected 4.*got 3"):
        pack([[pixels()[0]]], wrong_channels, codecs={"image": codec})
    fixed = LatentCodec(lambda x, g: x[:, :4, ::2, ::2], lambda z: z, latent_channels=4, downsample=2,
                        latent_size=4, image_channels=4)
    with pytest.raises(ValueError, match=r"max_size: expected 4 \(the codec's latent_size\), got 8"):
        Model(config()).attach_codec("image", fixed)
    series = config(modalities=(LATENT, ModalityConfig("series", "sequence", channels=4, boi_id=250, eoi_id=251)))
    with pytest.raises(ValueError, match=r"kind: expected 'image'.*got 'sequence'"):
        Model(series, codecs={"series": codec})
    with pytest.raises(ValueError, match=r"codecs: key must be a modality name.*got 'video'"):
        Model(config(), codecs={"video": codec})
    with pytest.raises(ValueError, match=r"codecs\['image'\] must be a LatentCodec, got AutoencoderKL"):
        Model(config(), codecs={"image": codec.modules[0]})
    # Pixels whose latent does not fit the modality (latent side 10 > max_size 8), or not the VAE's.
    with pytest.raises(ValueError, match=r"latent height: expected a multiple of patch_size=2 in \[2, 8\].*got 10"):
        pack([[pixels(20)[0]]], config(), codecs={"image": codec})
    with pytest.raises(ValueError, match=r"image channels: expected 3.*got 1"):
        encode_latent_items([[torch.randn(1, 16, 16)]], config(), {"image": codec})
    with pytest.raises(ValueError, match=r"Latents channels|4 channels, got 2"):
        pack([[Latents(torch.randn(2, 8, 8))]], config())
