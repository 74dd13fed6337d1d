"""DeLoRA. Bini et al. 2025, "Decoupling Angles and Strength in Low-rank Adaptation", arXiv 2503.18225.

    y' = y + ((drop(x) ⊙ wnorm) Aᵀ ⊙ (λ/r) / (‖A_i‖·‖B_i‖)) Bᵀ
         A: (r, d_in), B: (d_out, r), λ: () trainable, wnorm: (d_in,) frozen buffer
         ‖A_i‖ = norm of row i of A, ‖B_i‖ = norm of column i of B, each clamped at min 1e-4

i.e. ΔW = B Ξ A diag(wnorm), Ξ = diag(λ/r / (‖A_i‖‖B_i‖)), so ‖B Ξ A‖_F ≤ λ: the "strength" λ is
decoupled from the "angles" (A, B). The norms are NOT detached (as in peft).

Init: A kaiming-uniform(a=√5), B = 0, λ = variant_kwargs["delora_lambda"] (default 15, peft's),
wnorm = column norms ‖W_{:,j}‖ of the (d_out, d_in) weight. Identity at init: B = 0 makes the update
exactly zero. Step 1: B gets a gradient, A and λ exactly zero; step 2: all. λ must be non-zero.

Merge (`ll.merge`): W_eff = W + B Ξ A diag(wnorm), bias unchanged.
Steering (`ll.scaled(model, c)`): y + c·ΔW x, the update scaled by c (the same as λ → c·λ).

Checked against peft 0.21.2 `peft/tuners/delora/layer.py`. Deviations: wnorm folded into A (same
product, another rounding order, less memory); math in at least fp32 (peft's float16 gives NaN);
Conv1D and quantized bases accepted.

Notes: docs/variants/delora.md.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, LoraLiteConfig
from ..target import dense_weight
from ..variant import ParamSpec, Variant, add_lowrank, dropout, register, writable


def _lambda(cfg: LoraLiteConfig) -> float:
    return float(cfg.variant_kwargs.get("delora_lambda", 15.0))


@register
class DeLoRA(Variant):
    name = "delora"
    b_tensors = ("lora_B", "lora_lambda")  # LoRA+: peft's delora_B (its name holds "lora_B"), 1-D delora_lambda
    kwargs = ("delora_lambda",)
    reads_weight = True

    @staticmethod
    def validate(cfg: LoraLiteConfig) -> None:
        lam = cfg.variant_kwargs.get("delora_lambda", 15.0)
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam == 0:
            raise ConfigError(
                f"delora: variant_kwargs['delora_lambda'] must be a finite non-zero number, got {lam!r} "
                "(λ = 0 zeroes the gradients of A and B forever; peft's default is 15)"
            )
        if abs(lam) > torch.finfo(cfg.dtype).max:
            raise ConfigError(
                f"delora: variant_kwargs['delora_lambda']={lam!r} does not fit the adapter dtype {cfg.dtype} "
                f"(max {torch.finfo(cfg.dtype).max:.3g}); use a smaller λ (peft's default is 15)"
            )

    @staticmethod
    def param_specs(d_in: int, d_out: int, cfg: LoraLiteConfig) -> dict[str, ParamSpec]:
        lam = _lambda(cfg)
        return {
            "lora_A": ParamSpec((cfg.r, d_in), init="kaiming"),
            "lora_B": ParamSpec((d_out, cfg.r), init="zeros"),
            "lora_lambda": ParamSpec((), init=lambda t: t.fill_(lam)),
            "lora_wnorm": ParamSpec((d_in,), init="ones", trainable=False, buffer=True),  # set in init
        }

    @staticmethod
    def init(layer: nn.Module, cfg: LoraLiteConfig) -> None:
        layer.lora_wnorm.copy_(torch.linalg.vector_norm(dense_weight(layer), dim=0))

    @staticmethod
    def forward(layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # At least fp32: 1/‖B_i‖ reaches 1e4 at init, past float16's range after model.half() (no-op for fp32).
        dt = torch.promote_types(layer.lora_A.dtype, torch.float32)
        A, B, r = layer.lora_A.to(dt), layer.lora_B.to(dt), layer._lora_lite.cfg.r
        An = torch.clamp(A.norm(dim=1), min=1e-4)
        Bn = torch.clamp(B.norm(dim=0), min=1e-4)
        # (x ⊙ wnorm) Aᵀ computed as x (A diag(wnorm))ᵀ: wnorm folded into the (r, d_in) A, not the (…, d_in) x
        h = F.linear(dropout(layer, x.to(dt)), A * layer.lora_wnorm.to(dt)) * (
            (layer.lora_lambda.to(dt) / r) / (An * Bn)
        )
        return add_lowrank(y, h, B, inplace=writable(layer, y))  # y + h Bᵀ, one fused addmm

    @staticmethod
    def merged_weight(
        layer: nn.Module, W: torch.Tensor, b: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """W + B Ξ A diag(wnorm), Ξ = diag(λ/r / (‖A_i‖‖B_i‖)); bias unchanged."""
        dt = W.dtype
        A, B, r = layer.lora_A.to(dt), layer.lora_B.to(dt), layer._lora_lite.cfg.r
        xi = (layer.lora_lambda.to(dt) / r) / (A.norm(dim=1).clamp(min=1e-4) * B.norm(dim=0).clamp(min=1e-4))
        return W + ((B * xi) @ A) * layer.lora_wnorm.to(dt), b
