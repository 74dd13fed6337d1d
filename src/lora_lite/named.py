"""Named adapters: which are attached, which are active, and the tensors of each.

The bookkeeping beside the runtime: the runtime attaches and detaches, this module answers "which
adapters, which layers, which tensors" and switches adapters on and off (`set_active`). Variants never
see names: each adapter's tensors sit in their own module on the layer (state.py).
"""

from __future__ import annotations

import torch
from torch import nn

from . import guards, original, saved
from .errors import AdapterError
from .state import STATE, LayerAdapter, ModelState
from .target import unwrap


def model_state(model: nn.Module) -> ModelState:
    st = getattr(unwrap(model), STATE, None)
    if st is None:
        raise AdapterError(
            "no lora-lite adapter is attached to this model; call ll.attach(model, cfg) or ll.load first"
        )
    return st


def is_attached(model: nn.Module) -> bool:
    """True if any adapter is attached."""
    return getattr(unwrap(model), STATE, None) is not None


def adapters(model: nn.Module) -> list[str]:
    """The attached adapters' names, in attach order ([] when none)."""
    st = getattr(unwrap(model), STATE, None)
    return [] if st is None else list(st.adapters)


def active(model: nn.Module) -> list[str]:
    """The active adapters' names, in attach order: they run and train (after attach: every adapter)."""
    st = getattr(unwrap(model), STATE, None)
    return [] if st is None else [n for n, info in st.adapters.items() if info.active]


def resolve(model: nn.Module, name: str | None, what: str) -> str:
    """`name`, checked; or, left out, the only attached adapter."""
    names = list(model_state(model).adapters)
    if name is None:
        if len(names) > 1:
            raise AdapterError(f"{what}: several adapters are attached ({names}); pass name=... to say which")
        return names[0]
    guards.check_known([name], names, what)
    return name


def targets(model: nn.Module, name: str | None = None) -> dict[str, LayerAdapter]:
    """layer name -> the adapter's module on that layer (its lora_* tensors; it shows the layer's weight too)."""
    state = model_state(model)
    return dict(state.adapters[resolve(model, name, "ll.targets")].layers)


def adapter_state_dict(model: nn.Module, name: str | None = None) -> dict[str, torch.Tensor]:
    """{"<layer path>.<tensor>": tensor}: the adapter's live tensors (writing into them changes the adapter),
    and `<module>.<tensor>` of its modules_to_save (their trained values)."""
    sd = {f"{layer}.{p}": getattr(a, p) for layer, a in targets(model, name).items() for p in a._lora_lite.names}
    for m, sm in model_state(model).adapters[resolve(model, name, "ll.adapter_state_dict")].saved.items():
        sd.update({f"{m}.{k}": t for k, t in saved.trained(sm).items()})
    return sd


def set_active(model: nn.Module, names: str | list[str], *, trainable: str | list[str] | None = None) -> None:
    """These adapters run and train; every other one is skipped (its layers compute as without it) and frozen.

    `trainable`: the active adapters that train (default: all of `names`); the others in `names` run frozen
    (train a new adapter on top of a fixed one). A rewriting adapter (pissa, antipasto) turned off puts the
    original weight back for as long as it is off.
    """
    state = model_state(model)
    names = [names] if isinstance(names, str) else list(names)
    guards.check_known(names, list(state.adapters), "ll.set_active")
    train = names if trainable is None else [trainable] if isinstance(trainable, str) else list(trainable)
    guards.check_trainable(train, names)
    for n, info in state.adapters.items():  # every check before the first change
        for a in info.layers.values():
            guards.require_outside_blocks(a._lora_lite, "ll.set_active", "(it changes which adapters run)")
            if n not in names and info.active:
                guards.require_original(a._lora_lite, "ll.set_active (turning a rewriting adapter off)")
    for n, info in state.adapters.items():
        info.active, info.trainable = n in names, n in train
        for a in info.layers.values():
            a._lora_lite.active = info.active
            original.use_residual(a) if info.active else original.use_original(a)
        for sm in info.saved.values():
            saved.use_trained(sm) if info.active else saved.use_original(sm)
    set_trainable(model)


def set_trainable(model: nn.Module) -> None:
    """Every base parameter frozen; the trainable lora_* tensors of active, trainable adapters require grad."""
    for p in unwrap(model).parameters():
        p.requires_grad_(False)
    for info in model_state(model).adapters.values():
        for a in info.layers.values():
            for p in a._lora_lite.trainable:
                getattr(a, p).requires_grad_(info.active and info.trainable)
        for sm in info.saved.values():
            saved.set_trainable(sm, info.active and info.trainable)
