"""LoRA and DoRA on `nn.Embedding` (variant="lora" / "dora" route an embedding target here).

An embedding is the linear map of one-hot ids with W = Eᵀ (d, vocab), so the tensors have lora's shapes:

    y' = y + s·es · A[:, ids]ᵀ Bᵀ            A: (r, vocab) (peft's lora_embedding_A), B: (d, r) (lora_embedding_B)
    dora: y' = g ⊙ (y + s·es · A[:, ids]ᵀ Bᵀ),   g = m / sg(‖Eᵀ + s·B A‖_row), m: (d,) (one norm per embedding
          dimension, over the vocabulary, as peft)

es: the layer's `embed_scale` (Gemma's scaled embeddings), else 1, as peft. A[:, ids]ᵀ is a row gather of Aᵀ
(F.embedding with the layer's padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse, as peft), then one
(…, r) × (r, d) product: the (vocab × d) ΔW is never formed. No adapter dropout (peft's embedding has none).

Init (peft): A = 0, B ~ N(0, 1): the update is exactly zero; A gets a gradient on step 1 (B ≠ 0). The
padding_idx column of A gets no gradient, so the padding token's update stays zero. dora: m = ‖Eᵀ‖_row, g == 1.
Merge: lora's and dora's, on the (d, vocab) view: E' = E + s·(B A)ᵀ; dora E' = (g ⊙ (Eᵀ + s·B A))ᵀ.
Steering (`ll.scaled`): as lora / dora.

Checked against peft 0.21.2 `peft/tuners/lora/layer.py` (`Embedding`: update_layer, reset_lora_parameters,
_embed, forward, get_delta_weight), `lora/dora.py` (`DoraEmbeddingLayer`), `lora/variants.py`
(`DoraEmbeddingVariant`). Notes: docs/targeting.md (embeddings and convolutions).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LoraLiteConfig
from ..variant import FORMS, ParamSpec, add_lowrank, writable
from .dora import DoRA, weight_norm
from .lora import LoRA


def _h(layer: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """s·es · A[:, ids]ᵀ, (…, r): Aᵀ's rows gathered as the layer gathers E's."""
    e = layer.base_layer
    h = F.embedding(ids, layer.lora_A.t(), e.padding_idx, e.max_norm, e.norm_type, e.scale_grad_by_freq, e.sparse)
    es = getattr(e, "embed_scale", None)
    if isinstance(es, torch.Tensor) and es.numel() == 1:
        return h * (layer._lora_lite.scale * es.to(h.dtype))
    return h * (layer._lora_lite.scale * (es if isinstance(es, (int, float)) else 1.0))


def _specs(d_in: int, d_out: int, cfg: LoraLiteConfig) -> dict[str, ParamSpec]:
    return {"lora_A": ParamSpec((cfg.r, d_in), init="zeros"), "lora_B": ParamSpec((d_out, cfg.r), init=nn.init.normal_)}


class LoRAEmbedding(LoRA):
    """lora on an nn.Embedding: y + s·es · A[:, ids]ᵀ Bᵀ."""

    @staticmethod
    def param_specs(d_in: int, d_out: int, cfg: LoraLiteConfig) -> dict[str, ParamSpec]:
        return _specs(d_in, d_out, cfg)

    @staticmethod
    def forward(layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return add_lowrank(y, _h(layer, x), layer.lora_B, inplace=writable(layer, y))

    @staticmethod
    def peft_tensors(layer: nn.Module) -> dict[str, torch.Tensor]:
        return {"lora_embedding_A": layer.lora_A, "lora_embedding_B": layer.lora_B}


class DoRAEmbedding(DoRA):
    """dora on an nn.Embedding: g ⊙ (y + s·es · A[:, ids]ᵀ Bᵀ), g per embedding dimension."""

    @staticmethod
    def param_specs(d_in: int, d_out: int, cfg: LoraLiteConfig) -> dict[str, ParamSpec]:
        return {**_specs(d_in, d_out, cfg), "lora_m": ParamSpec((d_out,), init="zeros")}  # m: set in init

    @staticmethod
    def forward(layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = _h(layer, x)
        g = layer.lora_m / weight_norm(layer).to(h.dtype)  # (d,), gradient to m only
        return add_lowrank(y, h, layer.lora_B, inplace=writable(layer, y)) * g

    @staticmethod
    def peft_tensors(layer: nn.Module) -> dict[str, torch.Tensor]:
        return {**LoRAEmbedding.peft_tensors(layer), "lora_magnitude_vector": layer.lora_m}


FORMS.update({("embedding", "lora"): LoRAEmbedding, ("embedding", "dora"): DoRAEmbedding})
