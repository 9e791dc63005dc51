"""patchify / unpatchify: images ``(B, C, H, W)`` ↔ patch rows ``(B, (H/p)(W/p), p·p·C)``, and the
packed form: a list of ``(C, H_i, W_i)`` images ↔ one ``(total_patches, p·p·C)`` tensor + offsets.

Patch ``n = hp·(W/p) + wp`` (row-major over the patch grid); inside a patch the feature index is
``(py·p + px)·C + c`` (channels last), the order DiT's unpatchify expects. Inputs may have any strides
(channels-first, channels-last, views); outputs are contiguous. Any floating dtype: the kernels move
raw element bits. The compiled kernels (csrc/patchify.cpp, csrc/patchify_cuda.cu) run on both
devices under ``auto`` and ``triton``: there is no Triton version of this pure data movement.
``reference`` runs the reshape/permute twins.
"""
from __future__ import annotations

import math

import torch

from .. import _ext
from .. import backend as _backend
from ..checks import MAX_ELEMENTS, MAX_SIZE, check_int, describe

__all__ = ["patchify", "unpatchify", "patchify_reference", "unpatchify_reference",
           "check_patchify_inputs", "check_unpatchify_inputs", "patchify_packed", "unpatchify_packed",
           "patchify_packed_reference", "unpatchify_packed_reference"]


def _check_patch_size(p) -> None:
    check_int("patch size p", p, 1, MAX_SIZE)


def _check_output_size(what: str, shape) -> None:
    numel = math.prod(shape)
    if numel > MAX_ELEMENTS:
        raise ValueError(f"{what} would have shape {tuple(shape)}: {numel} elements, more than {MAX_ELEMENTS}")


def check_patchify_inputs(images: torch.Tensor, p: int) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"images must be a (B, C, H, W) tensor, got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point, got {images.dtype}")
    _check_patch_size(p)
    _, _, h, w = images.shape
    if h % p or w % p:
        raise ValueError(f"image height and width must be divisible by the patch size p={p}, got H={h}, W={w}")


def check_unpatchify_inputs(patches: torch.Tensor, p: int, height: int, width: int) -> None:
    if not isinstance(patches, torch.Tensor) or patches.dim() != 3:
        raise ValueError(f"patches must be a (B, num_patches, p*p*C) tensor, got "
                         f"{tuple(patches.shape) if isinstance(patches, torch.Tensor) else type(patches).__name__}")
    if not patches.is_floating_point():
        raise ValueError(f"patches must be floating point, got {patches.dtype}")
    _check_patch_size(p)
    for name, size in (("height", height), ("width", width)):
        check_int(name, size, 1, MAX_SIZE)
        if size % p:
            raise ValueError(f"{name} must be a positive multiple of p={p}, got {size!r}")
    if patches.shape[2] % (p * p):
        raise ValueError(f"the last dim of patches must be p*p*C = a multiple of {p * p}, got {patches.shape[2]}")
    expected = (height // p) * (width // p)
    if patches.shape[1] != expected:
        raise ValueError(f"expected {expected} patches for a {height}x{width} image with p={p}, got {patches.shape[1]}")
    _check_output_size("unpatchify's output", (patches.shape[0], patches.shape[2] // (p * p), height, width))


def check_patchify_packed_inputs(images, p: int) -> None:
    _check_patch_size(p)
    if not isinstance(images, (list, tuple)) or not images:
        raise ValueError(f"images must be a non-empty list of (C, H, W) tensors, got {type(images).__name__}")
    first = images[0]
    for i, image in enumerate(images):
        if not isinstance(image, torch.Tensor) or image.dim() != 3 or not image.is_floating_point():
            got = (image.dtype, tuple(image.shape)) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(f"images[{i}] must be a floating-point (C, H, W) tensor, got {got}")
        if image.shape[0] != first.shape[0] or image.dtype != first.dtype or image.device != first.device:
            raise ValueError(f"images[{i}] must match images[0] in channels, dtype and device "
                             f"(C={first.shape[0]}, {first.dtype}, {first.device}), got C={image.shape[0]}, "
                             f"{image.dtype}, {image.device}")
        if image.shape[1] % p or image.shape[2] % p:
            raise ValueError(f"images[{i}]: height and width must be divisible by the patch size p={p}, got "
                             f"H={image.shape[1]}, W={image.shape[2]}")


def check_unpatchify_packed_inputs(patches, offsets, p: int, sizes) -> None:
    _check_patch_size(p)
    if not isinstance(patches, torch.Tensor) or patches.dim() != 2 or not patches.is_floating_point():
        got = (patches.dtype, tuple(patches.shape)) if isinstance(patches, torch.Tensor) else type(patches).__name__
        raise ValueError(f"patches must be a floating-point (total_patches, p*p*C) tensor, got {got}")
    if patches.shape[1] % (p * p):
        raise ValueError(f"the last dim of patches must be p*p*C = a multiple of {p * p}, got {patches.shape[1]}")
    if not isinstance(sizes, (list, tuple)) or not sizes or not all(
            isinstance(s, (list, tuple)) and len(s) == 2 and all(
                isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_SIZE and v % p == 0 for v in s)
            for s in sizes):
        raise ValueError(f"sizes must be a non-empty list of (height, width) pairs, positive multiples of p={p} "
                         f"and at most {MAX_SIZE}, got {describe(sizes)}")
    counts = [(h // p) * (w // p) for h, w in sizes]
    if sum(counts) > MAX_ELEMENTS:
        raise ValueError(f"sizes give {sum(counts)} patches, more than {MAX_ELEMENTS}")
    expected = torch.tensor([0] + counts).cumsum(0)
    if (not isinstance(offsets, torch.Tensor) or offsets.dtype not in (torch.int32, torch.int64)
            or offsets.shape != expected.shape or not torch.equal(offsets.detach().cpu().long(), expected)):
        raise ValueError(f"offsets must be the patch-row offsets of sizes, {expected.tolist()}, got "
                         f"{offsets.tolist() if isinstance(offsets, torch.Tensor) else offsets!r}")
    if patches.shape[0] != int(expected[-1]):
        raise ValueError(f"sizes give {int(expected[-1])} patches, got {patches.shape[0]} rows")
    channels = patches.shape[1] // (p * p)
    _check_output_size("unpatchify_packed's output", (sum(h * w for h, w in sizes), channels))


def patchify_reference(images: torch.Tensor, p: int) -> torch.Tensor:
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // p, p, w // p, p)            # (B, C, Hp, py, Wp, px)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify_reference(patches: torch.Tensor, p: int, height: int, width: int) -> torch.Tensor:
    b, _, d = patches.shape
    c = d // (p * p)
    x = patches.reshape(b, height // p, width // p, p, p, c)  # (B, Hp, Wp, py, px, C)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, c, height, width)


def patchify_packed_reference(images, p: int):
    """The packed patches of a list of ``(C, H_i, W_i)`` images and their int64 row offsets."""
    parts = [patchify_reference(image[None], p)[0] for image in images]
    offsets = torch.tensor([0] + [part.shape[0] for part in parts], device=images[0].device).cumsum(0)
    return torch.cat(parts), offsets


def unpatchify_packed_reference(patches: torch.Tensor, offsets: torch.Tensor, p: int, sizes):
    """The list of ``(C, H_i, W_i)`` images of packed ``patches``."""
    bounds = offsets.tolist()
    return [unpatchify_reference(patches[bounds[i]:bounds[i + 1]][None], p, h, w)[0]
            for i, (h, w) in enumerate(sizes)]


def _setup_patchify(ctx, inputs, output):
    images, p = inputs
    ctx.p, ctx.size = p, images.shape[-2:]


def _backward_patchify(ctx, grad):
    return torch.ops.transfusion_fast.unpatchify(grad.contiguous(), ctx.p, ctx.size[0], ctx.size[1]), None


def _setup_unpatchify(ctx, inputs, output):
    ctx.p = inputs[1]


def _backward_unpatchify(ctx, grad):
    return torch.ops.transfusion_fast.patchify(grad, ctx.p), None, None, None


def _setup_patchify_packed(ctx, inputs, output):
    images, p = inputs
    ctx.p, ctx.sizes = p, [tuple(image.shape[-2:]) for image in images]


def _backward_patchify_packed(ctx, grad_patches, grad_offsets):
    heights, widths = [h for h, _ in ctx.sizes], [w for _, w in ctx.sizes]
    return list(torch.ops.transfusion_fast.unpatchify_packed(grad_patches.contiguous(), ctx.p, heights, widths)), None


def _setup_unpatchify_packed(ctx, inputs, output):
    ctx.p = inputs[1]
    ctx.like = [image.new_empty(0) for image in output]
    ctx.shapes = [image.shape for image in output]


def _backward_unpatchify_packed(ctx, grad_images):
    # Images whose output got no gradient contribute zeros.
    grads = [like.new_zeros(shape) if g is None else g
             for g, like, shape in zip(grad_images, ctx.like, ctx.shapes)]
    return torch.ops.transfusion_fast.patchify_packed(grads, ctx.p)[0], None, None, None


def _fake_patchify(images, p):
    b, c, h, w = images.shape
    return images.new_empty(b, (h // p) * (w // p), p * p * c)


def _fake_unpatchify(patches, p, height, width):
    return patches.new_empty(patches.shape[0], patches.shape[2] // (p * p), height, width)


def _fake_patchify_packed(images, p):
    total = sum((image.shape[1] // p) * (image.shape[2] // p) for image in images)
    return (images[0].new_empty(total, p * p * images[0].shape[0]),
            images[0].new_empty(len(images) + 1, dtype=torch.int64))


def _fake_unpatchify_packed(patches, p, heights, widths):
    channels = patches.shape[1] // (p * p)
    return [patches.new_empty(channels, h, w) for h, w in zip(heights, widths)]


def _attach_python_kernels():
    """Autograd formulas and fake (meta) kernels of the compiled ops above (run once)."""
    torch.library.register_autograd("transfusion_fast::patchify", _backward_patchify,
                                    setup_context=_setup_patchify)
    torch.library.register_autograd("transfusion_fast::unpatchify", _backward_unpatchify,
                                    setup_context=_setup_unpatchify)
    torch.library.register_autograd("transfusion_fast::patchify_packed", _backward_patchify_packed,
                                    setup_context=_setup_patchify_packed)
    torch.library.register_autograd("transfusion_fast::unpatchify_packed", _backward_unpatchify_packed,
                                    setup_context=_setup_unpatchify_packed)
    torch.library.register_fake("transfusion_fast::patchify_packed", _fake_patchify_packed)
    torch.library.register_fake("transfusion_fast::unpatchify_packed", _fake_unpatchify_packed)
    torch.library.register_fake("transfusion_fast::patchify", _fake_patchify)
    torch.library.register_fake("transfusion_fast::unpatchify", _fake_unpatchify)


def _compiled():
    return _ext.ops(_attach_python_kernels)


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


def patchify_packed(images, p: int):
    """A list of ``(C, H_i, W_i)`` images (any sizes, multiples of ``p``; any strides) → ``(patches,
    offsets)``: ``patches`` is ``(total_patches, p·p·C)`` with image ``i`` in rows
    ``[offsets[i], offsets[i+1])``, ``offsets`` an int64 vector of ``len(images) + 1`` entries on the
    images' device. Differentiable w.r.t. the images."""
    check_patchify_packed_inputs(images, p)
    if _backend.get_backend() == "reference":
        return patchify_packed_reference(images, p)
    return _compiled().patchify_packed(list(images), p)


def unpatchify_packed(patches: torch.Tensor, offsets: torch.Tensor, p: int, sizes):
    """Inverse of :func:`patchify_packed`: the list of contiguous ``(C, H_i, W_i)`` images, ``sizes``
    their ``(H_i, W_i)``; ``offsets`` must be the ones those sizes give. Differentiable."""
    check_unpatchify_packed_inputs(patches, offsets, p, sizes)
    if _backend.get_backend() == "reference":
        return unpatchify_packed_reference(patches, offsets, p, sizes)
    heights, widths = [h for h, _ in sizes], [w for _, w in sizes]
    return list(_compiled().unpatchify_packed(patches, p, heights, widths))
