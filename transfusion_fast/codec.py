"""Latent modalities: a frozen image autoencoder between pixels and the space the diffusion runs in.

A modality with a codec is patchified, noised and generated in latent space: its ``channels`` are
the codec's latent channels and its ``max_size`` the largest latent side. Pixels are encoded before
patchify and generated latents are decoded after sampling; the codec never trains.

* :class:`LatentCodec` wraps an ``encode(images, generator) -> latents`` / ``decode(latents) ->
  images`` pair and the modules behind them, which it freezes: eval mode, ``requires_grad=False``, and
  both directions run under ``torch.no_grad()``, so no gradient reaches the autoencoder whatever the
  caller's graph needs (the latents it returns never require grad).
* :meth:`LatentCodec.from_diffusers` adapts a diffusers ``AutoencoderKL`` (Stable Diffusion, SDXL,
  SD3, FLUX VAEs): ``latents = (z − shift) · scale`` with ``z`` the posterior's mean (default,
  deterministic) or a sample of it, ``scale = config.scaling_factor`` (0.18215 for SD's VAE, the value
  DiT uses) and ``shift = config.shift_factor`` (``None`` → 0). A VAE whose config has per-channel
  ``latents_mean`` / ``latents_std`` (SDXL-style) uses ``(z − mean) · scaling_factor / std`` instead,
  as diffusers' pipelines do. Decoding inverts it.
* :class:`Latents` marks an item as already encoded (a data pipeline that caches latents), so that
  pack can tell it from pixels: its tensor is the modality's latents as they are.
* :meth:`LatentCodec.check_modality` and :meth:`LatentCodec.check_item` reject a modality or an item
  that does not fit the codec with a ValueError naming the field, the expected and the received value.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from .checks import MAX_SIZE, check_int, describe

__all__ = ["LatentCodec", "Latents", "check_codecs"]


@dataclass(frozen=True)
class Latents:
    """An image item that is already in the codec's latent space: ``tensor`` is ``(latent_channels,
    h, w)``. Give it to pack in place of the pixels (alone or as ``(modality_name, Latents(...))``)."""

    tensor: torch.Tensor

    def __post_init__(self):
        if not isinstance(self.tensor, torch.Tensor) or not self.tensor.is_floating_point() or self.tensor.dim() != 3:
            raise ValueError(f"Latents.tensor must be a floating-point (latent_channels, h, w) tensor, got "
                             f"{describe(self.tensor)}")

    @property
    def shape(self) -> torch.Size:
        return self.tensor.shape


class LatentCodec:
    """A frozen encoder/decoder pair between images ``(B, image_channels, H, W)`` and latents
    ``(B, latent_channels, H / downsample, W / downsample)``.

    Args:
        encode: ``encode(images, generator) -> latents``; ``generator`` (a ``torch.Generator`` or
            ``None``) is for codecs that sample, ignored by deterministic ones.
        decode: ``decode(latents) -> images``.
        latent_channels, downsample, image_channels: the shapes above.
        latent_size: the one latent side the codec produces, for a fixed-size codec; ``None`` (a
            convolutional codec): any image side that is a multiple of ``downsample``.
        modules: the ``nn.Module``\\ s behind ``encode`` / ``decode``: frozen here, moved by :meth:`to`.

    It is not an ``nn.Module`` on purpose: a model that holds it does not register the autoencoder's
    weights, so they stay out of the model's parameters, optimizer, EMA and checkpoints.
    """

    def __init__(self, encode: Callable, decode: Callable, *, latent_channels: int, downsample: int,
                 image_channels: int = 3, latent_size: int | None = None, modules=()):
        if not callable(encode) or not callable(decode):
            raise ValueError(f"encode and decode must be callables, got {type(encode).__name__} and "
                             f"{type(decode).__name__}")
        self._encode, self._decode = encode, decode
        self.latent_channels = check_int("latent_channels", latent_channels, 1, MAX_SIZE)
        self.downsample = check_int("downsample", downsample, 1, MAX_SIZE)
        self.image_channels = check_int("image_channels", image_channels, 1, MAX_SIZE)
        self.latent_size = None if latent_size is None else check_int("latent_size", latent_size, 1, MAX_SIZE)
        modules = tuple(modules) if isinstance(modules, (list, tuple)) else (modules,)
        for i, module in enumerate(modules):
            if not isinstance(module, nn.Module):
                raise ValueError(f"modules[{i}] must be an nn.Module, got {type(module).__name__}")
        self.modules = modules
        self._freeze()

    def _freeze(self) -> None:
        for module in self.modules:
            module.eval()
            module.requires_grad_(False)

    def to(self, *args, **kwargs) -> "LatentCodec":
        """Moves (or casts) the frozen modules like ``nn.Module.to``; returns self."""
        for module in self.modules:
            module.to(*args, **kwargs)
        return self

    # ------------------------------------------------------------------ diffusers
    @classmethod
    def from_diffusers(cls, vae, *, sample_posterior: bool = False) -> "LatentCodec":
        """The codec of a diffusers ``AutoencoderKL`` (or any VAE with its ``encode(x).latent_dist``
        / ``decode(z).sample`` API and config fields). ``sample_posterior``: encode to a sample of
        the posterior (drawn from the ``generator`` given to :meth:`encode`) instead of its mean."""
        config = getattr(vae, "config", None)
        if not isinstance(vae, nn.Module) or config is None or not hasattr(vae, "encode") or not hasattr(vae, "decode"):
            raise ValueError(f"vae must be a diffusers AutoencoderKL (an nn.Module with .config, .encode and "
                             f".decode), got {type(vae).__name__}")
        if not isinstance(sample_posterior, bool):
            raise ValueError(f"sample_posterior must be a bool, got {describe(sample_posterior)}")
        latent_channels = check_int("vae.config.latent_channels", config.latent_channels, 1, MAX_SIZE)
        scaling = config.scaling_factor
        if not isinstance(scaling, (int, float)) or isinstance(scaling, bool) or not math.isfinite(scaling) \
                or scaling <= 0:
            raise ValueError(f"vae.config.scaling_factor must be a finite float > 0, got {scaling!r}")
        shift = getattr(config, "shift_factor", None)
        shift = 0.0 if shift is None else shift
        if not isinstance(shift, (int, float)) or isinstance(shift, bool) or not math.isfinite(shift):
            raise ValueError(f"vae.config.shift_factor must be a finite float or None, got {shift!r}")
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if (mean is None) != (std is None):
            raise ValueError(f"vae.config.latents_mean and latents_std must be both set or both None, got "
                             f"{mean!r} and {std!r}")
        if mean is not None:
            mean_t = torch.tensor(mean, dtype=torch.float64).reshape(1, -1, 1, 1)
            std_t = torch.tensor(std, dtype=torch.float64).reshape(1, -1, 1, 1)
            if mean_t.shape[1] != latent_channels or std_t.shape[1] != latent_channels or not bool((std_t > 0).all()):
                raise ValueError(f"vae.config.latents_mean / latents_std must hold {latent_channels} values "
                                 f"(latent_channels), std > 0, got {mean!r} and {std!r}")
            offset, factor = mean_t, float(scaling) / std_t
        else:
            offset, factor = float(shift), float(scaling)
        downsample = 2 ** (len(config.block_out_channels) - 1)

        def _like(value, z):
            return value.to(z.device, z.dtype) if isinstance(value, torch.Tensor) else value

        def encode(images, generator):
            param = next(vae.parameters())
            dist = vae.encode(images.to(param.device, param.dtype)).latent_dist
            z = dist.sample(generator=generator) if sample_posterior else dist.mean
            return ((z - _like(offset, z)) * _like(factor, z)).to(images.dtype)

        def decode(latents):
            param = next(vae.parameters())
            z = latents.to(param.device, param.dtype)
            z = z / _like(factor, z) + _like(offset, z)
            return vae.decode(z).sample.to(latents.dtype)

        codec = cls(encode, decode, latent_channels=latent_channels, downsample=downsample,
                    image_channels=check_int("vae.config.in_channels", config.in_channels, 1, MAX_SIZE),
                    modules=(vae,))
        codec.scaling_factor, codec.shift_factor = factor, offset
        return codec

    # ------------------------------------------------------------------ shapes and checks
    def latent_shape(self, image_shape) -> tuple:
        """``(C, H, W)`` (or ``(B, C, H, W)``) of images → the shape of their latents; ValueError for
        images the codec cannot encode."""
        shape = tuple(image_shape)
        if len(shape) not in (3, 4):
            raise ValueError(f"images must be (C, H, W) or (B, C, H, W), got shape {shape}")
        channels, height, width = shape[-3:]
        if channels != self.image_channels:
            raise ValueError(f"image channels: expected {self.image_channels} (the codec's image_channels), "
                             f"got {channels}")
        f = self.downsample
        if height % f or width % f or height < f or width < f:
            raise ValueError(f"image height and width: expected positive multiples of {f} (the codec's "
                             f"downsample), got {height}x{width}")
        if self.latent_size is not None and (height // f, width // f) != (self.latent_size, self.latent_size):
            raise ValueError(f"image size: expected {self.latent_size * f}x{self.latent_size * f} (the codec's "
                             f"latent_size {self.latent_size} × downsample {f}), got {height}x{width}")
        return (*shape[:-3], self.latent_channels, height // f, width // f)

    def check_modality(self, modality) -> None:
        """A ``ModalityConfig`` (duck-typed: ``.name``, ``.kind``, ``.channels``, ``.max_size``,
        ``.patch_size``) fits the codec: an image modality whose channels are the latent channels,
        whose ``max_size`` (a latent side) is a multiple of ``patch_size``, and equals ``latent_size``
        for a fixed-size codec."""
        where = f"modality {getattr(modality, 'name', '?')!r}"
        if modality.kind != "image":
            raise ValueError(f"{where}: kind: expected 'image' (a latent codec encodes images), got "
                             f"{modality.kind!r}")
        if modality.channels != self.latent_channels:
            raise ValueError(f"{where}: channels: expected {self.latent_channels} (the codec's latent channels), "
                             f"got {modality.channels}")
        if modality.max_size % modality.patch_size:
            raise ValueError(f"{where}: max_size: expected a multiple of patch_size={modality.patch_size} (the "
                             f"latent side is patchified), got {modality.max_size}")
        if self.latent_size is not None and modality.max_size != self.latent_size:
            raise ValueError(f"{where}: max_size: expected {self.latent_size} (the codec's latent_size), got "
                             f"{modality.max_size}")

    def check_item(self, item, modality) -> tuple:
        """The latent shape ``(latent_channels, h, w)`` of one item of ``modality``: pixels ``(C, H,
        W)`` or :class:`Latents`; ValueError naming the field if it does not fit the codec or the
        modality (latent side a multiple of ``patch_size`` and at most ``max_size``)."""
        self.check_modality(modality)
        where = f"modality {modality.name!r}"
        if isinstance(item, Latents):
            shape = tuple(item.shape)
            if shape[0] != self.latent_channels:
                raise ValueError(f"{where}: Latents channels: expected {self.latent_channels} (the codec's latent "
                                 f"channels), got {shape[0]}")
        elif isinstance(item, torch.Tensor) and item.dim() == 3:
            shape = self.latent_shape(item.shape)
        else:
            raise ValueError(f"{where}: item must be a (C, H, W) image or Latents, got {describe(item)}")
        p, m = modality.patch_size, modality.max_size
        for name, side in (("height", shape[1]), ("width", shape[2])):
            if side % p or not 0 < side <= m:
                raise ValueError(f"{where}: latent {name}: expected a multiple of patch_size={p} in [{p}, {m}] "
                                 f"(max_size), got {side}")
        return shape

    # ------------------------------------------------------------------ encode / decode
    def encode(self, images: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images ``(B, C, H, W)`` → latents ``(B, latent_channels, H/f, W/f)`` in the images' dtype,
        without gradient (the latents never require grad)."""
        if not isinstance(images, torch.Tensor) or not images.is_floating_point() or images.dim() != 4:
            raise ValueError(f"images must be a floating-point (B, C, H, W) tensor, got {describe(images)}")
        expected = self.latent_shape(images.shape)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator or None, got {describe(generator)}")
        self._freeze_if_unfrozen()
        with torch.no_grad():
            latents = self._encode(images, generator)
        if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != expected:
            raise ValueError(f"the codec's encode returned {describe(latents)}, expected shape {expected} "
                             f"(latent_channels={self.latent_channels}, downsample={self.downsample})")
        return latents

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``(B, latent_channels, h, w)`` (a plain tensor or one :class:`Latents`) → images
        ``(B, image_channels, h·f, w·f)`` in the latents' dtype, without gradient."""
        if isinstance(latents, Latents):
            latents = latents.tensor[None]
        if not isinstance(latents, torch.Tensor) or not latents.is_floating_point() or latents.dim() != 4:
            raise ValueError(f"latents must be a floating-point (B, latent_channels, h, w) tensor, got "
                             f"{describe(latents)}")
        if latents.shape[1] != self.latent_channels:
            raise ValueError(f"latents channels: expected {self.latent_channels} (the codec's latent channels), "
                             f"got {latents.shape[1]}")
        self._freeze_if_unfrozen()
        with torch.no_grad():
            images = self._decode(latents)
        f = self.downsample
        expected = (latents.shape[0], self.image_channels, latents.shape[2] * f, latents.shape[3] * f)
        if not isinstance(images, torch.Tensor) or tuple(images.shape) != expected:
            raise ValueError(f"the codec's decode returned {describe(images)}, expected shape {expected} "
                             f"(image_channels={self.image_channels}, downsample={f})")
        return images

    def encode_items(self, images, *, generator: torch.Generator | None = None) -> list:
        """A list of ``(C, H, W)`` images (any sizes) → their :class:`Latents`, encoded in batches of
        one size (for a data pipeline that caches latents)."""
        if not isinstance(images, (list, tuple)):
            raise ValueError(f"images must be a list of (C, H, W) tensors, got {describe(images)}")
        by_shape: dict = {}
        for i, image in enumerate(images):
            if not isinstance(image, torch.Tensor) or image.dim() != 3:
                raise ValueError(f"images[{i}] must be a (C, H, W) tensor, got {describe(image)}")
            by_shape.setdefault(tuple(image.shape), []).append(i)
        out = [None] * len(images)
        for indices in by_shape.values():
            latents = self.encode(torch.stack([images[i] for i in indices]), generator=generator)
            for i, latent in zip(indices, latents):
                out[i] = Latents(latent)
        return out

    def _freeze_if_unfrozen(self) -> None:
        # A parent module's .train() (or a user) may have flipped the autoencoder back.
        if any(module.training for module in self.modules):
            self._freeze()


def check_codecs(codecs, modalities) -> dict:
    """``codecs`` (``None`` or ``{modality name: LatentCodec}``) checked against ``modalities`` (the
    config's modalities): every name a modality, every value a :class:`LatentCodec` that
    fits it (:meth:`LatentCodec.check_modality`). Returns a new dict (empty for ``None``)."""
    if codecs is None:
        return {}
    if not isinstance(codecs, dict):
        raise ValueError(f"codecs must be a dict {{modality name: LatentCodec}} or None, got {describe(codecs)}")
    by_name = {m.name: m for m in modalities}
    for name, codec in codecs.items():
        if name not in by_name:
            raise ValueError(f"codecs: key must be a modality name, one of {sorted(by_name)}, got {name!r}")
        if not isinstance(codec, LatentCodec):
            raise ValueError(f"codecs[{name!r}] must be a LatentCodec, got {type(codec).__name__}")
        codec.check_modality(by_name[name])
    return dict(codecs)
