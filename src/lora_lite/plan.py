"""Planning: which layers a config targets, which variant handles each, which tensors it needs.

`plan(model, cfg, name)` touches nothing; attach, load, import_peft and summary's preview all start
from it, and every refusal that depends only on the model and the config happens here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import guards
from .config import ConfigError, LoraLiteConfig, get_variant
from .target import dims, find_targets, kind_of, unhooked_linears, weight_sharers
from .variant import ParamSpec, Variant


@dataclass
class Target:
    name: str
    layer: nn.Module
    role: str
    variant: type[Variant]
    specs: dict[str, ParamSpec]


def plan(model: nn.Module, cfg: LoraLiteConfig, adapter: str = "default") -> list[Target]:
    """What attaching `cfg` as adapter `adapter` would add, without touching the model."""
    base = get_variant(cfg.variant)
    targets, owners, unhooked = [], None, unhooked_linears(model)
    for name, layer, role in find_targets(model, cfg):
        guards.check_kind(name, layer, kind_of(layer), base)  # (embeddings, convolutions: routed by role below)
        variant = base.route(name, role, cfg)
        if variant.rewrites_weight and owners is None:
            owners = weight_sharers(model)
        guards.check_target(model, name, layer, variant, owners, unhooked)
        guards.check_stacking(name, layer, variant, adapter)
        d_in, d_out = dims(layer)
        try:
            specs = variant.param_specs(d_in, d_out, cfg)
        except ConfigError as e:  # shape-dependent refusals: say which layer
            raise ConfigError(f"{name} ({d_in}->{d_out}): {e}") from None
        guards.check_no_clash(name, layer, specs)
        bad = [p for p in specs if not p.startswith("lora_")]
        if bad:
            raise ConfigError(f"variant {variant.name!r}: tensor name {bad[0]!r} must start with 'lora_'")
        targets.append(Target(name, layer, role, variant, specs))
    base.check_plan([(t.name, t.role) for t in targets], cfg)
    return targets


def expected(targets: list[Target], cfg: LoraLiteConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """`<layer>.<tensor>` -> (shape, dtype) of every tensor the plan creates: what a file must hold."""
    return {f"{t.name}.{p}": (tuple(s.shape), s.dtype or cfg.dtype) for t in targets for p, s in t.specs.items()}
