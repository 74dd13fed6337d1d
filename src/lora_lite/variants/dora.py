"""DoRA. Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv 2402.09353.

    V  = W + s·B A                     W: (d_out, d_in), A: (r, d_in), B: (d_out, r)
    g  = m / sg(‖V‖_row)               m: (d_out,), sg = stop-gradient (paper §4.3, peft)
    y' = b + g ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ)  the bias b is NOT scaled
       = y + (g − 1) ⊙ (y − b) + g ⊙ s·(drop(x) Aᵀ) Bᵀ   (as peft, on the base output y = x Wᵀ + b;
         with dropout active, (y − b) is recomputed as drop(x) Wᵀ, as peft)

‖V‖_row is computed in fp32 without forming V: cached ‖W‖²_row plus terms in W Aᵀ (`weight_norm`).
Init: A kaiming-uniform(a=√5), B = 0, m = ‖W‖_row (sqrt of the same cached ‖W‖²_row). Identity: with
B = 0 the forward's norm is bit-identical to m, so g == 1 exactly and y' == y bit for bit. Step 1:
m and B get non-zero gradients; A from step 2. Quantized bases: W dequantized; Conv1D: (d_out, d_in) view.

Merge (`ll.merge`): W_eff = (m / ‖V‖_row)[:, None] · V (the dense norm), bias unchanged.
Steering (`ll.scaled(model, c)`): y + c·(y' − y), i.e. W + c·(W_eff − W); c = 0 is the base model
(scaling only s·B A by c would leave the trained m in place at c = 0).

Checked against peft 0.21.2 `peft/tuners/lora/dora.py` and `peft/tuners/lora/variants.py`
(`DoraLinearVariant.forward`). Deviations: the norm formula (same value to rounding), computed in fp32
(peft: x's dtype), with ‖W‖²_row cached.

Notes: docs/variants/dora.md.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LoraLiteConfig
from ..target import dense_weight, is_conv1d, is_quantized, kind_of
from ..variant import ParamSpec, Variant, add_lowrank, dropout, for_cache, register, writable
from .lora import KINDS, nonzero_alpha, peft_lora_config, routed


def _x_Wt(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x Wᵀ without the bias, in x's dtype (W dense: bitsandbytes dequantized, an embedding's or a conv's view)."""
    if is_quantized(layer) or kind_of(layer) != "linear":
        return F.linear(x, dense_weight(layer, x.dtype))
    w = layer.weight.to(x.dtype)
    return x @ w if is_conv1d(layer) else F.linear(x, w)


def _norm_dtype(layer: nn.Module) -> torch.dtype:
    """fp32, or fp64 for fp64 adapters: the norm is never computed in half precision."""
    return torch.promote_types(layer.lora_A.dtype, torch.float32)


def _w_sq(layer: nn.Module) -> torch.Tensor:
    """Cached ‖W‖²_row ((d_out,), `_norm_dtype`), recomputed whenever W changed (docs/variants/dora.md)."""
    cache, w = layer._lora_lite.cache, layer.weight
    # Uncached under torch.compile and torch.func (no data pointers to key on): one pass over W.
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        W = dense_weight(layer, _norm_dtype(layer))
        return (W * W).sum(1)
    # Keyed on the tensor itself (weak ref), not just its address: a recomputed weight can reuse a freed one's.
    key = (w.data_ptr(), w._version, w.dtype, w.device, _norm_dtype(layer))
    ref = cache.get("w_sq_ref")
    if cache.get("w_sq_key") != key or ref is None or ref() is not w:
        with for_cache():
            W = dense_weight(layer, _norm_dtype(layer))
            cache["w_sq"], cache["w_sq_key"], cache["w_sq_ref"] = (W * W).sum(1), key, weakref.ref(w)
    return cache["w_sq"]


@torch.no_grad()
def weight_norm(layer: nn.Module) -> torch.Tensor:
    """‖W + s·B A‖_row in fp32 (fp64 for fp64 adapters), detached, without forming W + s·B A."""
    s, dt = layer._lora_lite.scale, _norm_dtype(layer)
    A, B = layer.lora_A.to(dt), layer.lora_B.to(dt)
    M = torch.addmm(_x_Wt(layer, A).T, B, A @ A.T, beta=2 * s, alpha=s * s)  # 2s·W Aᵀ + s²·B A Aᵀ, (d_out, r)
    n2 = _w_sq(layer) + torch.linalg.vecdot(B, M)  # ‖W‖² + rowsum(B ⊙ M): 7 small ops per call, not 15
    return n2.clamp_min(0).sqrt()


@register
class DoRA(Variant):
    name = "dora"
    b_tensors = ("lora_B", "lora_m")  # LoRA+: peft's lora_B, and its 1-D lora_magnitude_vector
    kwargs, peft_type, reads_weight = ("use_rslora",), "LORA", True
    kinds = KINDS  # embeddings and convolutions: lora_embedding.py, lora_conv.py
    route = classmethod(routed)

    @staticmethod
    def validate(cfg: LoraLiteConfig) -> None:
        nonzero_alpha(cfg)

    @staticmethod
    def param_specs(d_in: int, d_out: int, cfg: LoraLiteConfig) -> dict[str, ParamSpec]:
        return {
            "lora_A": ParamSpec((cfg.r, d_in), init="kaiming"),
            "lora_B": ParamSpec((d_out, cfg.r), init="zeros"),
            "lora_m": ParamSpec((d_out,), init="zeros"),  # set to ‖W‖_row in init
        }

    @staticmethod
    def init(layer: nn.Module, cfg: LoraLiteConfig) -> None:
        layer._lora_lite.cache.pop("w_sq_key", None)
        layer.lora_m.copy_(_w_sq(layer).sqrt())

    @staticmethod
    def forward(layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        s = layer._lora_lite.scale
        g = layer.lora_m / weight_norm(layer).to(x.dtype)  # (d_out,), gradient to m only
        xd = dropout(layer, x)
        h = F.linear(xd, layer.lora_A) * s  # s·(drop(x) Aᵀ), (…, r)
        if xd is x and y.dtype == x.dtype:  # no dropout: z = y + s·(x Aᵀ) Bᵀ = x Vᵀ + b, in place when allowed
            z = add_lowrank(y, h, layer.lora_B, inplace=writable(layer, y))
            if layer.bias is None:
                return z * g  # y' = g ⊙ z
            return torch.addcmul((1 - g) * layer.bias.to(x.dtype), z, g)  # y' = b + g ⊙ (z − b), one pass
        # Otherwise in the wider of y's and the adapter's dtype, rounded once at the end: y is never rounded
        # through a narrower adapter dtype, nor the update through a narrower base dtype.
        wide = torch.promote_types(y.dtype, x.dtype)
        if xd is x:  # no dropout: the base part is y - b
            b = layer.bias
            base = y.to(wide) if b is None else y.to(wide) - b.to(wide)
        else:  # dropout active: peft recomputes the base part on the dropped input
            base = _x_Wt(layer, xd).to(wide)
        # y' = y + (g − 1) ⊙ base + h (g ⊙ B)ᵀ: g ⊙ (h Bᵀ) with g folded into B's rows, one fused addmm
        return add_lowrank(y.to(wide) + (g.to(wide) - 1) * base, h, g[:, None] * layer.lora_B).to(y.dtype)

    @staticmethod
    def merged_weight(
        layer: nn.Module, W: torch.Tensor, b: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """g ⊙ (W + s·B A) and b_base + g ⊙ (b − b_base), g = m / ‖W_base + s·B A‖_row (the dense norm).

        W, b are the layer as the adapters below left it (for a lone DoRA: W_base, b_base, and the bias is
        unchanged), since the forward gates the output those produce and takes its norm from the base weight.
        """
        dt = W.dtype
        sBA = layer._lora_lite.scale * (layer.lora_B.to(dt) @ layer.lora_A.to(dt))
        g = layer.lora_m.to(dt) / (dense_weight(layer, dt) + sBA).norm(dim=1)
        if b is not None and layer.bias is not None:
            b = torch.addcmul(layer.bias.to(dt), g, b - layer.bias.to(dt))
        return g[:, None] * (W + sBA), b

    @staticmethod
    def peft_tensors(layer: nn.Module) -> dict[str, torch.Tensor]:
        return {"lora_A.weight": layer.lora_A, "lora_B.weight": layer.lora_B, "lora_magnitude_vector": layer.lora_m}

    @staticmethod
    def peft_config(cfg: LoraLiteConfig, layers: dict[str, nn.Module]) -> dict[str, Any]:
        return peft_lora_config(cfg, cfg.r, cfg.alpha, use_dora=True)
