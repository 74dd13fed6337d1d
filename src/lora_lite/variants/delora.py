"""DeLoRA. Bini et al. 2025, "Decoupling Angles and Strength in Low-rank Adaptation", arXiv 2503.18225.

    y' = y + ((drop(x) ⊙ wnorm) Aᵀ ⊙ (λ/r) / (‖A_i‖·‖B_i‖)) Bᵀ
         A: (r, d_in), B: (d_out, r), λ: () trainable, wnorm: (d_in,) frozen buffer
         ‖A_i‖ = norm of row i of A, ‖B_i‖ = norm of column i of B, each clamped at min 1e-4

i.e. ΔW = B Ξ A diag(wnorm), Ξ = diag(λ/r / (‖A_i‖‖B_i‖)): B Ξ A is a sum of r rank-1 terms of
norm λ/r each, so ‖B Ξ A‖_F ≤ λ: the "strength" λ is decoupled from the "angles" (A, B). The norms
are NOT detached (gradients flow through them, as in peft); `clamp` stops their gradient only
while a norm is below 1e-4 (B = 0 at init).

Init (peft `reset_delora_parameters`, delora/layer.py:128-154): A kaiming-uniform(a=√5), B = 0,
λ = variant_kwargs["delora_lambda"] (default 15, peft's default), wnorm = ‖W_{:,j}‖ column norms of
the (d_out, d_in) weight (`norm(W, dim=0)`; dequantized / un-transposed through `dense_weight`).
Identity at init: B = 0 makes the update exactly zero.
Gradients: step 1: B gets a (large: 1/‖B_i‖ is clamped at 1e4) non-zero gradient, A and λ get
exactly zero (everything they touch is multiplied by B = 0). Step 2: B ≠ 0, so A and λ get
gradients. λ must be non-zero: with λ = 0 (the original project's choice) A and B never move.

Alternative not implemented: the paper (§3, "initialization") keeps B random too and subtracts a
frozen copy of the initial update, W' = W + ΔW(A, B, λ) − ΔW(A₀, B₀, λ₀), which is identity at init
with all tensors live from step 1 at the cost of a frozen copy of A, B. peft (and we) use B = 0.

Checked against peft 0.21.2 `peft/tuners/delora/layer.py`: `_compute_delta` 63-73, `update_layer`
88-126, `reset_delora_parameters` 128-154, `DeloraLinear.forward` 226-267 (same op order:
`(lambda / r) / (An * Bn)` at 255). Deviations: peft scales the input, (x ⊙ wnorm) Aᵀ; we fold wnorm
into A, x (A diag(wnorm))ᵀ: the same product in another rounding order (relative difference ~1e-7 in
fp32), without a (…, d_in) temporary and its backward multiply on every call (the benchmark's extra
peak memory over the frozen base drops from 68.9 to 37.4 MiB, peft's is 68.9). The adapter math runs in
at least fp32, so float16 adapters work (peft computes in float16 and silently produces NaN: at init
1/‖B_i‖ is clamped at 1e4, and λ/r·1e4·… overflows). λ is a 0-d tensor (peft: shape (1,)); wnorm is
kept in `cfg.dtype` (peft: the base weight's dtype); Conv1D and quantized bases are accepted (peft:
nn.Linear only).

Merge (`ll.merge`): W_eff = W + B Ξ A diag(wnorm), bias unchanged.
Steering (`ll.scaled(model, c)`): y + c·ΔW x, the update scaled by c (the same as λ → c·λ).
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
