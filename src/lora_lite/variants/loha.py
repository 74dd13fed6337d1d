"""LoHa. Hyeon-Woo et al. 2022, "FedPara: Low-Rank Hadamard Product for Communication-Efficient Federated
Learning", arXiv 2108.06098 (as LyCORIS and peft implement it).

    ΔW = s · (W1a W1b) ⊙ (W2a W2b)      W1a, W2a: (d_out, r), W1b, W2b: (r, d_in), s = alpha / r
    y' = y + x ΔWᵀ = y + s·(x Vᵀ) Uᵀ     U[:, a·r+b] = W1a[:, a] ⊙ W2a[:, b] (d_out, r²),
                                         V[a·r+b] = W1b[a] ⊙ W2b[b] (r², d_in): ΔW has rank ≤ r²

Forward: the rank-r² form above when r²·(d_in + d_out) < d_in·d_out (per-token cost), else ΔW built
densely as peft does (docs/variants/loha.md has the timings).
Init (peft's `reset_adapter_parameters`): W1a, W1b, W2a kaiming-uniform(a=√5), W2b = 0. Identity at init:
W2b = 0 makes W2a W2b = 0, so ΔW = 0 and y' == y bit for bit. Step 1: only W2b gets a gradient.
Training options (variant_kwargs, as peft): rank_dropout p zeroes each output row of ΔW with prob. p and
rescales by the kept fraction; module_dropout p skips the whole update with prob. p (training only).
`use_effective_conv2d`: convolutions only (lycoris_conv.py). No input dropout (cfg.dropout must be 0).

Merge (`ll.merge`): W_eff = W + ΔW, bias unchanged.
Steering (`ll.scaled(model, c)`): y + c·x ΔWᵀ (c = 0: the base model, c = 1: the adapter).
Checked against peft 0.21.2 `peft/tuners/loha/layer.py` (`LoHaLayer`, `Linear`, `HadaWeight`).

Notes: docs/variants/loha.md.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LoraLiteConfig
from ..variant import ParamSpec, Variant, add_lowrank, register, writable
from ._lycoris import check_lycoris, lycoris_config, lycoris_drop, lycoris_import
from .lora import routed

_NAMES = {"lora_w1_a": "hada_w1_a", "lora_w1_b": "hada_w1_b", "lora_w2_a": "hada_w2_a", "lora_w2_b": "hada_w2_b"}


def _factors(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """U (d_out, r²) and V (r², d_in) with U V = (W1a W1b) ⊙ (W2a W2b)."""
    a1, b1, a2, b2 = layer.lora_w1_a, layer.lora_w1_b, layer.lora_w2_a, layer.lora_w2_b
    r = a1.shape[1]
    U = (a1[:, :, None] * a2[:, None, :]).reshape(a1.shape[0], r * r)
    V = (b1[:, None, :] * b2[None, :, :]).reshape(r * r, b1.shape[1])
    return U, V


def delta_weight(layer: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """ΔW = s·(W1a W1b) ⊙ (W2a W2b), (d_out, d_in), in `dtype` (default: the adapter's)."""
    a1, b1, a2, b2 = (getattr(layer, n) if dtype is None else getattr(layer, n).to(dtype) for n in _NAMES)
    return layer._lora_lite.scale * ((a1 @ b1) * (a2 @ b2))


@register
class LoHa(Variant):
    name = "loha"
    kwargs = ("rank_dropout", "module_dropout", "use_effective_conv2d")
    peft_type = "LOHA"
    b_tensors = ()  # peft's LoRA+ B group takes "lora_B" names and 1-D tensors: LoHa has neither
    kinds = ("linear", "conv")  # convolutions: lycoris_conv.py
    route = classmethod(routed)

    @staticmethod
    def validate(cfg: LoraLiteConfig) -> None:
        check_lycoris(cfg)

    @staticmethod
    def param_specs(d_in: int, d_out: int, cfg: LoraLiteConfig) -> dict[str, ParamSpec]:
        return {
            "lora_w1_a": ParamSpec((d_out, cfg.r), init="kaiming"),
            "lora_w1_b": ParamSpec((cfg.r, d_in), init="kaiming"),
            "lora_w2_a": ParamSpec((d_out, cfg.r), init="kaiming"),
            "lora_w2_b": ParamSpec((cfg.r, d_in), init="zeros"),  # ΔW = 0 at init
        }

    @staticmethod
    def forward(layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        d_out, r = layer.lora_w1_a.shape
        skip, mask = lycoris_drop(layer, d_out, x.device, rescale=True)
        if skip:
            return y
        d_in = layer.lora_w1_b.shape[1]
        if r * r * (d_in + d_out) < d_in * d_out:  # the rank-r² form is cheaper per token
            U, V = _factors(layer)
            U = U if mask is None else U * mask.to(U.dtype)[:, None]
            h = F.linear(x, V) * layer._lora_lite.scale
            return add_lowrank(y, h, U, inplace=writable(layer, y))
        dW = delta_weight(layer)
        dW = dW if mask is None else dW * mask.to(dW.dtype)[:, None]
        return y + F.linear(x, dW)

    @staticmethod
    def merged_weight(
        layer: nn.Module, W: torch.Tensor, b: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """W + s·(W1a W1b) ⊙ (W2a W2b); bias unchanged."""
        return W + delta_weight(layer, W.dtype), b

    @staticmethod
    def peft_tensors(layer: nn.Module) -> dict[str, torch.Tensor]:
        return {theirs: getattr(layer, ours) for ours, theirs in _NAMES.items()}

    @staticmethod
    def peft_config(cfg: LoraLiteConfig, layers: dict[str, nn.Module]) -> dict[str, Any]:
        return lycoris_config(cfg)

    @staticmethod
    def peft_import(pc: dict, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, dict]]:
        per: dict[str, dict] = {}
        theirs = {v: k for k, v in {**_NAMES, "lora_t1": "hada_t1", "lora_t2": "hada_t2"}.items()}
        for key, t in tensors.items():
            module, _, tname = key.rpartition(".")
            if tname not in theirs:
                raise ValueError(f"tensor {key!r} is not a peft LoHa tensor (expected {sorted(theirs)})")
            per.setdefault(module, {})[theirs[tname]] = t
        for module, ts in per.items():
            missing = sorted(_NAMES[n] for n in _NAMES if n not in ts)
            if missing:
                raise ValueError(f"{module}: tensors {missing} are missing")
        return lycoris_import(pc, "LOHA"), per  # (tensors checked first: a file of another method says so)
