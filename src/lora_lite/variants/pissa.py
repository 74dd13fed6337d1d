"""PiSSA. Meng et al. 2024, "PiSSA: Principal Singular Values and Singular Vectors Adaptation of Large
Language Models", arXiv 2404.02948.

    W = U S Vᵀ                          top-r SVD of the dense weight, fp32, W: (d_out, d_in)
    S' = S_r / s                        s = alpha / r (or alpha / √r with use_rslora), as peft
    B = U_r √S',  A = √S' V_rᵀ          B: (d_out, r), A: (r, d_in)
    W_res = W − s · B A                 written back into layer.weight
    y' = x W_resᵀ + b + s · (drop(x) Aᵀ) Bᵀ       (LoRA's forward, on top of W_res: `LoRA.forward`)

Dividing S_r by s makes s·B A = U_r S_r V_rᵀ for any alpha (the paper uses alpha = r; we follow peft).
Identity at init: W_res + s·B A = W up to fp32 rounding (W_res is computed from the stored A, B); A and
B are both non-zero, so both get a gradient on step 1. `svd_niter` (variant_kwargs): peft's
pissa_niter_[k] randomized SVD, seeded (SVD_SEED) on the CPU so `ll.load` re-derives W_res bit for bit.
Needs a dense float weight (quantized bases refused); GPT-2 Conv1D works.

Merge (`ll.merge`): W_eff = W_res + s·B A (lora's); it replaces the original weight, which is dropped.
Steering (`ll.scaled(model, c)`): y₀ + c·(y' − y₀), y₀ = x Wᵀ + b with the ORIGINAL W kept for detach,
i.e. W + c·s·(B A − B₀A₀): c = 0 is exactly the base layer, c = 1 the adapter.
peft export: rank 2r against W, B' = [B, −B₀], A' = [A; A₀], alpha doubled (√2·alpha with rslora).

Checked against peft 0.21.2 `peft/tuners/lora/layer.py` (`pissa_init`, `update_layer`): bit-exact in
fp32 for the exact SVD.

Notes: docs/variants/pissa.md.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, LoraLiteConfig
from ..target import dense_weight, is_conv1d, set_dense_weight
from ..variant import ParamSpec, original_weight, register
from .lora import LoRA, peft_lora_config

SVD_SEED = 0  # seed of the randomized SVD (svd_niter): fixed so that load re-derives the same W_res
_KWARGS = ("svd_niter", "use_rslora")


def top_r_svd(W: torch.Tensor, r: int, niter: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_r, S_r, Vh_r) of a fp32 (d_out, d_in) matrix: exact, or randomized with `niter` power iterations.

    The randomized one runs on the CPU under a forked RNG seeded with SVD_SEED: deterministic and the
    same wherever the weight lives, and the caller's RNG stream is left untouched.
    """
    if niter is None:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        return U[:, :r], S[:r], Vh[:r]
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(SVD_SEED)  # CPU only: torch.manual_seed would reseed CUDA too
        U, S, V = torch.svd_lowrank(W.cpu(), q=r, niter=niter)
    return U.to(W.device), S.to(W.device), V.t().to(W.device)


@register
class PiSSA(LoRA):
    name = "pissa"
    kwargs = _KWARGS
    kinds = ("linear",)  # (not LoRA's: pissa rewrites a linear weight)
    rewrites_weight = True
    scaled_reads_original = True
    reads_weight = True
    # forward is LoRA's. The tensors are LoRA's too, created as zeros (init overwrites them: no kaiming draw,
    # so attaching pissa leaves the caller's RNG stream untouched).

    @staticmethod
    def param_specs(d_in: int, d_out: int, cfg: LoraLiteConfig) -> dict[str, ParamSpec]:
        return {"lora_A": ParamSpec((cfg.r, d_in)), "lora_B": ParamSpec((d_out, cfg.r))}

    @staticmethod
    def validate(cfg: LoraLiteConfig) -> None:
        niter = cfg.variant_kwargs.get("svd_niter")
        if niter is not None and (isinstance(niter, bool) or not isinstance(niter, int) or niter < 0):
            raise ConfigError(
                f"pissa: svd_niter must be an integer >= 0 (power iterations of the randomized SVD, "
                f"peft's pissa_niter_[k]), got {niter!r}; leave it out for the exact SVD"
            )
        if cfg.alpha <= 0:
            raise ConfigError(
                f"pissa: alpha must be > 0 (S_r is divided by the scale alpha/r before its square root), "
                f"got {cfg.alpha}"
            )

    @staticmethod
    def init(layer: nn.Module, cfg: LoraLiteConfig) -> None:
        st = layer._lora_lite
        W = dense_weight(layer)  # fp32 (d_out, d_in)
        if cfg.r > min(W.shape):
            raise ConfigError(
                f"{st.name}: pissa needs r <= min(d_out, d_in) = {min(W.shape)} (the rank of the SVD), got r={cfg.r}; "
                "lower r or exclude this layer"
            )
        U, S, Vh = top_r_svd(W, cfg.r, cfg.variant_kwargs.get("svd_niter"))
        sqrt_s = (S / st.scale).sqrt()
        layer.lora_B.copy_(U * sqrt_s)  # U_r diag(√S')
        layer.lora_A.copy_(sqrt_s[:, None] * Vh)  # diag(√S') V_rᵀ
        # residual from the stored (cfg.dtype-rounded) factors, so W_res + s·B A = W up to fp32 rounding;
        # (s·B) @ A in peft's operation order, so in fp32 W_res matches peft bit for bit
        set_dense_weight(layer, W - st.scale * layer.lora_B.float() @ layer.lora_A.float())

    @staticmethod
    def residual_factors(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """W − W_res = s·B₀ A₀ (right after init): the runtime restores W from these (original.py)."""
        return layer._lora_lite.scale * layer.lora_B.double(), layer.lora_A.double()

    @staticmethod
    def scaled_forward(layer: nn.Module, x: torch.Tensor, y: torch.Tensor, c: float) -> torch.Tensor:
        """y₀ + c·(y' − y₀), y₀ = x Wᵀ + b with the original W (rebuilt on first use, then kept: original_weight)."""
        W0 = original_weight(layer)
        W0 = W0 if W0.dtype == x.dtype else W0.to(x.dtype)
        y0 = x @ W0 if is_conv1d(layer) else F.linear(x, W0)
        if layer.bias is not None:
            y0 = y0 + layer.bias.to(x.dtype)
        return y0 + c * (LoRA.forward(layer, x, y) - y0)

    @staticmethod
    @torch.no_grad()
    def peft_tensors(layer: nn.Module) -> dict[str, torch.Tensor]:
        """Rank 2r against the original W: B' = [B, −B₀], A' = [A; A₀], with s·B₀A₀ = W − W_res (refactored
        by a rank-r SVD of (W − W_res)/s, as peft's `subtract_mutated_init`)."""
        st, A, B = layer._lora_lite, layer.lora_A, layer.lora_B
        W0 = original_weight(
            layer, cache=False, what="export_peft (pissa's B₀A₀ = (W − W_res)/s)"
        ).float()  # (raises if not kept, or W_res overwritten since)
        W0 = W0.t() if is_conv1d(layer) else W0
        U, S, Vh = torch.linalg.svd((W0 - dense_weight(layer)) / st.scale, full_matrices=False)
        sqrt_s = S[: st.cfg.r].sqrt()
        A0, B0 = sqrt_s[:, None] * Vh[: st.cfg.r], U[:, : st.cfg.r] * sqrt_s
        A2 = torch.cat([A.float(), A0], dim=0).to(A.dtype)
        B2 = torch.cat([B.float(), -B0], dim=1).to(B.dtype)
        return {"lora_A.weight": A2, "lora_B.weight": B2}

    @staticmethod
    def peft_config(cfg: LoraLiteConfig, layers: dict[str, nn.Module]) -> dict[str, Any]:
        """The same scale at rank 2r: alpha/r -> 2alpha/2r, alpha/√r -> √2·alpha/√(2r)."""
        rslora = bool(cfg.variant_kwargs.get("use_rslora", False))
        return peft_lora_config(cfg, 2 * cfg.r, cfg.alpha * (math.sqrt(2) if rslora else 2))
