"""Planning: which layers a config targets, which variant handles each, which tensors it needs.

`plan(model, cfg, name)` touches nothing; attach, load, import_peft and summary's preview all start
from it, and every refusal that depends only on the model and the config happens here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from . import experts, guards, saved
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
    cfg: LoraLiteConfig | None = None  # this layer's config: r / alpha from rank_pattern / alpha_pattern
    param: str | None = None  # target_parameters: the parameter of `layer` (its owner) adapted (experts.py)


def plan(model: nn.Module, cfg: LoraLiteConfig, adapter: str = "default") -> list[Target]:
    """What attaching `cfg` as adapter `adapter` would add, without touching the model."""
    base = get_variant(cfg.variant)
    targets, owners, unhooked = [], None, unhooked_linears(model)
    if (cfg.rank_pattern or cfg.alpha_pattern) and base.group_init is not None:
        raise ConfigError(
            f"rank_pattern / alpha_pattern are not supported with variant {cfg.variant!r}, whose data-driven init "
            "assigns every layer's tensors at once; leave them out"
        )
    for name, layer, role in find_targets(model, cfg):
        lcfg = _layer_cfg(cfg, name)
        guards.check_kind(name, layer, kind_of(layer), base)  # (embeddings, convolutions: routed by role below)
        variant = base.route(name, role, lcfg)
        if variant.rewrites_weight and owners is None:
            owners = weight_sharers(model)
        guards.check_target(model, name, layer, variant, owners, unhooked)
        guards.check_stacking(name, layer, variant, adapter)
        d_in, d_out = dims(layer)
        try:
            if variant.layer_specs is None:
                specs = variant.param_specs(d_in, d_out, lcfg)
            else:
                specs = variant.layer_specs(layer, lcfg)
        except ConfigError as e:  # shape-dependent refusals: say which layer
            raise ConfigError(f"{name} ({d_in}->{d_out}): {e}") from None
        guards.check_no_clash(name, layer, specs)
        bad = [p for p in specs if not p.startswith("lora_")]
        if bad:
            raise ConfigError(f"variant {variant.name!r}: tensor name {bad[0]!r} must start with 'lora_'")
        targets.append(Target(name, layer, role, variant, specs, lcfg))
    for name, owner, pname in experts.find_params(model, cfg):
        guards.check_param_owner(name, owner)
        lcfg = _layer_cfg(cfg, name)
        p = owner._parameters[pname]
        specs = experts.param_specs(tuple(p.shape), bool(getattr(owner, "is_transposed", False)), lcfg)
        targets.append(Target(name, owner, "expert", base, specs, lcfg, pname))
    base.check_plan([(t.name, t.role) for t in targets if t.param is None], cfg)
    for fname in ("rank_pattern", "alpha_pattern"):
        for key in getattr(cfg, fname):
            if not any(re.match(rf"(.*\.)?({key})$", t.name) for t in targets):
                raise ConfigError(
                    f"{fname}: key {key!r} matches no targeted layer (a key must match the end of a layer name at a "
                    f"dot, as peft's: e.g. 'mlp.up_proj' or 'layers\\.0\\..*'); targets: "
                    f"{[t.name for t in targets[:6]]}{' ...' if len(targets) > 6 else ''}"
                )
    return targets


def _layer_cfg(cfg: LoraLiteConfig, name: str) -> LoraLiteConfig:
    try:
        return cfg.for_layer(name)
    except ConfigError as e:  # e.g. hra's even r, for the r a rank_pattern gives this layer
        raise ConfigError(f"{name}: {e}") from None


def expected(
    targets: list[Target], cfg: LoraLiteConfig, model: nn.Module | None = None, adapter: str = "default"
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """`<layer>.<tensor>` -> (shape, dtype) of every tensor the plan creates: what a file must hold (with `model`:
    also `<module>.<tensor>` of the modules_to_save, in their own dtype)."""
    out = {f"{t.name}.{p}": (tuple(s.shape), s.dtype or cfg.dtype) for t in targets for p, s in t.specs.items()}
    if model is not None:
        for n, m in saved.find_modules(model, cfg, targets, adapter).items():
            out.update({f"{n}.{k}": (tuple(v.shape), v.dtype) for k, v in m.state_dict().items()})
    return out
