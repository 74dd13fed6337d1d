"""VeRA. Kopiczko et al. 2024, "VeRA: Vector-based Random Matrix Adaptation", arXiv 2310.11454.

    y' = y + ((drop(x) Aᵀ) ⊙ λ_d) (λ_b ⊙ B)ᵀ      A: (r, d_in), B: (d_out, r), λ_d: (r,), λ_b: (d_out,)
    ΔW = diag(λ_b) B diag(λ_d) A

A and B are frozen random projections shared by every layer: one A_full (r, max d_in) and one B_full
(max d_out, r) drawn from `torch.Generator().manual_seed(projection_prng_key)` (A_full first, then B_full;
kaiming-uniform with gain √2, bound √6/√fan_in), max over the targeted layers, and each layer uses
A = A_full[:, :d_in], B = B_full[:d_out]: peft's tensors, bit for bit, for the same key and targets.
Each layer keeps its slices as frozen buffers `lora_vera_A`, `lora_vera_B` (saved with the adapter; an
import from peft re-derives them from the key and checks them against the file's).
Init (peft's `reset_vera_parameters`): λ_d = d_initial (default 0.1), λ_b = 0. Identity at init: λ_b = 0
makes the update exactly zero, y' == y bit for bit; step 1: only λ_b gets a gradient. No alpha (ignored).
The forward is low rank: x Aᵀ (r per token), never ΔW.

Merge (`ll.merge`): W_eff = W + (λ_b ⊙ B)(λ_d ⊙ A), bias unchanged.
Steering (`ll.scaled(model, c)`): y + c·x ΔWᵀ (c = 0: the base model, c = 1: the adapter).
Checked against peft 0.21.2 `peft/tuners/vera/layer.py` (`Linear.forward`, `get_delta_weight`) and
`vera/model.py` (`_find_dim`, `_init_vera_A_vera_B`, `_kaiming_init`).

Notes: docs/variants/vera.md.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, LoraLiteConfig
from ..variant import ParamSpec, Variant, add_lowrank, dropout, register, writable

_UNSUPPORTED = ("modules_to_save", "layers_to_transform", "rank_pattern", "alpha_pattern")


def projections(key: int, r: int, max_in: int, max_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A_full (r, max_in) and B_full (max_out, r), fp32 on CPU, as peft draws them from the key."""
    g = torch.Generator(device="cpu").manual_seed(key)
    out = []
    for shape in ((r, max_in), (max_out, r)):
        bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(shape[1]))  # kaiming-uniform, gain √2, fan_in
        out.append(torch.empty(shape).uniform_(-bound, bound, generator=g))
    return out[0], out[1]


def _group_init(model: nn.Module, targets: list, cfg: LoraLiteConfig, calibration_data: Any = None) -> None:
    """Draw the shared projections, sized to the largest targeted layer, and give each layer its slices."""
    layers = [a for _, a, _ in targets]
    max_in = max(a.lora_vera_A.shape[1] for a in layers)
    max_out = max(a.lora_vera_B.shape[0] for a in layers)
    A, B = projections(cfg.variant_kwargs.get("projection_prng_key", 0), cfg.r, max_in, max_out)
    for a in layers:
        a.lora_vera_A.copy_(A[:, : a.lora_vera_A.shape[1]])
        a.lora_vera_B.copy_(B[: a.lora_vera_B.shape[0]])


@register
class VeRA(Variant):
    name = "vera"
    kwargs = ("projection_prng_key", "d_initial", "save_projection")
    peft_type = "VERA"
    b_tensors = ("lora_lambda_b", "lora_lambda_d")  # peft's LoRA+ puts every 1-D tensor in its B group
    group_init = staticmethod(_group_init)

    @staticmethod
    def validate(cfg: LoraLiteConfig) -> None:
        kw = cfg.variant_kwargs
        key, d0 = kw.get("projection_prng_key", 0), kw.get("d_initial", 0.1)
        if isinstance(key, bool) or not isinstance(key, int) or key < 0:
            raise ConfigError(f"vera: variant_kwargs['projection_prng_key'] must be an int >= 0, got {key!r}")
        if isinstance(d0, bool) or not isinstance(d0, (int, float)) or not math.isfinite(d0) or d0 == 0:
            raise ConfigError(
                f"vera: variant_kwargs['d_initial'] must be a finite non-zero number (λ_d = 0 would leave λ_b's "
                f"gradient zero forever), got {d0!r}"
            )
        if not isinstance(kw.get("save_projection", True), bool):
            raise ConfigError(f"vera: variant_kwargs['save_projection'] must be a bool, got {kw['save_projection']!r}")

    @staticmethod
    def param_specs(d_in: int, d_out: int, cfg: LoraLiteConfig) -> dict[str, ParamSpec]:
        d0 = float(cfg.variant_kwargs.get("d_initial", 0.1))
        return {
            "lora_lambda_d": ParamSpec((cfg.r,), init=lambda t: t.fill_(d0)),
            "lora_lambda_b": ParamSpec((d_out,), init="zeros"),  # the update is 0 at init
            "lora_vera_A": ParamSpec((cfg.r, d_in), trainable=False, buffer=True),  # filled by group_init
            "lora_vera_B": ParamSpec((d_out, cfg.r), trainable=False, buffer=True),
        }

    @staticmethod
    def forward(layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = F.linear(dropout(layer, x), layer.lora_vera_A) * layer.lora_lambda_d  # (…, r)
        return add_lowrank(y, h, layer.lora_lambda_b[:, None] * layer.lora_vera_B, inplace=writable(layer, y))

    @staticmethod
    def merged_weight(
        layer: nn.Module, W: torch.Tensor, b: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """W + (λ_b ⊙ B)(λ_d ⊙ A); bias unchanged."""
        dt = W.dtype
        B = layer.lora_lambda_b.to(dt)[:, None] * layer.lora_vera_B.to(dt)
        return W + B @ (layer.lora_lambda_d.to(dt)[:, None] * layer.lora_vera_A.to(dt)), b

    @staticmethod
    def peft_tensors(layer: nn.Module) -> dict[str, torch.Tensor]:
        return {"vera_lambda_b": layer.lora_lambda_b, "vera_lambda_d": layer.lora_lambda_d}

    @staticmethod
    def peft_shared_tensors(layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
        """The full projections (the widest layer's slice is all of A_full), unless save_projection=False."""
        if not next(iter(layers.values()))._lora_lite.cfg.variant_kwargs.get("save_projection", True):
            return {}
        A = max((a.lora_vera_A for a in layers.values()), key=lambda t: t.shape[1])
        B = max((a.lora_vera_B for a in layers.values()), key=lambda t: t.shape[0])
        return {"vera_A": A, "vera_B": B}

    @staticmethod
    def peft_config(cfg: LoraLiteConfig, layers: dict[str, nn.Module]) -> dict[str, Any]:
        kw = {"projection_prng_key": 0, "save_projection": True, "d_initial": 0.1, **cfg.variant_kwargs}
        return {"r": cfg.r, "vera_dropout": cfg.dropout, "bias": "none", "init_weights": True, **kw}

    @staticmethod
    def peft_import(pc: dict, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, dict]]:
        bad = [k for k in _UNSUPPORTED if pc.get(k)] + (["bias"] if pc.get("bias", "none") != "none" else [])
        if bad:
            raise ValueError(f"peft VeRA option(s) {bad} = {[pc[k] for k in bad]} have no lora-lite equivalent")
        r, key, save = int(pc["r"]), int(pc.get("projection_prng_key", 0)), bool(pc.get("save_projection", True))
        kw = {"projection_prng_key": key, "d_initial": float(pc.get("d_initial", 0.1)), "save_projection": save}
        fields = dict(variant="vera", r=r, dropout=float(pc.get("vera_dropout", 0.0)), variant_kwargs=kw)
        shared = {k: tensors.pop(k) for k in ("vera_A", "vera_B") if k in tensors}
        if len(shared) == 2:  # saved projections: ours are re-derived from the key, so they must be the same
            A, B = shared["vera_A"], shared["vera_B"]
            A2, B2 = projections(key, r, A.shape[1], B.shape[0])
            if A.shape[0] != r or not (torch.equal(A2.to(A.dtype), A) and torch.equal(B2.to(B.dtype), B)):
                raise ValueError(
                    f"vera_A / vera_B in the file are not the projections projection_prng_key={key} gives (r={r}); "
                    "lora-lite re-derives them from the key and cannot load other projections"
                )
        per: dict[str, dict] = {}
        for k, t in tensors.items():
            module, _, tname = k.rpartition(".")
            if tname not in ("vera_lambda_b", "vera_lambda_d"):
                raise ValueError(
                    f"tensor {k!r} is not a peft VeRA tensor (vera_lambda_b, vera_lambda_d, vera_A, vera_B)"
                )
            per.setdefault(module, {})["lora_" + tname.removeprefix("vera_")] = t
        return fields, per
