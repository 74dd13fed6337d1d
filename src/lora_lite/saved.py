"""`modules_to_save`: whole modules (a classifier head, ...) trained in place with an adapter and saved with it.

At attach each module the config's regexes match (re.search on module names; the outermost one when
nested modules match) keeps a copy of its tensors (`module.state_dict()`: parameters and persistent
buffers), as peft keeps `original_module`. While the adapter is active the module's own parameters
train (requires_grad=True); the adapter's file holds their values under `<module>.<tensor>`, so
`ll.load` onto a fresh base brings them back. While the adapter is off (`ll.disabled`, or inactive
after `ll.set_active`) the original values are swapped in (pointer swaps, no copy), and `ll.detach`
puts them back bit for bit. A module is saved by one adapter at most, and holds no adapter target.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from .config import ConfigError, LoraLiteConfig
from .errors import AdapterError
from .state import STATE, SavedModule
from .target import TargetError


def find_modules(model: nn.Module, cfg: LoraLiteConfig, targets: list, adapter: str) -> dict[str, nn.Module]:
    """module name -> module of every module `cfg.modules_to_save` selects; every refusal before attach."""
    if not cfg.modules_to_save:
        return {}
    mods = [(n, m) for n, m in model.named_modules() if n and "lora_lite" not in n]
    for pat in cfg.modules_to_save:
        if not any(re.search(pat, n) for n, _ in mods):
            listing = ", ".join(n for n, m in mods if next(m.parameters(recurse=False), None) is not None)
            raise TargetError(
                f"modules_to_save: {pat!r} matches no module of this model. Modules with parameters: "
                f"{listing[:2000] or '(none)'}"
            )
    chosen: dict[str, nn.Module] = {}
    for n, m in mods:
        if any(re.search(pat, n) for pat in cfg.modules_to_save) and not any(n.startswith(c + ".") for c in chosen):
            chosen[n] = m
    for n, m in chosen.items():
        if not m.state_dict():
            raise ConfigError(f"modules_to_save: {n} ({type(m).__name__}) has no parameters or buffers to train")
        inside = [t.name for t in targets if t.name == n or t.name.startswith(n + ".")]
        if inside:
            raise ConfigError(
                f"modules_to_save: {n} is also adapted ({inside[0]} is a target of adapter {adapter!r}); a module is "
                "either trained whole or adapted. Exclude it from the targets (exclude_names) or from modules_to_save"
            )
    state = getattr(model, STATE, None)
    for other, info in state.adapters.items() if state is not None else ():
        for n, m in chosen.items():
            clash = [
                s for s, sm in info.saved.items() if sm.module is m or s.startswith(n + ".") or n.startswith(s + ".")
            ]
            if clash:
                raise AdapterError(
                    f"modules_to_save: {n} is already saved by adapter {other!r} ({clash[0]}); one module is trained "
                    f"and saved by one adapter only. Leave it out of adapter {adapter!r}'s modules_to_save"
                )
            held = [k for k in m.state_dict() if "lora_lite" in k]
            if held:
                raise AdapterError(
                    f"modules_to_save: {n} holds a target of adapter {other!r} ({held[0]}); a module is either "
                    "trained whole or adapted"
                )
        for s in info.saved:
            inside = [t.name for t in targets if t.name == s or t.name.startswith(s + ".")]
            if inside:
                raise AdapterError(
                    f"{inside[0]}: adapter {other!r} trains and saves {s} whole (modules_to_save); it cannot also be "
                    f"adapted by {adapter!r}. Exclude it (exclude_names)"
                )
    return chosen


def keep(module: nn.Module) -> SavedModule:
    tensors = dict(module.state_dict(keep_vars=True))
    return SavedModule(module, tensors, {k: t.detach().clone() for k, t in tensors.items()})


def _original(sm: SavedModule, k: str, t: torch.Tensor) -> torch.Tensor:
    o = sm.original[k]
    return o if (o.device, o.dtype) == (t.device, t.dtype) else o.to(t.device, t.dtype)  # model.to since attach


def use_original(sm: SavedModule) -> bool:
    """The adapter is off: its trained values out, the originals in (restored by `use_trained`)."""
    if sm.stashed is not None:
        return False
    sm.stashed = {k: t.data for k, t in sm.tensors.items()}
    for k, t in sm.tensors.items():
        t.data = _original(sm, k, t)
    return True


def use_trained(sm: SavedModule) -> None:
    if sm.stashed is None:
        return
    for k, t in sm.tensors.items():
        t.data = sm.stashed[k]
    sm.stashed = None


def trained(sm: SavedModule) -> dict[str, torch.Tensor]:
    """The trained values (live while the adapter is on; writing into them changes the adapter)."""
    return dict(sm.tensors) if sm.stashed is None else dict(sm.stashed)


def restore(sm: SavedModule) -> None:
    """detach: the values before attach, bit for bit."""
    with torch.no_grad():
        for k, t in sm.tensors.items():
            t.data = _original(sm, k, t)
    sm.stashed = None


def set_trainable(sm: SavedModule, on: bool) -> None:
    for t in sm.tensors.values():
        if isinstance(t, nn.Parameter) and t.is_floating_point():
            t.requires_grad_(on)
