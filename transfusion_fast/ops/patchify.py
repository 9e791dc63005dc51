"""patchify / unpatchify: images ``(B, C, H, W)`` ↔ patch rows ``(B, (H/p)(W/p), p·p·C)``.

Patch ``n = hp·(W/p) + wp`` (row-major over the patch grid); inside a patch the feature index is
``(py·p + px)·C + c`` (channels last), the order DiT's unpatchify expects. The compiled kernels
(csrc/patchify.cpp, csrc/patchify.cu) run on both devices under ``auto`` and ``triton``: there is
no Triton version of this pure data movement.
"""
from __future__ import annotations

import torch

from .. import _ext
from .. import backend as _backend

__all__ = ["patchify", "unpatchify", "patchify_reference", "unpatchify_reference",
           "check_patchify_inputs", "check_unpatchify_inputs"]


def check_patchify_inputs(images: torch.Tensor, p: int) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"images must be a (B, C, H, W) tensor, got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point, got {images.dtype}")
    if not isinstance(p, int) or isinstance(p, bool) or p < 1:
        raise ValueError(f"patch size p must be a positive int, got {p!r}")
    _, _, h, w = images.shape
    if h % p or w % p:
        raise ValueError(f"image height and width must be divisible by the patch size p={p}, got H={h}, W={w}")


def check_unpatchify_inputs(patches: torch.Tensor, p: int, height: int, width: int) -> None:
    if not isinstance(patches, torch.Tensor) or patches.dim() != 3:
        raise ValueError(f"patches must be a (B, num_patches, p*p*C) tensor, got "
                         f"{tuple(patches.shape) if isinstance(patches, torch.Tensor) else type(patches).__name__}")
    if not patches.is_floating_point():
        raise ValueError(f"patches must be floating point, got {patches.dtype}")
    if not isinstance(p, int) or isinstance(p, bool) or p < 1:
        raise ValueError(f"patch size p must be a positive int, got {p!r}")
    for name, size in (("height", height), ("width", width)):
        if not isinstance(size, int) or size < 1 or size % p:
            raise ValueError(f"{name} must be a positive multiple of p={p}, got {size!r}")
    if patches.shape[2] % (p * p):
        raise ValueError(f"the last dim of patches must be p*p*C = a multiple of {p * p}, got {patches.shape[2]}")
    expected = (height // p) * (width // p)
    if patches.shape[1] != expected:
        raise ValueError(f"expected {expected} patches for a {height}x{width} image with p={p}, got {patches.shape[1]}")


def patchify_reference(images: torch.Tensor, p: int) -> torch.Tensor:
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // p, p, w // p, p)            # (B, C, Hp, py, Wp, px)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify_reference(patches: torch.Tensor, p: int, height: int, width: int) -> torch.Tensor:
    b, _, d = patches.shape
    c = d // (p * p)
    x = patches.reshape(b, height // p, width // p, p, p, c)  # (B, Hp, Wp, py, px, C)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, c, height, width)


def _setup_patchify(ctx, inputs, output):
    images, p = inputs
    ctx.p, ctx.size = p, images.shape[-2:]


def _backward_patchify(ctx, grad):
    return torch.ops.transfusion_fast.unpatchify(grad.contiguous(), ctx.p, ctx.size[0], ctx.size[1]), None


def _setup_unpatchify(ctx, inputs, output):
    ctx.p = inputs[1]


def _backward_unpatchify(ctx, grad):
    return torch.ops.transfusion_fast.patchify(grad, ctx.p), None, None, None


def _fake_patchify(images, p):
    b, c, h, w = images.shape
    return images.new_empty(b, (h // p) * (w // p), p * p * c)


def _fake_unpatchify(patches, p, height, width):
    return patches.new_empty(patches.shape[0], patches.shape[2] // (p * p), height, width)


_registered = False


def _compiled():
    """torch.ops.transfusion_fast with autograd and fake (meta) kernels attached once."""
    global _registered
    ops = _ext.ops()
    if not _registered:
        torch.library.register_autograd("transfusion_fast::patchify", _backward_patchify,
                                        setup_context=_setup_patchify)
        torch.library.register_autograd("transfusion_fast::unpatchify", _backward_unpatchify,
                                        setup_context=_setup_unpatchify)
        torch.library.register_fake("transfusion_fast::patchify", _fake_patchify)
        torch.library.register_fake("transfusion_fast::unpatchify", _fake_unpatchify)
        _registered = True
    return ops


def patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    """``(B, C, H, W)`` → ``(B, (H/p)(W/p), p·p·C)``; any strides (channels-last included)."""
    check_patchify_inputs(images, p)
    if _backend.get_backend() == "reference":
        return patchify_reference(images, p)
    return _compiled().patchify(images, p)


def unpatchify(patches: torch.Tensor, p: int, height: int, width: int) -> torch.Tensor:
    """``(B, (H/p)(W/p), p·p·C)`` → contiguous ``(B, C, height, width)``."""
    check_unpatchify_inputs(patches, p, height, width)
    if _backend.get_backend() == "reference":
        return unpatchify_reference(patches, p, height, width)
    return _compiled().unpatchify(patches, p, height, width)
