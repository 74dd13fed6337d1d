"""OLoRA. Büyükakyüz 2024, "OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models", arXiv 2406.01775.

    W = Q R                             reduced QR of the dense weight, fp32, W: (d_out, d_in)
    B = Q[:, :r],  A = R[:r]            B: (d_out, r) orthonormal columns, A: (r, d_in) upper-trapezoidal
    W_res = W − s · B A                 written back into layer.weight (s = alpha / r, or alpha / √r)
    y' = x W_resᵀ + b + s · (drop(x) Aᵀ) Bᵀ       (LoRA's forward, on top of W_res: `LoRA.forward`)

Identity at init: W_res + s·B A = W up to fp32 rounding (W_res is computed from the stored A, B), for any
alpha. A and B are both non-zero, so both get a gradient on step 1. Deterministic (no RNG): `ll.load` and
`ll.import_peft` re-derive W_res from the base weight, as peft does on load. Needs a dense float weight
(quantized bases refused, as pissa); GPT-2 Conv1D works (the QR is of the (d_out, d_in) weight).

Merge (`ll.merge`): W_eff = W_res + s·B A (lora's); it replaces the original weight, which is dropped.
Steering (`ll.scaled(model, c)`): y₀ + c·(y' − y₀), y₀ from the ORIGINAL W kept for detach (pissa's):
c = 0 is exactly the base layer, c = 1 the adapter.
peft export: as pissa, a plain rank-2r LoRA against the original W (B' = [B, −B₀], A' = [A; A₀]).

Checked against peft 0.21.2 `peft/tuners/lora/layer.py` (`olora_init`): bit-exact in fp32 on nn.Linear.

Notes: docs/variants/olora.md.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ConfigError, LoraLiteConfig
from ..target import dense_weight, set_dense_weight
from ..variant import register
from .lora import nonzero_alpha
from .pissa import PiSSA


@register
class OLoRA(PiSSA):
    name = "olora"
    kwargs = ("use_rslora",)
    # tensors, forward, merge, residual_factors, scaled_forward and the peft export are pissa's (LoRA on W_res)

    @staticmethod
    def validate(cfg: LoraLiteConfig) -> None:
        nonzero_alpha(cfg)

    @staticmethod
    def init(layer: nn.Module, cfg: LoraLiteConfig) -> None:
        st = layer._lora_lite
        W = dense_weight(layer)  # fp32 (d_out, d_in)
        if cfg.r > min(W.shape):
            raise ConfigError(
                f"{st.name}: olora needs r <= min(d_out, d_in) = {min(W.shape)} (the columns of the QR's Q), "
                f"got r={cfg.r}; lower r or exclude this layer"
            )
        Q, R = torch.linalg.qr(W)
        layer.lora_B.copy_(Q[:, : cfg.r])
        layer.lora_A.copy_(R[: cfg.r])
        # (s·B) @ A from the stored factors, in peft's operation order: W_res matches peft's bit for bit in fp32
        set_dense_weight(layer, W - st.scale * layer.lora_B.float() @ layer.lora_A.float())
