"""AntiPaSTO: SVD steering with learnable singular-value deltas and block-diagonal Cayley rotations.

wassname's AntiPaSTO (github.com/wassname/AntiPaSTO: PyTorch adapter `antipasto_adapter.py`, antipasto3
Flax `SVDSteeringLinear`). Not a peft method: there is no peft oracle.

    W = U diag(S) Vh + W_res            top-r SVD in fp32; W: (d_out, d_in), U: (d_out, r), Vh: (r, d_in)
    A_k = ½ (T_k − T_kᵀ)                T_k: (bs, bs), upper triangle = rot_T[k] (bs(bs−1)/2 numbers), k < r/bs
    A_k ← a · tanh(A_k / a)             a = 2 tan(max_angle / 2): element-wise soft clamp of the angle
    R_k = (I − c A_k/2)⁻¹ (I + c A_k/2) Cayley transform; R = blockdiag(R_1 … R_{r/bs}) ∈ SO(r)
    y' = x W_resᵀ + b + ((x (R Vh)ᵀ) ⊙ (S + c·δs)) Uᵀ

U, S, Vh: frozen saved buffers; trainable δs (r,), rot_T (r/bs, bs(bs−1)/2). variant_kwargs: block_size
(bs, default min(r, 4), divides r), max_angle (default π/3). No alpha scale, no dropout, no quantized base.
Init: δs = 0, rot_T = 0 ⇒ R = I and S + c·δs = S exactly, so y' = x Wᵀ + b up to fp32 rounding; both
get gradients at the identity (Cayley: ∂R/∂A = I at A = 0). The reference's init is small-random instead.

Steering (`ll.scaled(model, c)`): c = layer._lora_lite.coef (1 by default), read by `forward`: c = 0 is
the base model, c = −1 the exact inverse rotation R(1)⁻¹ and −δs (linear in c for δs, not for R).
Merge (`ll.merge`): W_eff = W_res + U diag(S + δs) (R Vh) at c = 1; it replaces the original weight.

Notes: docs/variants/antipasto.md.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, LoraLiteConfig
from ..target import dense_weight, set_dense_weight
from ..variant import ParamSpec, Variant, add_lowrank, for_cache, register, writable
from ._cayley import _consts, rotation_blocks
from .pissa import top_r_svd

_KWARGS = ("block_size", "max_angle")
DEFAULT_MAX_ANGLE = math.pi / 3


def block_size(cfg: LoraLiteConfig) -> int:
    return cfg.variant_kwargs.get("block_size", min(cfg.r, 4))


def max_angle(cfg: LoraLiteConfig) -> float | None:
    return cfg.variant_kwargs.get("max_angle", DEFAULT_MAX_ANGLE)


@register
class AntiPaSTO(Variant):
    name = "antipasto"
    b_tensors = ("lora_delta_s",)  # LoRA+: peft's rule (1-D tensors are B-type); no peft counterpart
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
