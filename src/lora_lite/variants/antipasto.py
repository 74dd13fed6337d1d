"""AntiPaSTO: SVD steering with learnable singular-value deltas and block-diagonal Cayley rotations.

wassname's AntiPaSTO (github.com/wassname/AntiPaSTO, PyTorch/peft adapter `antipasto_adapter.py`, and the
antipasto3 Flax SVD adapter `SVDSteeringLinear`). Not a peft method: there is no peft oracle. The Flax
antipasto3 source was not retrievable here; we read the PyTorch AntiPaSTO adapter and the antipasto3
fragments quoted in the original project's reviews (upper-triangle params, 0.5·(A − Aᵀ), tanh clamp,
Cayley solve, r % block_size assert), and implemented the SPEC row from those.

    W = U diag(S) Vh + W_res            top-r SVD in fp32; W: (d_out, d_in), U: (d_out, r), Vh: (r, d_in)
    A_k = ½ (T_k − T_kᵀ)                T_k: (bs, bs), upper triangle = rot_T[k] (bs(bs−1)/2 numbers), k < r/bs
    A_k ← a · tanh(A_k / a)             a = 2 tan(max_angle / 2): element-wise soft clamp of the angle
    R_k = (I − c A_k/2)⁻¹ (I + c A_k/2) Cayley transform; R = blockdiag(R_1 … R_{r/bs}) ∈ SO(r)
    Vh_rot = R Vh
    y' = x W_resᵀ + b + ((x Vh_rotᵀ) ⊙ (S + c·δs)) Uᵀ

Buffers (frozen, saved): lora_U, lora_S, lora_Vh. Trainable: lora_delta_s (r,) = δs, lora_rot_T
(r/bs, bs(bs−1)/2). c is the steering coefficient of `ll.scaled` (layer._lora_lite.coef, 1 by default,
the reference's `alpha`): Cayley gives R(−c) = R(c)⁻¹ exactly, so c = −1 is the inverse rotation and
c = 0 is the base model. cfg.alpha is not used (there is no alpha/r scale in this variant).

variant_kwargs:
  block_size (int >= 2, default min(r, 4); r % block_size == 0 or ConfigError): size of the rotation
    blocks. Each block rotates bs neighbouring top singular directions (similar singular values) among
    themselves with bs(bs−1)/2 angles, r(bs−1)/2 in all: with bs = 4 that is 1.5·r rotation parameters
    next to the r of δs, the same order as δs, and the Cayley solve is a batch of 4×4 systems.
    bs = 1 would be an empty rotation (nothing to learn) and is refused.
  max_angle (float in (0, π), default π/3 as the PyTorch reference; None: no clamp).

Init and identity: δs = 0 and rot_T = 0 ⇒ A = 0 ⇒ R = solve(I, I) = I exactly and S + c·δs = S exactly,
so the adapter adds exactly x Vhᵀ diag(S) Uᵀ and y' = x (W_res + U S Vh)ᵀ + b = x Wᵀ + b up to fp32
rounding (W_res is computed from the stored U, S, Vh). Live gradients at the identity: ∂R/∂A = I at
A = 0 (Cayley) and tanh'(0) = 1, so ∂L/∂rot_T[k, (i,j)] = ½(G_ij − G_ji) with G = ∂L/∂R_k, non-zero for
generic data; ∂L/∂δs_i = Σ_tokens (x Vh_iᵀ)(g U_i) ≠ 0. No symmetry breaking is needed.
Differences from the reference, and why:
  - Zero init (exact identity, as the SPEC asks) instead of the reference's small random init
    (δs ~ 4e-4 + 4e-4·truncnormal, rot_T ~ 1e-4·truncnormal). The reference needs the noise because its
    contrastive loss compares c = +1 with c = −1, which coincide at exact zero; for ordinary losses the
    gradients above are already non-zero. Set the tensors yourself after attach to reproduce it.
  - Vh_rot = R Vh (SPEC), where the reference writes U_in @ R with U_in = Vhᵀ in Flax's (in, out)
    layout, i.e. Vh_rot = Rᵀ Vh: the same family (Rᵀ = R(−A)), rot_T just has the opposite sign.
  - No dropout (the adapter path carries the principal part of W: dropping it would perturb the base
    model itself); cfg.dropout > 0 raises. W_res is kept in the base weight's dtype (the reference keeps
    a bf16 copy next to the frozen weight; we overwrite layer.weight and restore it on detach).
Quantized or integer base weights are refused (`rewrites_weight`): load the base unquantized.

Steering (`ll.scaled(model, c)`): c is the coefficient above, read by `forward` from layer._lora_lite.coef:
y_c = x W_resᵀ + b + ((x (R(c) Vh)ᵀ) ⊙ (S + c·δs)) Uᵀ with R(c) = Cayley(c·A). c = 0: R = I, δs off, exactly
the base model (to the fp32 rounding of the W split); c = 1: the adapter; c = −1: R(−1) = R(1)⁻¹ = R(1)ᵀ, the
exact inverse rotation, and −δs. Linear in c for δs, not for R (a rotation by c·A, not an interpolation).
Merge (`ll.merge`): W_eff = W_res + U diag(S + δs) (R Vh) at c = 1; it replaces the original weight.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, LoraLiteConfig
from ..target import dense_weight, set_dense_weight
from ..variant import ParamSpec, Variant, add_lowrank, for_cache, register, writable
from .pissa import top_r_svd

_KWARGS = ("block_size", "max_angle")
DEFAULT_MAX_ANGLE = math.pi / 3


def block_size(cfg: LoraLiteConfig) -> int:
    return cfg.variant_kwargs.get("block_size", min(cfg.r, 4))


def max_angle(cfg: LoraLiteConfig) -> float | None:
    return cfg.variant_kwargs.get("max_angle", DEFAULT_MAX_ANGLE)


def _consts(bs: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, cols = torch.triu_indices(bs, bs, 1, device=device)
    return rows, cols, torch.eye(bs, device=device, dtype=torch.float32)


def rotation_blocks(
    rot_T: torch.Tensor, bs: int, max_angle: float | None, c: float = 1.0, consts: tuple | None = None
) -> torch.Tensor:
    """R_k = Cayley(c · clamp(skew(rot_T[k]))) for every block k at once: (n_blocks, bs, bs), fp32 (fp64 for an
    fp64 rot_T).

    `consts`: the (rows, cols, eye) of `_consts(bs, device)`, cached by the caller.
    """
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


@register
class AntiPaSTO(Variant):
    name = "antipasto"
    kwargs = _KWARGS
    rewrites_weight = True
    reads_weight = True

    @staticmethod
    def validate(cfg: LoraLiteConfig) -> None:
        bs = block_size(cfg)
        if isinstance(bs, bool) or not isinstance(bs, int) or bs < 2:
            raise ConfigError(
                f"antipasto: block_size must be an integer >= 2 (a 1x1 rotation is the identity), got {bs!r} "
                f"with r={cfg.r}" + ("; antipasto needs r >= 2" if cfg.r < 2 else "")
            )
        if cfg.r % bs:
            divisors = [d for d in range(2, cfg.r + 1) if cfg.r % d == 0]
            raise ConfigError(
                f"antipasto: r={cfg.r} is not divisible by block_size={bs} (rotations act on r/block_size blocks; "
                f"the default block_size is min(r, 4)). Pass variant_kwargs={{'block_size': d}} with d in "
                f"{divisors}, or choose r a multiple of {bs}"
            )
        ang = max_angle(cfg)
        tiny = torch.finfo(torch.float32).tiny  # below it, a = 2 tan(max_angle / 2) rounds to 0 and A/a is 0/0
        if ang is not None and (
            isinstance(ang, bool) or not isinstance(ang, (int, float)) or not tiny <= ang < math.pi
        ):
            raise ConfigError(
                f"antipasto: max_angle must be in [{tiny:.3g}, pi) radians (tanh clamp of the rotation angle) or None "
                f"for no clamp, got {ang!r}"
            )
        if cfg.dropout:
            raise ConfigError(
                f"antipasto: dropout={cfg.dropout} is not supported: the adapter path carries the principal "
                "part of W, dropping it would perturb the base model. Use dropout=0.0"
            )

    @staticmethod
    def param_specs(d_in: int, d_out: int, cfg: LoraLiteConfig) -> dict[str, ParamSpec]:
        r, bs = cfg.r, block_size(cfg)
        return {
            "lora_U": ParamSpec((d_out, r), buffer=True, trainable=False),
            "lora_S": ParamSpec((r,), buffer=True, trainable=False),
            "lora_Vh": ParamSpec((r, d_in), buffer=True, trainable=False),
            "lora_delta_s": ParamSpec((r,), init="zeros"),
            "lora_rot_T": ParamSpec((r // bs, bs * (bs - 1) // 2), init="zeros"),
        }

    @staticmethod
    def init(layer: nn.Module, cfg: LoraLiteConfig) -> None:
        W = dense_weight(layer)  # fp32 (d_out, d_in)
        if cfg.r > min(W.shape):
            raise ConfigError(
                f"{layer._lora_lite.name}: antipasto needs r <= min(d_out, d_in) = {min(W.shape)} (the rank of the "
                f"SVD), got r={cfg.r}; lower r or exclude this layer"
            )
        U, S, Vh = top_r_svd(W, cfg.r)
        layer.lora_U.copy_(U)
        layer.lora_S.copy_(S)
        layer.lora_Vh.copy_(Vh)
        # residual from the stored (cfg.dtype-rounded) factors: W_res + U S Vh = W up to fp32 rounding
        set_dense_weight(layer, W - (layer.lora_U.float() * layer.lora_S.float()) @ layer.lora_Vh.float())

    @staticmethod
    def residual_factors(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """W − W_res = U diag(S) Vh: the runtime restores W from these (original.py)."""
        return layer.lora_U.double() * layer.lora_S.double(), layer.lora_Vh.double()

    @staticmethod
    def forward(layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        st = layer._lora_lite
        bs, c, rot_T = block_size(st.cfg), st.coef, layer.lora_rot_T
        consts = st.cache.get(("antipasto", rot_T.device))
        if consts is None:
            with for_cache():
                consts = st.cache[("antipasto", rot_T.device)] = _consts(bs, rot_T.device)
        R = rotation_blocks(rot_T, bs, max_angle(st.cfg), c, consts).to(x.dtype)  # once per call, tiny
        Vh = layer.lora_Vh
        Vh_rot = (R @ Vh.view(-1, bs, Vh.shape[1])).view_as(Vh)  # blockdiag(R) Vh, O(r·bs·d_in)
        h = F.linear(x, Vh_rot) * (layer.lora_S + c * layer.lora_delta_s)  # (x Vh_rotᵀ) ⊙ (S + c·δs)
        return add_lowrank(y, h, layer.lora_U, inplace=writable(layer, y))  # y + h Uᵀ, one fused addmm

    @staticmethod
    def scaled_forward(layer: nn.Module, x: torch.Tensor, y: torch.Tensor, c: float) -> torch.Tensor:
        """`ll.scaled`: forward already reads c = layer._lora_lite.coef (rotation R(c), δs scaled by c)."""
        return AntiPaSTO.forward(layer, x, y)

    @staticmethod
    def merged_weight(
        layer: nn.Module, W: torch.Tensor, b: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """W_res + U diag(S + δs) (R Vh) at c = 1; bias unchanged."""
        cfg, bs, dt = layer._lora_lite.cfg, block_size(layer._lora_lite.cfg), W.dtype
        R = rotation_blocks(layer.lora_rot_T, bs, max_angle(cfg)).to(dt)
        Vh = layer.lora_Vh.to(dt)
        Vh_rot = (R @ Vh.view(-1, bs, Vh.shape[1])).view_as(Vh)
        US = layer.lora_U.to(dt) * (layer.lora_S.to(dt) + layer.lora_delta_s.to(dt))
        return W + US @ Vh_rot, b
