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

Implementations (picked by :func:`transfusion_fast.backend.resolve`):

* ``"triton"``: the fused kernel of :mod:`transfusion_fast.kernels.rope` (q and k in one launch,
  cos/sin in float32 in-kernel, backward = the inverse rotation); ``inplace=True`` rotates q and k
  in their own memory.
* ``"cpu"``: the reference composition below, run by ATen's compiled (vectorized) CPU kernels; this
  is the documented CPU path of the ``auto`` backend (RoPE has no C++ kernel of its own).
* ``"reference"``: the reference composition.
"""
from __future__ import annotations

import functools

import torch

from transfusion_fast.backend import resolve
from transfusion_fast.checks import check_bool, check_float, describe
from transfusion_fast.kernels import rope as rope_kernels

__all__ = ["apply_rope", "apply_rope_reference", "rope_angles", "rope_inv_freq", "check_rope_inputs"]


def rope_inv_freq(head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """Inverse frequencies, ``(2, head_dim // 2)`` float32 computed in float64 (read-only, cached).

    Row 0: ``theta^(-2i / D)`` of pair ``i`` (1-D positions). Row 1: the frequencies of a
    ``D/2``-dimensional embedding, twice: pair ``i < D/4`` rotates by the row position with
    ``theta^(-2i / (D/2))``, pair ``D/4 + i`` by the column position with the same frequency
    (axial positions; equal to row 0 when ``D`` is not a multiple of 4, where axial is refused).
    """
    if torch.compiler.is_compiling():
        return _inv_freq_table(head_dim, theta, device)    # a few constant ops in the traced graph
    return _cached_inv_freq_table(head_dim, theta, torch.device(device))


def _inv_freq_table(head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    half = head_dim // 2
    pair = torch.arange(half, device=device, dtype=torch.float64)
    text = theta ** (-2.0 * pair / head_dim)
    if head_dim % 4 == 0:
        axis = theta ** (-2.0 * torch.arange(half // 2, device=device, dtype=torch.float64) / half)
        axial = torch.cat([axis, axis])
    else:
        axial = text
    return torch.stack([text, axial]).float()


_cached_inv_freq_table = functools.lru_cache(maxsize=64)(_inv_freq_table)


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float,
                axial: torch.Tensor | None = None) -> torch.Tensor:
    """Rotation angle of every (token, pair): ``(T, head_dim // 2)`` float32."""
    inv_freq = rope_inv_freq(head_dim, float(theta), positions.device)
    first = positions[:, None] if positions.dim() == 1 else positions[:, :1]   # (T, 1), T = 0 too
    text_angles = first.float() * inv_freq[0][None, :]
    if positions.dim() == 1:
        return text_angles
    quarter = head_dim // 4
    pair_positions = torch.cat([positions[:, :1].expand(-1, quarter), positions[:, 1:2].expand(-1, quarter)],
                               dim=1)
    axial_angles = pair_positions.float() * inv_freq[1][None, :]
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
    if not isinstance(positions, torch.Tensor):
        raise ValueError(f"positions must be an int32/int64 tensor of shape (tokens,) or (tokens, 2), got "
                         f"{describe(positions)}")
    if axial is not None and not isinstance(axial, torch.Tensor):
        raise ValueError(f"axial must be None or a bool tensor of shape ({q.shape[0]},), got {describe(axial)}")
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
    check_float("theta", theta, 0.0, low_open=True)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    # float32 arithmetic for 16-bit inputs, float64 kept as is (gradcheck of the reference).
    compute = torch.promote_types(x.dtype, torch.float32)
    xf, cos, sin = x.to(compute), cos.to(compute), sin.to(compute)
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
               *, axial: torch.Tensor | None = None, interleaved: bool = False, inplace: bool = False):
    """Rotary embedding of q and k (see the module docstring); returns ``(q_rot, k_rot)``.

    ``inplace=True`` writes the rotation into q and k and returns them; it has no autograd (it is
    meant for inference, e.g. rotating new keys before they enter a KV cache), so it refuses tensors
    that require grad while grad mode is on.
    """
    check_rope_inputs(q, k, positions, axial, theta)
    interleaved = check_bool("interleaved", interleaved)
    inplace = check_bool("inplace", inplace)
    if inplace and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        raise ValueError("apply_rope(inplace=True) has no autograd: got q or k with requires_grad=True "
                         "under grad mode; use inplace=False for training")
    if resolve(q, "apply_rope") == "triton":
        inv_freq = rope_inv_freq(q.shape[-1], float(theta), q.device)
        rotate = rope_kernels.apply_rope_ if inplace else rope_kernels.apply_rope
        return rotate(q, k, positions, inv_freq, axial=axial, interleaved=interleaved)
    q_rot, k_rot = apply_rope_reference(q, k, positions, theta, axial, interleaved)
    if inplace:
        return q.copy_(q_rot), k.copy_(k_rot)
    return q_rot, k_rot
