"""RoAd. Liao et al. 2024, "2D Rotary Adaptation", arXiv 2409.00119.

    y' = a ⊙ y + b ⊙ rot(y)          y: (…, d_out); a, b: (d_out,); per group of g outputs (group_size),
    rot(y)[i] = −y[i + g/2],  rot(y)[i + g/2] = y[i]   (i < g/2: element i pairs with element i + g/2)
    road_1: a = α cos θ, b = α sin θ, one (θ, α) per pair        θ, α: (d_out/2,)  a true 2-D rotation·α
    road_2: one (θ, α) per output                                θ, α: (d_out,)
    road_4: a = α₁ cos θ₁, b = α₂ sin θ₂                         θ, α: (2·d_out,)

Init θ = 0, α = 1: a = 1, b = 0, so y' = y bit for bit; θ and α get non-zero gradients on step 1.
group_size (default 64, as peft) must be even and divide every target's d_out (else a ConfigError
naming the layer). The bias is rotated too (RoAd acts on the layer's output).

Merge (`ll.merge`): W' = R W, b' = R b with R = diag(a) + b ⊙ rot (rows): a ⊙ W + b ⊙ rot(W), no dense R.
Steering (`ll.scaled(model, c)`): θ → c·θ, α → 1 + c·(α − 1). c = 0 is the base model, c = 1 the adapter;
for road_1 with α = 1 (a pure rotation) c is an exact fractional rotation: R(c₁θ)R(c₂θ) = R((c₁+c₂)θ),
c = −1 the inverse R(θ)⁻¹.

Checked against peft 0.21.2 `peft/tuners/road/layer.py` (`_prepare_cols`, `_apply_road`,
`_get_delta_weight`). Deviations: computed in the wider of y's and the adapter's dtype (peft: the adapter's);
also adapts GPT-2's Conv1D (peft: nn.Linear only, so export_peft refuses such an adapter).

Notes: docs/variants/road.md.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config import ConfigError, LoraLiteConfig
from ..target import is_conv1d
from ..variant import ParamSpec, Variant, register

_SIZE = {"road_1": 0.5, "road_2": 1, "road_4": 2}  # parameters per output feature, each of θ and α


def _opts(cfg: LoraLiteConfig) -> tuple[str, int]:
    return cfg.variant_kwargs.get("variant", "road_1"), cfg.variant_kwargs.get("group_size", 64)


def _rot(t: torch.Tensor, g: int) -> torch.Tensor:
    """rot along the last dim, by groups of g: element i < g/2 gets −t[i + g/2], element i + g/2 gets t[i]."""
    lo, hi = t.unflatten(-1, (-1, 2, g // 2)).unbind(-2)
    return torch.stack((-hi, lo), -2).flatten(-3)


def _cols(layer: nn.Module, c: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b), each (d_out,), from θ and α (steered by c: θ → cθ, α → 1 + c(α − 1))."""
    kind, g = _opts(layer._lora_lite.cfg)
    th, al = layer.lora_theta, layer.lora_alpha
    if c != 1.0:
        th, al = th * c, 1 + c * (al - 1)
    if kind == "road_1":  # one (θ, α) per pair: repeat each group's g/2 values for both halves
        th, al = (t.reshape(-1, 1, g // 2).expand(-1, 2, -1).reshape(-1) for t in (th, al))
        return al * th.cos(), al * th.sin()
    if kind == "road_2":
        return al * th.cos(), al * th.sin()
    th, al = th.reshape(-1, 2, g), al.reshape(-1, 2, g)  # road_4: per group, g for a then g for b
    return (al[:, 0] * th[:, 0].cos()).reshape(-1), (al[:, 1] * th[:, 1].sin()).reshape(-1)


def _apply(layer: nn.Module, y: torch.Tensor, c: float = 1.0) -> torch.Tensor:
    """In the wider of y's and the adapter's dtype (peft: the adapter's), so identity at init is exact in any mix."""
    a, b = _cols(layer, c)
    y = y.to(torch.promote_types(y.dtype, a.dtype))
    return torch.addcmul(y * a, _rot(y, _opts(layer._lora_lite.cfg)[1]), b)


@register
class RoAd(Variant):
    name = "road"
    kwargs = ("variant", "group_size")
    peft_type = "ROAD"

    @staticmethod
    def validate(cfg: LoraLiteConfig) -> None:
        kind, g = _opts(cfg)
        if kind not in _SIZE:
            raise ConfigError(f"road: variant_kwargs['variant'] must be one of {sorted(_SIZE)}, got {kind!r}")
        if isinstance(g, bool) or not isinstance(g, int) or g <= 0 or g % 2:
            raise ConfigError(f"road: variant_kwargs['group_size'] must be a positive even integer, got {g!r}")
        if cfg.dropout != 0.0:
            raise ConfigError(
                f"road has no adapter-input dropout (nor has peft's RoAd); set dropout=0.0 (got {cfg.dropout})"
            )

    @staticmethod
    def param_specs(d_in: int, d_out: int, cfg: LoraLiteConfig) -> dict[str, ParamSpec]:
        kind, g = _opts(cfg)
        if d_out % g:
            fit = [n for n in range(2, min(d_out, g) + 1, 2) if d_out % n == 0]
            hint = f"n even and dividing every target's out_features (e.g. {fit[-1]}), or" if fit else "no even n fits:"
            raise ConfigError(
                f"road: group_size {g} does not divide out_features {d_out}; pass variant_kwargs={{'group_size': n}} "
                f"with {hint} exclude this layer"
            )
        n = int(d_out * _SIZE[kind])
        return {"lora_theta": ParamSpec((n,), init="zeros"), "lora_alpha": ParamSpec((n,), init="ones")}

    @staticmethod
    def forward(layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _apply(layer, y)

    @classmethod
    def scaled_forward(cls, layer: nn.Module, x: torch.Tensor, y: torch.Tensor, c: float) -> torch.Tensor:
        return _apply(layer, y, c)

    @staticmethod
    def merged_weight(
        layer: nn.Module, W: torch.Tensor, b: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """R W and R b: a ⊙ W + b ⊙ rot(W) along the output (row) axis."""
        g = _opts(layer._lora_lite.cfg)[1]
        a, s = (t.to(W.dtype) for t in _cols(layer))
        W2 = a[:, None] * W + s[:, None] * _rot(W.T, g).T
        return W2, None if b is None else a * b + s * _rot(b, g)

    @staticmethod
    def peft_tensors(layer: nn.Module) -> dict[str, torch.Tensor]:
        return {"road_theta": layer.lora_theta, "road_alpha": layer.lora_alpha}

    @staticmethod
    def peft_config(cfg: LoraLiteConfig, layers: dict[str, nn.Module]) -> dict[str, Any]:
        conv = [n for n, a in layers.items() if is_conv1d(a)]
        if conv:
            raise ValueError(
                f"export_peft: peft's RoAd adapts nn.Linear only, and {conv[0]!r} is a transformers Conv1D; "
                "use ll.merge / ll.merged_state_dict (dense weights) or ll.save instead"
            )
        kind, g = _opts(cfg)
        return {"variant": kind, "group_size": g, "init_weights": True}

    @staticmethod
    def peft_import(pc: dict, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, dict]]:
        if pc.get("modules_to_save"):
            raise ValueError(f"peft RoAd option modules_to_save={pc['modules_to_save']} is not supported")
        per: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            name, _, suf = key.rpartition(".")
            if suf not in ("road_theta", "road_alpha"):
                raise ValueError(f"tensor {key!r} is not a RoAd tensor (road_theta, road_alpha)")
            per.setdefault(name, {})[suf.replace("road_", "lora_")] = t
        kw = {"variant": pc.get("variant", "road_1"), "group_size": int(pc.get("group_size", 64))}
        return {"variant": "road", "variant_kwargs": kw}, per
