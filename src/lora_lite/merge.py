"""`merge`: fold the attached adapter into plain dense weights, for deployment.

Every variant is affine in x, so each has a closed-form effective weight (and bias): its
`merged_weight(layer) -> (W_eff (d_out, d_in) in fp32 (fp64 for fp64 models), b_eff or None)`. `merge` writes W_eff into
`layer.weight` (in the layer's own layout and dtype: GPT-2 Conv1D stores Wᵀ) and removes every hook,
`lora_*` tensor and runtime attribute; the model is then a plain model whose output equals the
adapted one (to fp32 rounding). For weight-rewriting variants (pissa, antipasto) the merged weight
replaces the original, which is dropped. `merged_state_dict` returns the same weights without
touching the model.
"""

from __future__ import annotations

import torch
from torch import nn

from .adapter import AdapterError, _remove, require_outside_blocks, targets
from .target import computed_weight, is_conv1d, is_quantized, module_names, unwrap, weight_sharers


def _checked(model: nn.Module) -> dict[str, nn.Module]:
    """The target layers, after every check that could refuse the merge (nothing is changed here)."""
    layers = targets(model)  # raises if nothing is attached
    owners = weight_sharers(unwrap(model))
    for name, layer in layers.items():
        st = layer._lora_lite
        if is_quantized(layer):
            raise AdapterError(
                f"{name}: cannot merge into a quantized weight ({type(layer).__name__}, {layer.weight.dtype}): "
                "that would re-quantize the merged weight (lossy). Load the base model unquantized, ll.load the "
                "adapter, merge, then quantize the merged model."
            )
        how = computed_weight(layer)
        if how:
            raise AdapterError(
                f"{name}: cannot merge: this weight is {how}, so a merged weight written to it would be recomputed "
                "away (the adapter silently dropped). Remove the parametrization first, keeping its current value "
                "(torch.nn.utils.parametrize.remove_parametrizations(layer, 'weight')), then merge."
            )
        if getattr(st.variant, "merged_weight", None) is None:
            raise AdapterError(f"{name}: variant {st.variant.name!r} defines no merged_weight(layer); it cannot merge")
        require_outside_blocks(layer, "ll.merge / ll.merged_state_dict", "(it folds the trained adapter, c = 1)")
        shared = [n for m, n in owners.get(id(layer.weight), {}).items() if m != id(layer)]
        if shared:
            raise AdapterError(
                f"{name}: its weight is shared with {shared} (tied weights); merging would change those modules "
                "too. Exclude this layer from the adapter, or untie the weights first."
            )
    return layers


@torch.no_grad()
def _merged(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias or None) in the layer's own layout, dtype and device."""
    W, b = layer._lora_lite.variant.merged_weight(layer)
    w = (W.t() if is_conv1d(layer) else W).to(layer.weight.dtype).contiguous()
    if b is not None:
        b = b.to(layer.bias.dtype)
    return w, b


def merge(model: nn.Module) -> list[str]:
    """Fold the attached adapter into the layers' weights and remove it; return the merged layer names.

    After merge the model is a plain model (no hooks, no lora_* tensors, `ll.is_attached` is False) with
    the adapter's output, to fp32 rounding. Raises before changing anything on quantized layers, tied
    weights, or inside `ll.disabled` / `ll.scaled`.
    """
    layers = _checked(model)
    with torch.no_grad():
        for layer in layers.values():
            w, b = _merged(layer)
            layer.weight.data = w
            if b is not None:
                layer.bias.data = b
            layer._lora_lite.original = None  # the merged weight replaces the original (pissa, antipasto)
    _remove(model)
    return list(layers)


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state_dict with every target's merged weight (and bias), without changing the model.

    No lora_* keys; loads into a fresh copy of the base model with `load_state_dict(strict=True)`.
    """
    layers = _checked(model)
    sd = unwrap(model).state_dict()
    aliases = module_names(unwrap(model))  # a layer registered under two names has keys under both
    for name, layer in layers.items():
        w, b = _merged(layer)
        for prefix in aliases.get(id(layer), [name]):
            for p in layer._lora_lite.names:
                sd.pop(f"{prefix}.{p}", None)
            sd[f"{prefix}.weight"] = w
            if b is not None:
                sd[f"{prefix}.bias"] = b
    return sd
