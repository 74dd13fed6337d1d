"""What loha and lokr share: peft's LyCORIS options (rank_dropout, module_dropout, ...), checked, applied,
exported and imported the same way for both (peft 0.21.2 `peft/tuners/lycoris_utils.py`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config import ConfigError, LoraLiteConfig
from .lora import nonzero_alpha

# peft Lycoris options lora-lite has no equivalent for: import refuses any that is set
UNSUPPORTED = ("modules_to_save", "layers_to_transform")


def check_lycoris(cfg: LoraLiteConfig, flags: tuple[str, ...] = ()) -> None:
    """Shared by loha and lokr: no input dropout, rank/module dropout probabilities in [0, 1), boolean flags."""
    nonzero_alpha(cfg)
    if cfg.dropout != 0.0:
        raise ConfigError(
            f"{cfg.variant}: has no adapter-input dropout (nor has peft's {cfg.variant}); set dropout=0.0 and use "
            f"variant_kwargs rank_dropout / module_dropout instead (got dropout={cfg.dropout})"
        )
    kw = cfg.variant_kwargs
    for k in ("rank_dropout", "module_dropout"):
        p = kw.get(k, 0.0)
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
            raise ConfigError(f"{cfg.variant}: variant_kwargs[{k!r}] must be a probability in [0, 1), got {p!r}")
    for k in ("use_effective_conv2d", *flags):
        if not isinstance(kw.get(k, False), bool):
            raise ConfigError(f"{cfg.variant}: variant_kwargs[{k!r}] must be True or False, got {kw[k]!r}")


def lycoris_drop(layer: nn.Module, d_out: int, device: torch.device, rescale: bool) -> tuple[bool, torch.Tensor | None]:
    """(skip the update, per-output-row mask or None), in training mode only.

    Draws `torch.rand(1)` then `torch.rand(d_out)` from the default CPU generator, in peft's order, whenever
    either dropout is on: the same seed drops the same modules and rows as peft.
    """
    kw = layer._lora_lite.cfg.variant_kwargs
    pm, pr = kw.get("module_dropout", 0.0), kw.get("rank_dropout", 0.0)
    if not layer.training or not (pm or pr):
        return False, None
    if not bool(torch.rand(1) > pm):
        return True, None
    if not pr:
        return False, None
    mask = (torch.rand(d_out) > pr).float()
    if rescale:
        mask = mask / mask.mean().clamp_min(1e-12)  # (all rows dropped: an all-zero mask, not 0/0)
    return False, mask.to(device)


def lycoris_import(pc: dict, kind: str, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """The LoraLiteConfig fields of a peft LoHa/LoKr adapter_config.json; ValueError naming an unsupported option."""
    bad = [k for k in UNSUPPORTED if pc.get(k)]
    if bad:
        raise ValueError(
            f"peft {kind} option(s) {bad} = {[pc[k] for k in bad]} have no lora-lite equivalent for {kind} (only "
            "the adapter tensors train); cannot import"
        )
    kw = {k: pc[k] for k in ("rank_dropout", "module_dropout", "use_effective_conv2d", *extra) if k in pc}
    patterns = {k: dict(pc.get(k) or {}) for k in ("rank_pattern", "alpha_pattern")}  # per-layer r / alpha
    return dict(variant=kind.lower(), r=int(pc["r"]), alpha=float(pc["alpha"]), variant_kwargs=kw, **patterns)


def lycoris_config(cfg: LoraLiteConfig, **extra: Any) -> dict[str, Any]:
    """The adapter_config.json fields of a peft LoHa/LoKr with this config; `extra`: variant_kwargs and defaults."""
    kw = cfg.variant_kwargs
    out = {"r": cfg.r, "alpha": cfg.alpha, "init_weights": True, "rank_pattern": {}, "alpha_pattern": {}}
    defaults = {"rank_dropout": 0.0, "module_dropout": 0.0, "use_effective_conv2d": False, **extra}
    return {**out, **{k: kw.get(k, d) for k, d in defaults.items()}}
