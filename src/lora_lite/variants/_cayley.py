"""Block-diagonal Cayley rotations (antipasto): R_k = (I − X_k)⁻¹ (I + X_k), X_k = (c/2)·clamp(skew(T_k)).

The Cayley transform maps a skew-symmetric A to an orthogonal R (det +1), R = I at A = 0, and R(−c) = R(c)⁻¹:
steering by c is an exact fractional rotation in that parametrisation.
"""

from __future__ import annotations

import math

import torch


def _consts(bs: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, cols = torch.triu_indices(bs, bs, 1, device=device)
    return rows, cols, torch.eye(bs, device=device, dtype=torch.float32)


def rotation_blocks(
    rot_T: torch.Tensor, bs: int, max_angle: float | None, c: float = 1.0, consts: tuple | None = None
) -> torch.Tensor:
    """R_k = Cayley(c · clamp(skew(rot_T[k]))) for all k: (n_blocks, bs, bs), ≥ fp32; `consts`: cached `_consts`."""
    rows, cols, eye = consts if consts is not None else _consts(bs, rot_T.device)
    dt = torch.promote_types(rot_T.dtype, torch.float32)
    eye = eye.to(dt)
    T = rot_T.new_zeros((rot_T.shape[0], bs, bs), dtype=dt)
    T[:, rows, cols] = rot_T.to(dt)  # upper triangle
    A = 0.5 * (T - T.transpose(-1, -2))
    if max_angle is not None:
        a = 2 * math.tan(max_angle / 2)
        A = a * torch.tanh(A / a)
    X = (c / 2) * A
    return torch.linalg.solve(eye - X, eye + X)  # batched over blocks; eye broadcasts
