"""HRA. Yuan et al. 2024, "Bridging The Gap between Low-rank and Orthogonal Adaptation via Householder
Reflection Adaptation", arXiv 2405.17484.

    y' = W (H_1 H_2 … H_r x) + b,     H_i = I − 2 u_i u_iᵀ / ‖u_i‖²,     U = [u_1; …; u_r]: (r, d_in)

(peft's order: Q = H_1 … H_r, W Q, so H_r touches x first.) A pre-hook replaces x by Q x, so any base
works (quantized, Conv1D). Q is never built: compact WY form, Q = I − Yᵀ T Y with Y the normalised rows
of U, T⁻¹ = ½ I + striu(Y Yᵀ) (r × r): two thin matmuls and an r × r triangular solve per call.
apply_GS (variant_kwargs, default False, as peft): Gram-Schmidt on u_1 … u_r; random init, not identity.

Init (as peft): kaiming-uniform(a=√5) on r/2 vectors, each repeated in two adjacent slots (u_1 = u_2, …).
Identity at init: H_i H_i = I, so Q = I up to fp32 rounding (~r·eps, not bit-exact); every u_i gets a
gradient on step 1. r must be even: an unpaired reflection has determinant −1.

Merge (`ll.merge`): W_eff = W Q, Q built densely (d_in × d_in, once), bias unchanged.
Steering (`ll.scaled(model, c)`): x → x + c·(Q x − x), i.e. W_eff(c) = W ((1 − c) I + c Q): c = 0 is the
base model, c = 1 the adapter (a linear interpolation, not a fractional rotation Q^c).

Checked against peft 0.21.2 `peft/tuners/hra/layer.py` (hra_u is (d_in, r): lora_U = hra_uᵀ).
Deviations: no dropout (raises), odd r raises (peft warns, random init), W (Q x) instead of (W Q) x.

Notes: docs/variants/hra.md.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from ..config import ConfigError, LoraLiteConfig
from ..variant import ParamSpec, Variant, register


def symmetric_init(t: torch.Tensor) -> None:
    """peft's symmetric init on lora_U (r, d_in): kaiming on r/2 vectors, each repeated twice, adjacent."""
    r, d_in = t.shape
    half = torch.zeros(d_in, r // 2, device=t.device, dtype=t.dtype)
    nn.init.kaiming_uniform_(half, a=math.sqrt(5))
    t.copy_(torch.repeat_interleave(half, 2, dim=1).T)


def random_init(t: torch.Tensor) -> None:
    """peft's `reset_hra_parameters_random` on lora_U (r, d_in): kaiming on the (d_in, r) layout, used with apply_GS."""
    u = torch.empty(t.shape[1], t.shape[0], device=t.device, dtype=t.dtype)
    nn.init.kaiming_uniform_(u, a=math.sqrt(5))
    t.copy_(u.T)


def gram_schmidt(U: torch.Tensor) -> torch.Tensor:
    """Modified Gram-Schmidt on the rows of U, in order, exactly as peft's loop (no eps)."""
    Q = [U[0] / U[0].norm()]
    for i in range(1, U.shape[0]):
        u = U[i]
        for q in Q:
            u = u - (q @ u) * q
        Q.append(u / u.norm())
    return torch.stack(Q)


def householder_product(U: torch.Tensor, x: torch.Tensor, apply_GS: bool = False) -> torch.Tensor:
    """x' with x'ᵀ = H_1 … H_r xᵀ for x (…, d_in), in compact WY form (no d_in × d_in matrix)."""
    if apply_GS:
        Q = gram_schmidt(U)
        return x - 2 * ((x @ Q.T) @ Q)
    dt = torch.promote_types(U.dtype, torch.float32)  # no half-precision triangular solve on CPU
    Y = U / U.norm(dim=1, keepdim=True)
    M = torch.triu(Y @ Y.T, 1).to(dt) + _half_eye(U.shape[0], U.device, dt)  # T⁻¹ = ½ I + striu(Y Yᵀ)
    Z = torch.linalg.solve_triangular(M, Y.to(dt), upper=True).to(U.dtype)  # T Y, (r, d_in): no explicit T
    P = x @ Z.T  # (…, r) = (x Yᵀ) Tᵀ
    return torch.addmm(x.reshape(-1, x.shape[-1]), P.reshape(-1, P.shape[-1]), Y, alpha=-1).view(x.shape)  # x − P Y


@functools.cache
def _half_eye(r: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return 0.5 * torch.eye(r, device=device, dtype=dtype)


@register
class HRA(Variant):
    name = "hra"
    kwargs = ("apply_GS",)

    @staticmethod
    def validate(cfg: LoraLiteConfig) -> None:
        if cfg.r % 2:
            raise ConfigError(
                f"hra: r must be even, got r={cfg.r}. HRA starts at the identity by pairing identical "
                "Householder reflections (H H = I); an odd r leaves one reflection unpaired, which is never "
                f"the identity. Use r={cfg.r + 1} or r={cfg.r - 1}."
            )
        if cfg.dropout:
            raise ConfigError(
                f"hra: dropout={cfg.dropout} is not supported (HRA rotates the input of the base layer, so "
                "dropout there would drop the base path too; peft's HRA has no dropout). Set dropout=0."
            )
        gs = cfg.variant_kwargs.get("apply_GS", False)
        if not isinstance(gs, bool):
            raise ConfigError(f"hra: variant_kwargs['apply_GS'] must be True or False, got {gs!r}")

    @staticmethod
    def param_specs(d_in: int, d_out: int, cfg: LoraLiteConfig) -> dict[str, ParamSpec]:
        gs = cfg.variant_kwargs.get("apply_GS", False)
        if gs and cfg.r > d_in:
            raise ConfigError(
                f"hra: apply_GS needs r <= d_in (Gram-Schmidt cannot make {cfg.r} orthonormal vectors in "
                f"{d_in} dimensions). Use r <= {d_in}, or apply_GS=False."
            )
        return {"lora_U": ParamSpec((cfg.r, d_in), init=random_init if gs else symmetric_init)}

    @staticmethod
    def forward_input(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        gs = layer._lora_lite.cfg.variant_kwargs.get("apply_GS", False)
        return householder_product(layer.lora_U, x, gs)

    @staticmethod
    def merged_weight(
        layer: nn.Module, W: torch.Tensor, b: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """W Q; bias unchanged. householder_product on the rows of I gives Qᵀ."""
        dt = W.dtype
        U = layer.lora_U.to(dt)
        gs = layer._lora_lite.cfg.variant_kwargs.get("apply_GS", False)
        Qt = householder_product(U, torch.eye(U.shape[1], device=U.device, dtype=dt), gs)
        return W @ Qt.T, b
