"""EVA. Paischer et al. 2024, "One Initialization to Rule them All: Fine-tuning via Explained Variance
Adaptation", arXiv 2410.07170.

LoRA whose A is initialised from data: the top-r principal directions of each target's inputs.

    y' = y + s · (drop(x) Aᵀ) Bᵀ          exactly lora's forward (we call `LoRA.forward`)
    X  = the layer's inputs over the calibration data, one row per non-padding token: (n, d_in)
    Xc = X − 1μᵀ (μ: mean row) = U Σ Vᵀ  →  A = V_rᵀ (top-r, largest first): (r, d_in), B = 0: (d_out, r)
    whiten=True:  A_i = V_i / √σ_i

Computed exactly in one streaming pass: float64 S = XᵀX, Σx and n per target (d_in² memory), then
eigh of Xcᵀ Xc = S − (Σx)(Σx)ᵀ / n; summed over ranks under torch.distributed. Padding (attention_mask)
and label_mask_value labels are masked out, as peft.

Identity at init: B = 0 makes the update exactly zero; A is trainable (as peft): B gets a gradient on
step 1, A from step 2. `ll.load` needs no calibration data: A and B come from the file.

Merge, steering and peft export: exactly lora's (W + s·B A; `ll.scaled` scales the update by c; a plain
peft LoRA).

Checked against peft 0.21.2 `peft/tuners/lora/eva.py` and `peft/utils/incremental_pca.py`: peft's
randomized IncrementalPCA approximates the subspace we compute exactly; uniform rank = peft's rho=1.0.

Notes: docs/variants/eva.md.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config import ConfigError, LoraLiteConfig
from ..variant import ParamSpec, Variant, register
from ._calibration import input_stats
from .lora import LoRA, nonzero_alpha

_KWARGS = {
    "use_rslora": bool,
    "whiten": bool,
    "use_label_mask": bool,
    "label_mask_value": int,
    "show_progress_bar": bool,
}


@register
class EVA(Variant):
    name = "eva"
    b_tensors = ("lora_B",)  # LoRA+: peft's lora_B
    kwargs = tuple(_KWARGS)

    @staticmethod
    def validate(cfg: LoraLiteConfig) -> None:
        nonzero_alpha(cfg)
        for k, v in cfg.variant_kwargs.items():  # (unknown keys: the config refuses them, `kwargs`)
            if isinstance(v, bool) is not (_KWARGS[k] is bool) or not isinstance(v, _KWARGS[k]):
                raise ConfigError(f"eva: variant_kwargs[{k!r}] must be a {_KWARGS[k].__name__}, got {v!r}")

    @staticmethod
    def param_specs(d_in: int, d_out: int, cfg: LoraLiteConfig) -> dict[str, ParamSpec]:
        return {
            "lora_A": ParamSpec((cfg.r, d_in), init="zeros"),  # set by group_init (attach) or the file (load)
            "lora_B": ParamSpec((d_out, cfg.r), init="zeros"),
        }

    forward = staticmethod(LoRA.forward)
    merged_weight = staticmethod(LoRA.merged_weight)
    delta_factors = staticmethod(LoRA.delta_factors)
    peft_type, peft_tensors, peft_config = "LORA", staticmethod(LoRA.peft_tensors), staticmethod(LoRA.peft_config)

    @staticmethod
    def group_init(
        model: nn.Module, targets: list[tuple[str, nn.Module, str]], cfg: LoraLiteConfig, calibration_data: Any
    ) -> None:
        """Run `calibration_data` through `model` (eval mode, no grad, temporary hooks); set A = top-r PCs."""
        if calibration_data is None:
            raise ConfigError(
                "eva needs calibration_data=... at attach: a DataLoader or iterable of batches (tensors, or dicts "
                "with input_ids and optionally attention_mask/labels). ll.load needs none."
            )
        kw = cfg.variant_kwargs
        r = cfg.r
        for name, layer, _ in targets:
            if r > layer.lora_A.shape[1]:
                raise ConfigError(f"{name}: eva rank r={r} exceeds the layer's d_in={layer.lora_A.shape[1]}")
        stats, n_batches = input_stats(model, targets, calibration_data, kw)
        with torch.no_grad():
            for name, layer, _ in targets:
                st = stats[name]
                if st.n < r + 1:  # centring uses one degree of freedom: n rows span at most n - 1 directions
                    raise ConfigError(
                        f"{name}: eva saw only {st.n} non-padding input rows (tokens) in {n_batches} calibration "
                        f"batches but needs at least r + 1 = {r + 1} for a rank-{r} PCA. Pass more calibration data."
                    )
                v, sigma = st.top(r)
                if kw.get("whiten", False):
                    # < 1e-6 of the top variance is rounding noise: whitening it would scale its row of A > 1000x
                    if bool((sigma <= 1e-6 * sigma[0].clamp_min(1e-300)).any()):
                        raise ConfigError(
                            f"{name}: whiten=True but this layer's calibration inputs span fewer than r={r} directions "
                            f"(variances {sigma.tolist()}: below 1e-6 of the largest, whitening would scale those rows "
                            "of A by > 1000x); use more varied data, a smaller r, or whiten=False"
                        )
                    v = v / sigma.sqrt().unsqueeze(1)
                layer.lora_A.copy_(v)
                layer.lora_B.zero_()
