"""The U-Net patch encoder / decoder of one image modality (the Transfusion paper's U-Net variant).

The linear head (``ModalityHead``) maps each patch row ``(P,)`` to ``(dim,)`` on its own. The U-Net
sees the whole image: down blocks take ``x_t`` (pixels or latents) ``(B, C, H, W)`` to the patch
grid ``(B, (H/p)(W/p), dim)``, one token per ``p × p`` patch in patchify's row-major order; up blocks
take the transformer's outputs on that grid back to ``(B, C, H, W)`` through skip connections from
the down blocks' features, and the result leaves as patch rows ``(B, N, P)`` (``P = p·p·C``, the
layout of :func:`transfusion_fast.ops.patchify`) so the diffusion loss and the samplers see the
same rows as with the linear head. Every residual block is conditioned on the timestep embedding
by a scale and shift after its second GroupNorm (ADM's "scale-shift norm").

For patch size ``p`` (a power of two) there are ``log2 p`` downsampling levels (stride-2 convs) and
as many upsampling ones (nearest ×2 + conv); ``p = 1`` keeps the full resolution.

Packed spans: a modality's rows in a packed batch are its spans' patch rows, span after span, with
spans of different sizes. :meth:`UNetPatchCoder.encode` groups the spans by ``(H, W)``, gathers each
group's rows into a ``(B_g, N_g, P)`` batch, unpatchifies it (:func:`transfusion_fast.ops.unpatchify`,
so the backend switch governs it), runs the down blocks per group and writes the tokens back in row
order. The skip features and the timestep embedding of every group travel in the returned
:class:`UNetState`, which :meth:`UNetPatchCoder.decode` takes with the transformer's outputs on the
same rows. The model keeps the state between its embedding and its decoding of a forward pass.

The U-Net is 2-D: a ``kind="sequence"`` modality (time series) is rejected with a ValueError
(:meth:`UNetPatchCoder.for_modality`); those keep the linear head.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .checks import MAX_SIZE, check_int, describe

__all__ = ["UNetPatchCoder", "UNetState", "ResBlock"]


def _patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    # Under torch.compile the formula is traced (a reshape and a permute the compiler fuses with
    # its neighbours); the compiled op is reached through the extension's loader, which dynamo
    # cannot trace.
    if torch.compiler.is_compiling():
        return ops.patchify_reference(images, p)
    return ops.patchify(images, p)


def _unpatchify(patches: torch.Tensor, p: int, height: int, width: int) -> torch.Tensor:
    if torch.compiler.is_compiling():    # see _patchify
        return ops.unpatchify_reference(patches, p, height, width)
    return ops.unpatchify(patches, p, height, width)


class ResBlock(nn.Module):
    """GroupNorm → SiLU → conv3x3 → GroupNorm·(1 + scale) + shift → SiLU → conv3x3, plus the input
    (through a 1x1 conv when the width changes); ``(scale, shift)`` come from the timestep embedding."""

    def __init__(self, in_channels: int, out_channels: int, time_dim: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time = nn.Linear(time_dim, 2 * out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """x (B, in, H, W), temb (B, time_dim) → (B, out, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.time(F.silu(temb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        return self.skip(x) + self.conv2(F.silu(h))


@dataclass
class _Group:
    """Spans of one image size: their indices, rows (B_g, N_g) in the packed rows, and size."""

    spans: list
    rows: torch.Tensor | None     # None: the group is every row in order (no gather needed)
    height: int
    width: int


@dataclass
class UNetState:
    """What :meth:`UNetPatchCoder.decode` needs from the encoding of the same rows: the span groups,
    each group's timestep embedding ``(B_g, time_dim)`` and skip features (one per level)."""

    groups: list
    temb: list
    skips: list
    num_rows: int


class UNetPatchCoder(nn.Module):
    """U-Net down blocks (patch encoder) and up blocks (patch decoder) of one image modality.

    Args:
        channels: image (or latent) channels ``C``.
        patch_size: ``p``, a power of two: the encoder downsamples by ``p`` to the patch grid.
        dim: the transformer width (token size).
        time_dim: size of the timestep embedding the caller passes (``temb``).
        base_channels: width of the full-resolution level; level ``l`` has
            ``base_channels · channel_mult[l]``.
        channel_mult: ``log2(p) + 1`` positive ints (default ``1, 2, 4, 4, …``).
        num_res_blocks: residual blocks per level on each side.
        groups: GroupNorm groups; must divide every level's width.
    """

    def __init__(self, channels: int, patch_size: int, dim: int, time_dim: int, *, base_channels: int = 64,
                 channel_mult: tuple | None = None, num_res_blocks: int = 1, groups: int = 8):
        super().__init__()
        for name, value in (("channels", channels), ("patch_size", patch_size), ("dim", dim),
                            ("time_dim", time_dim), ("base_channels", base_channels),
                            ("num_res_blocks", num_res_blocks), ("groups", groups)):
            check_int(name, value, 1, MAX_SIZE)
        if patch_size & (patch_size - 1):
            raise ValueError(f"patch_size must be a power of two for the U-Net encoder (it downsamples by 2 per "
                             f"level), got {patch_size}")
        levels = patch_size.bit_length() - 1
        if channel_mult is None:
            channel_mult = tuple(min(2 ** level, 4) for level in range(levels + 1))
        if (not isinstance(channel_mult, (tuple, list)) or len(channel_mult) != levels + 1
                or not all(isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in channel_mult)):
            raise ValueError(f"channel_mult must be {levels + 1} positive ints (one per level for patch_size="
                             f"{patch_size}), got {channel_mult!r}")
        widths = [base_channels * m for m in channel_mult]
        if any(w % groups for w in widths):
            raise ValueError(f"groups must divide every level's width {widths}, got groups={groups}")
        self.channels, self.patch_size, self.dim, self.time_dim = channels, patch_size, dim, time_dim
        self.levels, self.widths = levels, widths

        self.conv_in = nn.Conv2d(channels, widths[0], 3, padding=1)
        self.down = nn.ModuleList(
            nn.ModuleList(ResBlock(w, w, time_dim, groups) for _ in range(num_res_blocks)) for w in widths)
        self.downsample = nn.ModuleList(
            nn.Conv2d(widths[level], widths[level + 1], 3, stride=2, padding=1) for level in range(levels))
        self.to_tokens = nn.Sequential(nn.GroupNorm(groups, widths[-1]), nn.SiLU(), nn.Conv2d(widths[-1], dim, 1))

        self.from_tokens = nn.Conv2d(dim, widths[-1], 1)
        self.up = nn.ModuleList(
            nn.ModuleList([ResBlock(2 * w, w, time_dim, groups)]
                          + [ResBlock(w, w, time_dim, groups) for _ in range(num_res_blocks - 1)])
            for w in widths)
        self.upsample = nn.ModuleList(
            nn.Conv2d(widths[level + 1], widths[level], 3, padding=1) for level in range(levels))
        self.conv_out = nn.Sequential(nn.GroupNorm(groups, widths[0]), nn.SiLU(),
                                      nn.Conv2d(widths[0], channels, 3, padding=1))

    @classmethod
    def for_modality(cls, modality, dim: int, time_dim: int, **kwargs) -> "UNetPatchCoder":
        """The coder of a ``ModalityConfig`` (duck-typed: ``.name``, ``.kind``, ``.channels``,
        ``.patch_size``); ValueError for a modality that is not an image."""
        if modality.kind != "image":
            raise ValueError(f"encoder='unet' needs kind='image' (the U-Net is 2-D; sequence modalities use "
                             f"encoder='linear'), got kind={modality.kind!r} for modality {modality.name!r}")
        return cls(modality.channels, modality.patch_size, dim, time_dim, **kwargs)

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.channels

    # ------------------------------------------------------------------ images
    def _check_temb(self, temb, batch: int) -> None:
        if (not isinstance(temb, torch.Tensor) or not temb.is_floating_point()
                or temb.shape != (batch, self.time_dim)):
            raise ValueError(f"temb must be a floating-point ({batch}, {self.time_dim}) tensor (one timestep "
                             f"embedding per image), got {describe(temb)}")

    def encode_images(self, x: torch.Tensor, temb: torch.Tensor):
        """Down blocks: x ``(B, C, H, W)`` (H, W multiples of p), temb ``(B, time_dim)`` → tokens
        ``(B, (H/p)(W/p), dim)`` in patch order and the skip features (one per level)."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"x must be a floating-point (B, {self.channels}, H, W) tensor, got {describe(x)}")
        if x.shape[2] % self.patch_size or x.shape[3] % self.patch_size:
            raise ValueError(f"image height and width must be multiples of patch_size={self.patch_size}, got "
                             f"{tuple(x.shape[2:])}")
        self._check_temb(temb, x.shape[0])
        h = self.conv_in(x)
        skips = []
        for level in range(self.levels + 1):
            for block in self.down[level]:
                h = block(h, temb)
            skips.append(h)
            if level < self.levels:
                h = self.downsample[level](h)
        tokens = self.to_tokens(h)                                   # (B, dim, H/p, W/p)
        return tokens.flatten(2).transpose(1, 2), skips              # (B, N, dim): row-major grid

    def decode_images(self, h: torch.Tensor, skips: list, temb: torch.Tensor) -> torch.Tensor:
        """Up blocks: tokens ``(B, N, dim)`` on the patch grid, the encoder's skips and temb →
        patch rows ``(B, N, p·p·C)`` (the layout of :func:`transfusion_fast.ops.patchify`)."""
        if not isinstance(skips, (list, tuple)) or len(skips) != self.levels + 1:
            raise ValueError(f"skips must be the {self.levels + 1} features encode_images returned, got "
                             f"{describe(skips)}")
        batch, _, height, width = skips[0].shape
        grid_h, grid_w = height // self.patch_size, width // self.patch_size
        if not isinstance(h, torch.Tensor) or h.shape != (batch, grid_h * grid_w, self.dim):
            raise ValueError(f"h must be a ({batch}, {grid_h * grid_w}, {self.dim}) tensor (the tokens of the "
                             f"encoded images), got {describe(h)}")
        self._check_temb(temb, batch)
        x = self.from_tokens(h.transpose(1, 2).reshape(batch, self.dim, grid_h, grid_w))
        for level in range(self.levels, -1, -1):
            blocks = self.up[level]
            x = blocks[0](torch.cat([x, skips[level].to(x.dtype)], dim=1), temb)
            for block in blocks[1:]:
                x = block(x, temb)
            if level > 0:
                x = self.upsample[level - 1](F.interpolate(x, scale_factor=2.0, mode="nearest"))
        images = self.conv_out(x)                                    # (B, C, H, W)
        return _patchify(images.contiguous(), self.patch_size)

    # ------------------------------------------------------------------ packed spans
    def _groups(self, sizes, num_rows: int, device) -> list:
        if not isinstance(sizes, (list, tuple)) or not sizes:
            raise ValueError(f"sizes must be a non-empty list of (height, width) per span, got {describe(sizes)}")
        p = self.patch_size
        offsets, by_size = [0], {}
        for i, size in enumerate(sizes):
            if (not isinstance(size, (list, tuple)) or len(size) != 2
                    or not all(isinstance(v, int) and not isinstance(v, bool) and v >= p and v % p == 0
                               for v in size)):
                raise ValueError(f"sizes[{i}] must be (height, width), positive multiples of patch_size={p}, got "
                                 f"{size!r}")
            offsets.append(offsets[-1] + (size[0] // p) * (size[1] // p))
            by_size.setdefault((size[0], size[1]), []).append(i)
        if offsets[-1] != num_rows:
            raise ValueError(f"sizes give {offsets[-1]} patch rows, got x_t with {num_rows} rows")
        if len(by_size) == 1:
            (height, width), spans = next(iter(by_size.items()))
            return [_Group(spans, None, height, width)]
        groups = []
        for (height, width), spans in by_size.items():
            n = (height // p) * (width // p)
            starts = torch.tensor([offsets[i] for i in spans], dtype=torch.int64)
            rows = (starts[:, None] + torch.arange(n)[None, :]).to(device)     # (B_g, N_g)
            groups.append(_Group(spans, rows, height, width))
        return groups

    def encode(self, x_t: torch.Tensor, temb: torch.Tensor, sizes) -> tuple[torch.Tensor, UNetState]:
        """Packed spans → tokens. ``x_t`` ``(N, P)``: the patch rows of ``S`` spans, span after span;
        ``temb`` ``(S, time_dim)``: each span's timestep embedding; ``sizes``: each span's
        ``(H, W)``. Returns the tokens ``(N, dim)`` in the rows' order and the :class:`UNetState`
        for :meth:`decode`."""
        if not isinstance(x_t, torch.Tensor) or x_t.dim() != 2 or x_t.shape[1] != self.patch_dim:
            raise ValueError(f"x_t must be a (N, {self.patch_dim}) tensor of patch rows (P = p*p*C), got "
                             f"{describe(x_t)}")
        groups = self._groups(sizes, x_t.shape[0], x_t.device)
        self._check_temb(temb, len(sizes))
        out = None
        state = UNetState(groups, [], [], x_t.shape[0])
        for g in groups:
            batch, n = len(g.spans), (g.height // self.patch_size) * (g.width // self.patch_size)
            rows = x_t if g.rows is None else x_t[g.rows.reshape(-1)]
            images = _unpatchify(rows.reshape(batch, n, self.patch_dim), self.patch_size, g.height, g.width)
            g_temb = temb if g.rows is None else temb[g.spans]
            tokens, skips = self.encode_images(images, g_temb)
            state.temb.append(g_temb)
            state.skips.append(skips)
            if g.rows is None:
                out = tokens.reshape(-1, self.dim)
            else:
                if out is None:
                    out = tokens.new_zeros(x_t.shape[0], self.dim)
                out = out.index_copy(0, g.rows.reshape(-1), tokens.reshape(-1, self.dim))
        return out, state

    def decode(self, h: torch.Tensor, state: UNetState) -> torch.Tensor:
        """Tokens of the same rows ``(N, dim)`` (the transformer's outputs) → the prediction ``(N, P)``."""
        if not isinstance(state, UNetState):
            raise ValueError(f"state must be the UNetState that encode returned, got {describe(state)}")
        if not isinstance(h, torch.Tensor) or h.shape != (state.num_rows, self.dim):
            raise ValueError(f"h must be a ({state.num_rows}, {self.dim}) tensor (one row per encoded patch), "
                             f"got {describe(h)}")
        out = None
        for g, g_temb, skips in zip(state.groups, state.temb, state.skips):
            batch, n = len(g.spans), (g.height // self.patch_size) * (g.width // self.patch_size)
            tokens = h if g.rows is None else h[g.rows.reshape(-1)]
            patches = self.decode_images(tokens.reshape(batch, n, self.dim), skips, g_temb)
            if g.rows is None:
                return patches.reshape(-1, self.patch_dim)
            if out is None:
                out = patches.new_zeros(state.num_rows, self.patch_dim)
            out = out.index_copy(0, g.rows.reshape(-1), patches.reshape(-1, self.patch_dim))
        return out
