"""AdaLoRA. Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning", arXiv 2303.10512.

    y' = y + s · (drop(x) Aᵀ ⊙ Eᵀ) Bᵀ    A: (r, d_in), E: (r, 1), B: (d_out, r),  r = init_r (cfg.r)
    s  = alpha / (r + 1e-5)              (alpha ≤ 0: r / (r + 1e-5)), as peft's scaling / ranknum

Init (peft's): E = 0, A and B ~ N(0, 0.02). Identity at init: E = 0 makes the update exactly zero;
E gets a non-zero gradient on step 1, A and B from step 2.
Rank allocation: `ll.on_step(model, step)` after backward (and optimizer.step), before zero_grad, as peft's
`update_and_allocate`: cubic budget r·n → target_r·n over tinit..total_step − tfinal, the lowest-sensitivity
triplets get E_i = 0 (adalora_alloc.py); the kept ranks are the saved buffer `lora_mask` (1/0).
`ll.regularizer(model)`: orth_reg_weight · mean over A, B of ‖A Aᵀ − I‖_F, ‖BᵀB − I‖_F (peft adds it to
`outputs.loss` inside its forward when labels are given; here the user adds it to the loss).

Merge (`ll.merge`): W_eff = W + s·B (A ⊙ E), bias unchanged.
Steering (`ll.scaled(model, c)`): the default y + c·(y' − y), the update scaled by c (exact: it is additive).
Export writes only the kept rows and `rank_pattern` (as peft's save_pretrained); import pads them back.

Checked against peft 0.21.2 `peft/tuners/adalora/layer.py` (`SVDLinear`, `RankAllocator`) and `model.py`
(`update_and_allocate`, `forward`'s orthogonal regulariser, the rank_pattern resize on save/load).

Notes: docs/variants/adalora.md.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, LoraLiteConfig
from ..variant import ParamSpec, Variant, add_lowrank, dropout, register, writable
from .adalora_alloc import DEFAULTS, allocate, opt

_UNSUPPORTED = "modules_to_save lora_bias use_dora layer_replication target_parameters trainable_token_indices use_qalora alora_invocation_tokens use_bdlora arrow_config".split()


def _normal(t: torch.Tensor) -> None:
    nn.init.normal_(t, mean=0.0, std=0.02)


def scale(cfg: LoraLiteConfig) -> float:
    return (cfg.alpha if cfg.alpha > 0 else float(cfg.r)) / (cfg.r + 1e-5)


@register
class AdaLoRA(Variant):
    name = "adalora"
    kwargs = tuple(DEFAULTS)
    peft_type = "ADALORA"
    b_tensors = ("lora_B",)

    @staticmethod
    def validate(cfg: LoraLiteConfig) -> None:
        kw = {k: opt(cfg, k) for k in DEFAULTS}
        for k, lo in {"target_r": 0, "tinit": 0, "tfinal": 0, "deltaT": 1, "total_step": 1}.items():
            if (k != "total_step" or kw[k] is not None) and (
                isinstance(kw[k], bool) or not isinstance(kw[k], int) or kw[k] < lo
            ):
                raise ConfigError(f"adalora: variant_kwargs[{k!r}] must be an integer >= {lo}, got {kw[k]!r}")
        for k in ("beta1", "beta2"):
            if isinstance(kw[k], bool) or not isinstance(kw[k], (int, float)) or not 0 < kw[k] < 1:
                raise ConfigError(f"adalora: variant_kwargs[{k!r}] must be in (0, 1), got {kw[k]!r}")
        w = kw["orth_reg_weight"]
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0:
            raise ConfigError(f"adalora: variant_kwargs['orth_reg_weight'] must be >= 0, got {w!r}")
        if kw["target_r"] > cfg.r:
            raise ConfigError(f"adalora: target_r={kw['target_r']} exceeds r={cfg.r} (r is peft's init_r); lower it")
        if kw["total_step"] is not None and kw["tinit"] >= kw["total_step"] - kw["tfinal"]:
            raise ConfigError(
                f"adalora: tinit={kw['tinit']} >= total_step - tfinal = {kw['total_step'] - kw['tfinal']}"
                " leaves no budgeting phase; decrease tinit/tfinal or increase total_step"
            )

    @staticmethod
    def param_specs(d_in: int, d_out: int, cfg: LoraLiteConfig) -> dict[str, ParamSpec]:
        return {
            "lora_A": ParamSpec((cfg.r, d_in), init=_normal),
            "lora_E": ParamSpec((cfg.r, 1), init="zeros"),
            "lora_B": ParamSpec((d_out, cfg.r), init=_normal),
            "lora_mask": ParamSpec((cfg.r,), init="ones", trainable=False, buffer=True),  # the kept ranks (1/0)
        }

    @staticmethod
    def forward(layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = F.linear(dropout(layer, x), layer.lora_A) * (layer.lora_E.view(-1) * scale(layer._lora_lite.cfg))
        return add_lowrank(y, h, layer.lora_B, inplace=writable(layer, y))  # y + h Bᵀ, one fused addmm

    @staticmethod
    def merged_weight(
        layer: nn.Module, W: torch.Tensor, b: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """W + s·B (A ⊙ E); bias unchanged."""
        A, E, B = (getattr(layer, p).to(W.dtype) for p in ("lora_A", "lora_E", "lora_B"))
        return W + scale(layer._lora_lite.cfg) * (B @ (A * E)), b

    on_step = staticmethod(allocate)  # peft's AdaLoraModel.update_and_allocate(step): adalora_alloc.py

    @staticmethod
    def regularizer(layers: dict[str, nn.Module], cfg: LoraLiteConfig) -> torch.Tensor:
        """orth_reg_weight · mean over every A and B of ‖A Aᵀ − I‖_F and ‖BᵀB − I‖_F (peft's, model.py forward)."""
        terms = []
        for a in layers.values():
            for cov in (a.lora_A @ a.lora_A.T, a.lora_B.T @ a.lora_B):
                terms.append(
                    torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device))
                )
        return opt(cfg, "orth_reg_weight") * (torch.stack(terms).sum() / len(terms))

    @staticmethod
    def peft_tensors(layer: nn.Module) -> dict[str, torch.Tensor]:
        keep = layer.lora_mask.bool()  # only the kept ranks, as peft's save_pretrained after allocation
        return {"lora_A": layer.lora_A[keep], "lora_E": layer.lora_E[keep], "lora_B": layer.lora_B[:, keep]}

    @staticmethod
    def peft_config(cfg: LoraLiteConfig, layers: dict[str, nn.Module]) -> dict[str, Any]:
        masks = {f"{n}.lora_E": a.lora_mask.bool().tolist() for n, a in layers.items()}
        pattern = None if all(all(m) for m in masks.values()) else masks
        kw = {k: opt(cfg, k) for k in DEFAULTS}
        return dict(kw, init_r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, rank_pattern=pattern, bias="none")

    @staticmethod
    def peft_import(pc: dict, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, dict]]:
        bad = [k for k in _UNSUPPORTED if pc.get(k)] + (["bias"] if pc.get("bias", "none") != "none" else [])
        if bad:
            raise ValueError(f"peft AdaLoRA option(s) {bad} = {[pc[k] for k in bad]} have no lora-lite equivalent")
        r = int(pc["init_r"])
        pattern = {k.partition(".lora_E")[0]: v for k, v in (pc.get("rank_pattern") or {}).items()}
        per: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            name, _, suf = key.rpartition(".")
            if suf not in ("lora_A", "lora_E", "lora_B"):
                raise ValueError(f"tensor {key!r} is not an AdaLoRA tensor (lora_A, lora_E, lora_B)")
            per.setdefault(name, {})[suf] = t
        for name, ts in per.items():
            keep = torch.tensor(pattern.get(name, [True] * r), dtype=torch.bool)
            if len(keep) != r or ts["lora_A"].shape[0] != int(keep.sum()):
                raise ValueError(
                    f"{name}: lora_A has {ts['lora_A'].shape[0]} rows; init_r={r} and rank_pattern "
                    f"keep {int(keep.sum())} of {len(keep)}"
                )
            A, E, B = ts["lora_A"], ts["lora_E"], ts["lora_B"]
            ts["lora_A"] = A.new_zeros(r, A.shape[1]).index_copy_(0, keep.nonzero()[:, 0], A)
            ts["lora_E"] = E.new_zeros(r, 1).index_copy_(0, keep.nonzero()[:, 0], E)
            ts["lora_B"] = B.new_zeros(B.shape[0], r).index_copy_(1, keep.nonzero()[:, 0], B)
            ts["lora_mask"] = keep.to(A.dtype)
        kw = {k: pc.get(k, v) for k, v in DEFAULTS.items()}
        fields = dict(variant="adalora", r=r, alpha=float(pc.get("lora_alpha", 8)), variant_kwargs=kw)
        return {**fields, "dropout": float(pc.get("lora_dropout", 0.0))}, per
