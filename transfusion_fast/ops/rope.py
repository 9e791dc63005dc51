"""Rotary position embedding on packed ``(T, H, D)`` q and k.

Positions are per token, so packed documents restart at 0 and continuous spans may use 2-D axial
(row, column) positions while text keeps 1-D positions:

* ``positions`` of shape ``(T,)``: every token is rotated by its 1-D position.
* ``positions`` of shape ``(T, 2)`` with ``axial`` of shape ``(T,)`` bool: text rows (``axial`` false)
  use ``positions[:, 0]``; axial rows rotate the first half of their rotary pairs by the row
  ``positions[:, 0]`` and the second half by the column ``positions[:, 1]``, each half with the
  frequencies of a ``D/2``-dimensional rotary embedding.

Two pair conventions: rotate-half (default, pairs ``(i, i + D/2)``) and interleaved (pairs
``(2i, 2i + 1)``).
"""
from __future__ import annotations

import torch

__all__ = ["apply_rope", "apply_rope_reference", "rope_angles", "check_rope_inputs"]


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float,
                axial: torch.Tensor | None = None) -> torch.Tensor:
    """Rotation angle of every (token, pair): ``(T, head_dim // 2)`` float32."""
    half = head_dim // 2
    pair = torch.arange(half, device=positions.device, dtype=torch.float64)
    inv_freq = (theta ** (-2.0 * pair / head_dim)).float()
    if positions.dim() == 1:
        return positions.float()[:, None] * inv_freq[None, :]
    quarter = half // 2
    q_pair = torch.arange(quarter, device=positions.device, dtype=torch.float64)
    inv_freq_axis = (theta ** (-2.0 * q_pair / half)).float()
    axial_angles = torch.cat([positions[:, :1].float() * inv_freq_axis[None, :],
                              positions[:, 1:2].float() * inv_freq_axis[None, :]], dim=1)
    text_angles = positions[:, :1].float() * inv_freq[None, :]
    return torch.where(axial[:, None], axial_angles, text_angles)


def check_rope_inputs(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                      axial: torch.Tensor | None, theta: float) -> None:
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{name} must be a packed (tokens, heads, head_dim) tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {t.dtype}")
    if q.dtype != k.dtype:
        raise ValueError(f"q and k must share a dtype, got {q.dtype} and {k.dtype}")
    if q.device != k.device or positions.device != q.device:
        raise ValueError(f"q, k and positions must be on one device, got {q.device}, {k.device}, "
                         f"{positions.device}")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must share tokens and head_dim, got {tuple(q.shape)} and {tuple(k.shape)}")
    d = q.shape[2]
    if d % 2 != 0:
        raise ValueError(f"head_dim must be even for rotary embedding, got {d}")
    if positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"positions must be int32 or int64, got {positions.dtype}")
    if positions.shape[0] != q.shape[0]:
        raise ValueError(f"positions must have one entry per token ({q.shape[0]}), got {positions.shape[0]}")
    if positions.dim() == 2:
        if positions.shape[1] != 2:
            raise ValueError(f"2-D positions must have shape (tokens, 2), got {tuple(positions.shape)}")
        if axial is None or axial.dtype != torch.bool or axial.shape != (q.shape[0],):
            raise ValueError(f"2-D positions need axial: a bool tensor of shape ({q.shape[0]},), got "
                             f"{None if axial is None else (axial.dtype, tuple(axial.shape))}")
        if d % 4 != 0:
            raise ValueError(f"axial (2-D) rotary embedding needs head_dim divisible by 4, got {d}")
    elif positions.dim() != 1:
        raise ValueError(f"positions must have shape (tokens,) or (tokens, 2), got {tuple(positions.shape)}")
    elif axial is not None:
        raise ValueError("axial is only meaningful with 2-D positions of shape (tokens, 2)")
    if not theta > 0:
        raise ValueError(f"theta must be positive, got {theta}")


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    xf = x.float()
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        return torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2).to(x.dtype)
    half = x.shape[-1] // 2
    x1, x2 = xf[..., :half], xf[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def apply_rope_reference(q, k, positions, theta=10000.0, axial=None, interleaved=False):
    """Rotate q ``(T, Hq, D)`` and k ``(T, Hk, D)``; returns new tensors (q_rot, k_rot)."""
    angles = rope_angles(positions, q.shape[-1], theta, axial)[:, None, :]   # (T, 1, D/2)
    cos, sin = torch.cos(angles), torch.sin(angles)
    return _rotate(q, cos, sin, interleaved), _rotate(k, cos, sin, interleaved)


def apply_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0,
               *, axial: torch.Tensor | None = None, interleaved: bool = False):
    """Rotary embedding of q and k (see the module docstring); returns ``(q_rot, k_rot)``."""
    check_rope_inputs(q, k, positions, axial, theta)
    return apply_rope_reference(q, k, positions, theta, axial, interleaved)
