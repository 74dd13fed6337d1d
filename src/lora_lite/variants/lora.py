"""LoRA. Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685.

    y' = y + s · (drop(x) Aᵀ) Bᵀ        A: (r, d_in), B: (d_out, r)
    s  = alpha / r                    (rsLoRA, Kalajdzievski 2023, arXiv 2312.03732: s = alpha / √r,
                                       variant_kwargs={"use_rslora": True})

Init: A ~ kaiming-uniform(a=√5) (nn.Linear's default, as peft's init_lora_weights=True), B = 0.
Identity at init: B = 0 makes the update exactly zero, so y' == y bit for bit; B gets a
non-zero gradient (x Aᵀ ≠ 0) on step 1, A from step 2 on.

Merge (`ll.merge`): W_eff = W + s·B A, bias unchanged.
Steering (`ll.scaled(model, c)`): y + c·s·(x Aᵀ) Bᵀ, the update scaled by c (c = 0: the base model,
c = 1: the adapter, c = −1: the opposite update).

Checked against peft 0.21.2 `peft/tuners/lora/layer.py` (`LoraLayer.update_layer`, `reset_lora_parameters`,
`Linear.forward`). Deviation: none in the math; s is applied to the r-dim side and y + h Bᵀ is one fused
addmm (same value to float rounding). Embeddings and convolutions: lora_embedding.py, lora_conv.py (`routed`).

Notes: docs/variants/lora.md.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, LoraLiteConfig
from ..variant import FORMS, ParamSpec, Variant, add_lowrank, dropout, register, writable


def nonzero_alpha(cfg: LoraLiteConfig) -> None:
    """alpha = 0 makes the scale 0: the update, and the gradients of both A and B, are zero forever."""
    if cfg.alpha == 0:
        raise ConfigError(
            f"{cfg.variant}: alpha=0 makes the scale alpha/r zero, so the adapter's update and the gradients of "
            "lora_A and lora_B stay zero forever; use alpha > 0 (e.g. 2·r)"
        )


KINDS = ("linear", "embedding", "conv")


def routed(cls: type[Variant], name: str, role: str, cfg: LoraLiteConfig) -> type[Variant]:
    """`route` of lora and dora: an embedding's or a convolution's role is its kind, and its class is in
    lora_embedding.py / lora_conv.py (registered in the contract's `FORMS`); a linear layer keeps `cls`."""
    return FORMS[(role, cls.name)] if role in ("embedding", "conv") else cls


@register
class LoRA(Variant):
    name = "lora"
    b_tensors = ("lora_B",)  # LoRA+ (ll.param_groups): peft's lora_B (pissa, olora, loftq inherit it)
    kwargs = ("use_rslora",)
    peft_type = "LORA"
    kinds = KINDS
    route = classmethod(routed)

    @staticmethod
    def validate(cfg: LoraLiteConfig) -> None:
        nonzero_alpha(cfg)

    @staticmethod
    def param_specs(d_in: int, d_out: int, cfg: LoraLiteConfig) -> dict[str, ParamSpec]:
        return {
            "lora_A": ParamSpec((cfg.r, d_in), init="kaiming"),
            "lora_B": ParamSpec((d_out, cfg.r), init="zeros"),
        }

    @staticmethod
    def forward(layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = F.linear(dropout(layer, x), layer.lora_A) * layer._lora_lite.scale  # s on the r-dim side
        return add_lowrank(y, h, layer.lora_B, inplace=writable(layer, y))  # y + h Bᵀ, one fused addmm

    @staticmethod
    def merged_weight(
        layer: nn.Module, W: torch.Tensor, b: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """W + s·B A; bias unchanged."""
        return W + layer._lora_lite.scale * (layer.lora_B.to(W.dtype) @ layer.lora_A.to(W.dtype)), b

    @staticmethod
    def delta_factors(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float]:
        """ΔW = s·B A (ll.combine, ll.per_sample)."""
        return layer.lora_B, layer.lora_A, layer._lora_lite.scale

    @staticmethod
    def peft_tensors(layer: nn.Module) -> dict[str, torch.Tensor]:
        return {"lora_A.weight": layer.lora_A, "lora_B.weight": layer.lora_B}

    @staticmethod
    def peft_config(cfg: LoraLiteConfig, layers: dict[str, nn.Module]) -> dict[str, Any]:
        return peft_lora_config(cfg, cfg.r, cfg.alpha)


def peft_lora_config(cfg: LoraLiteConfig, r: int, alpha: float, use_dora: bool = False) -> dict[str, Any]:
    """The adapter_config.json fields of a peft LoRA with this rank and alpha."""
    return {
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": cfg.dropout,
        "use_rslora": bool(cfg.variant_kwargs.get("use_rslora", False)),
        "use_dora": use_dora,
        "bias": "none",
        "init_lora_weights": True,
    }
