"""`merge`: fold adapters into plain dense weights, for deployment.

Every variant is affine in x, so each has a closed-form effective weight: `merged_weight(layer, W, b)`
maps the layer's dense weight and bias as the adapters below it left them to the ones with it. `merge`
folds the active (or the named) adapters of each layer in attach order, which gives exactly what the
hooks compute for the stack (runtime.py), writes the result into `layer.weight` (in the layer's own
layout and dtype: GPT-2 Conv1D stores Wᵀ) and removes every adapter, merged or not. For pissa and
antipasto the merged weight replaces the original, which is dropped. `merged_state_dict` returns the
same weights without touching the model.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from . import experts, guards, saved
from .errors import AdapterError
from .named import model_state
from .runtime import _remove
from .state import LayerAdapter, ParamAdapter
from .target import (
    computed_weight,
    dense_weight,
    is_quantized,
    module_names,
    to_layout,
    unwrap,
    weight_sharers,
)
from .variant import merge_dtype


def _chosen(model: nn.Module, names: list[str] | None) -> list[str]:
    state = model_state(model)
    if names is None:
        return [n for n, info in state.adapters.items() if info.active]
    names = [names] if isinstance(names, str) else list(names)
    guards.check_known(names, list(state.adapters), "ll.merge")
    return [n for n in state.adapters if n in names]  # attach order


def _layers(model: nn.Module, names: list[str]) -> dict[str, list[LayerAdapter]]:
    """layer name -> the chosen adapters on it (attach order), after every check that could refuse the merge."""
    layers: dict[str, list[LayerAdapter]] = {}
    owners = weight_sharers(unwrap(model))
    for n in names:
        for name, a in model_state(model).adapters[n].layers.items():
            layers.setdefault(name, []).append(a)
            base = a._base
            if isinstance(a, ParamAdapter):  # an expert weight (experts.py): W + ΔW, nothing else to check
                guards.require_outside_blocks(a._lora_lite, "ll.merge / ll.merged_state_dict", "(c = 1)")
                continue
            if is_quantized(base):
                raise AdapterError(
                    f"{name}: cannot merge into a quantized weight ({type(base).__name__}, {base.weight.dtype}): "
                    "that would re-quantize the merged weight (lossy). Load the base model unquantized, ll.load the "
                    "adapter, merge, then quantize the merged model."
                )
            how = computed_weight(base)
            if how:
                raise AdapterError(
                    f"{name}: cannot merge: this weight is {how}, so a merged weight written to it would be recomputed "
                    "away (the adapter silently dropped). Remove the parametrization first, keeping its current value "
                    "(torch.nn.utils.parametrize.remove_parametrizations(layer, 'weight')), then merge."
                )
            if a._lora_lite.variant.merged_weight is None:
                raise AdapterError(
                    f"{name}: variant {a._lora_lite.variant.name!r} defines no merged_weight; it cannot merge"
                )
            guards.require_outside_blocks(
                a._lora_lite, "ll.merge / ll.merged_state_dict", "(it folds the trained adapter, c = 1)"
            )
            shared = [m for i, m in owners.get(id(base.weight), {}).items() if i != id(base)]
            if shared:
                raise AdapterError(
                    f"{name}: its weight is shared with {shared} (tied weights); merging would change those modules "
                    "too. Exclude this layer from the adapter, or untie the weights first."
                )
    return layers


@torch.no_grad()
def _merged(stack: list[LayerAdapter]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias or None = unchanged) of one layer with `stack` folded in, in the layer's layout and dtype."""
    base = stack[0]._base
    dt = functools.reduce(torch.promote_types, [merge_dtype(a) for a in stack])
    bias = getattr(base, "bias", None)  # (nn.Embedding has none)
    W, b = dense_weight(base, dt), None if bias is None else bias.to(dt)
    for a in stack:
        W, b = a._lora_lite.variant.merged_weight(a, W, b)
    w = to_layout(base, W)  # (GPT-2 Conv1D and nn.Embedding store Wᵀ; a convolution its kernel shape)
    return w, None if b is None else b.to(base.bias.dtype)


def merge(model: nn.Module, names: list[str] | str | None = None) -> list[str]:
    """Fold the active adapters (or `names`) into the layers' weights, remove every adapter; return the
    merged layer names.

    After merge the model is a plain model (no hooks, no lora_* tensors, `ll.is_attached` is False) whose
    output equals the merged adapters' stack, to fp32 rounding. Raises before changing anything on
    quantized layers, tied weights, or inside `ll.disabled` / `ll.scaled`.
    """
    chosen = _chosen(model, names)
    layers = _layers(model, chosen)
    with torch.no_grad():
        for stack in layers.values():
            if isinstance(stack[0], ParamAdapter):
                experts.merge(stack)
                continue
            w, b = _merged(stack)
            base = stack[0]._base
            base.weight.data = w
            if b is not None:
                base.bias.data = b
            for a in stack:
                a._lora_lite.original = None  # the merged weight replaces the original (pissa, antipasto)
        for n in chosen:  # modules_to_save of merged adapters keep their trained values
            info = model_state(model).adapters[n]
            for sm in info.saved.values():
                saved.use_trained(sm)
            info.saved.clear()
    for n in reversed(list(model_state(model).adapters)):
        _remove(model, n)
    return list(layers)


def merged_state_dict(model: nn.Module, names: list[str] | str | None = None) -> dict[str, torch.Tensor]:
    """The base model's state_dict with the merged weights (and biases), without changing the model.

    No adapter keys; loads into a fresh copy of the base model with `load_state_dict(strict=True)`.
    """
    layers = _layers(model, _chosen(model, names))
    model = unwrap(model)
    sd = {k: v for k, v in model.state_dict().items() if ".lora_lite." not in k and ".lora_lite_params." not in k}
    for info in model_state(model).adapters.values():  # rewriting adapters not merged: the original weight
        for name, a in info.layers.items():
            if name not in layers and a._lora_lite.original is not None:
                sd[f"{name}.weight"] = a._lora_lite.original_weight(False)
    chosen = _chosen(model, names)
    for n, info in model_state(model).adapters.items():  # modules_to_save: trained if merged, else the original
        for m, sm in info.saved.items():
            values = saved.trained(sm) if n in chosen else sm.original
            sd.update({f"{m}.{k}": v.detach().clone() for k, v in values.items()})
    aliases = module_names(model)  # a layer registered under two names has keys under both
    for name, stack in layers.items():
        if isinstance(stack[0], ParamAdapter):  # "<owner>.<param>" is the parameter's own key
            W = stack[0].weight
            dt = torch.promote_types(W.dtype, torch.float32)
            sd[name] = functools.reduce(lambda w, a: w + experts.delta(a, dt), stack, W.detach().to(dt)).to(W.dtype)
            continue
        w, b = _merged(stack)
        for prefix in aliases.get(id(stack[0]._base), [name]):
            sd[f"{prefix}.weight"] = w
            if b is not None:
                sd[f"{prefix}.bias"] = b
    return sd
