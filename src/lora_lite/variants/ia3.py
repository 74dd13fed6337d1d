"""(IA)³. Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning", arXiv 2205.05638.

    ia3     (output gate):  y' = y ⊙ g = (x Wᵀ + b) ⊙ g          g: (d_out,)   bias scaled too, as peft
    ia3_ff  (input gate):   y' = (x ⊙ g) Wᵀ + b                  g: (d_in,)    pre-hook, bias NOT scaled

Init g = 1: both maps are exactly the identity, and g gets a non-zero gradient on step 1. variant="ia3"
routes targets matching variant_kwargs feedforward_names (regexes) / feedforward_roles to ia3_ff.

Merge (`ll.merge`): ia3: W_eff = diag(g) W and b_eff = g ⊙ b; ia3_ff: W_eff = W diag(g), bias unchanged.
Steering (`ll.scaled(model, c)`): g → 1 + c·(g − 1) (c = 0: the base model, c = 1: the adapter).
Checked against peft 0.21.2 `peft/tuners/ia3/layer.py` and `ia3/model.py`: no deviation in the math.

Notes: docs/variants/ia3.md.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from ..config import ROLES, ConfigError, LoraLiteConfig
from ..variant import ParamSpec, Variant, register

_FF_KWARGS = ("feedforward_names", "feedforward_roles")


def _str_list(cfg: LoraLiteConfig, key: str) -> list[str]:
    val = cfg.variant_kwargs.get(key, [])
    if isinstance(val, str):
        raise ConfigError(
            f"variant_kwargs[{key!r}] must be a list of strings, not the string {val!r} (write [{val!r}])"
        )
    if not isinstance(val, (list, tuple)) or not all(isinstance(v, str) for v in val):
        raise ConfigError(f"variant_kwargs[{key!r}] must be a list of strings, got {val!r}")
    return list(val)


def _no_dropout(cfg: LoraLiteConfig) -> None:
    if cfg.dropout != 0.0:
        raise ConfigError(
            f"variant {cfg.variant!r} has no adapter-input dropout (nor has peft's IA3); set dropout=0.0 "
            f"(got {cfg.dropout})"
        )


@register
class IA3(Variant):
    """Output gate y ⊙ g; routes feed-forward targets to `IA3FF`."""

    name = "ia3"
    kwargs = _FF_KWARGS
    peft_type = "IA3"

    @staticmethod
    def validate(cfg: LoraLiteConfig) -> None:
        _no_dropout(cfg)
        for pat in _str_list(cfg, "feedforward_names"):
            try:
                re.compile(pat)
            except re.error as e:
                raise ConfigError(f"ia3: feedforward_names pattern {pat!r} is not a valid regex: {e}") from None
        bad = [r for r in _str_list(cfg, "feedforward_roles") if r not in ROLES]
        if bad:
            raise ConfigError(f"ia3: unknown feedforward_roles {bad}; roles are {ROLES}")

    @staticmethod
    def check_plan(targets: list[tuple[str, str]], cfg: LoraLiteConfig) -> None:
        """Refuse a feedforward_names pattern that matches no target (a typo; peft raises too). Roles: not checked."""
        names = [n for n, _ in targets]
        for pat in cfg.variant_kwargs.get("feedforward_names", ()):
            if not any(re.search(pat, n) for n in names):
                raise ConfigError(
                    f"ia3: feedforward_names pattern {pat!r} matches none of the {len(names)} targeted layers "
                    f"(e.g. {names[:3]}); fix the pattern, or target the layer it is meant for"
                )

    @classmethod
    def route(cls, name: str, role: str, cfg: LoraLiteConfig) -> type[Variant]:
        kw = cfg.variant_kwargs
        if role in kw.get("feedforward_roles", ()) or any(re.search(p, name) for p in kw.get("feedforward_names", ())):
            return IA3FF
        return cls

    @staticmethod
    def param_specs(d_in: int, d_out: int, cfg: LoraLiteConfig) -> dict[str, ParamSpec]:
        return {"lora_g": ParamSpec((d_out,), init="ones")}

    @staticmethod
    def forward(layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y * layer.lora_g  # promotes to the wider dtype; the hook casts back to y.dtype (as peft)

    @staticmethod
    def merged_weight(
        layer: nn.Module, W: torch.Tensor, b: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """diag(g) W and g ⊙ b: the bias is gated too."""
        g = layer.lora_g.to(W.dtype)
        return g[:, None] * W, None if b is None else g * b

    @staticmethod
    def peft_tensors(layer: nn.Module) -> dict[str, torch.Tensor]:
        return {"ia3_l": layer.lora_g.reshape(-1, 1)}  # peft's (d_out, 1)

    @staticmethod
    def peft_config(cfg: LoraLiteConfig, layers: dict[str, nn.Module]) -> dict[str, Any]:
        ff = sorted(n for n, a in layers.items() if a._lora_lite.variant is IA3FF)
        return {"feedforward_modules": ff, "init_ia3_weights": True}


@register
class IA3FF(Variant):
    """Input gate x ⊙ g (pre-hook), peft's is_feedforward=True."""

    name = "ia3_ff"
    peft_type = "IA3"

    @staticmethod
    def validate(cfg: LoraLiteConfig) -> None:
        _no_dropout(cfg)
        if cfg.variant == "ia3_ff" and cfg.variant_kwargs:
            raise ConfigError(
                f"ia3_ff takes no variant_kwargs (got {sorted(cfg.variant_kwargs)}): it gates the input of every "
                "target. To gate some targets' outputs and others' inputs in one adapter use variant='ia3' with "
                "variant_kwargs={'feedforward_names': [...]} or {'feedforward_roles': [...]}"
            )

    @staticmethod
    def param_specs(d_in: int, d_out: int, cfg: LoraLiteConfig) -> dict[str, ParamSpec]:
        return {"lora_g": ParamSpec((d_in,), init="ones")}

    @staticmethod
    def forward_input(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return x * layer.lora_g

    @staticmethod
    def merged_weight(
        layer: nn.Module, W: torch.Tensor, b: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """W diag(g); bias unchanged."""
        return W * layer.lora_g.to(W.dtype), b

    @staticmethod
    def peft_tensors(layer: nn.Module) -> dict[str, torch.Tensor]:
        return {"ia3_l": layer.lora_g.reshape(1, -1)}  # peft's (1, d_in)

    peft_config = IA3.peft_config
