"""`disabled` and `scaled`: switch the attached adapter off, or steer it with a coefficient, inside a `with` block.

    with ll.disabled(model):      # exactly the base model (e.g. the DPO reference model, no second copy)
        ref_logits = model(ids).logits
    with ll.scaled(model, 0.5):   # c = 0: base model, c = 1: the trained adapter, c = -1: "the opposite"
        ...

Both set fields of each layer's runtime state (`layer._lora_lite.enabled`, `.coef`) that the hooks
read, and restore them on exit, also when the body raises. For pissa and antipasto, which replaced
`layer.weight` by a residual, `disabled` also swaps the original weight (rebuilt from what the
runtime keeps for `detach`, original.py) in for the block, so the output is bit for bit the base
model's. What c means is up to each variant (`Variant.scaled_forward`, documented in each variant's
file): additive variants scale their update, ia3 interpolates its gate, pissa interpolates against the
original weight, antipasto rotates by c (c = -1 is the exact inverse rotation). c = 1 costs nothing: the
hooks take the usual path.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .adapter import AdapterError, original_weight, require_original, targets


def _same_state(layer: nn.Module, st: object) -> bool:
    """False once the adapter was detached (or replaced) inside the block: then there is nothing to restore."""
    return getattr(layer, "_lora_lite", None) is st


@contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model computes exactly its base output; the adapter is restored on exit."""
    layers = [(layer, layer._lora_lite) for layer in targets(model).values()]
    for layer, _ in layers:  # before any change
        require_original(layer, "ll.disabled (the base model)")
    turned_off, swapped = [], []
    try:
        for layer, st in layers:
            if not st.enabled:  # nested `disabled`: the outer block owns this layer
                continue
            st.enabled = False
            turned_off.append((layer, st))
            if st.original is not None:  # pissa / antipasto: put the original weight back for the block
                W0 = original_weight(layer)  # rebuilt once, then kept (adapter.original_weight); may raise
                w_res = st.cache["w_res"] = layer.weight.data  # detach inside the block: the weight is original
                layer.weight.data = W0
                swapped.append((layer, st, w_res))
        yield model
    finally:
        for layer, st, w_res in swapped:
            st.cache.pop("w_res", None)
            if _same_state(layer, st):
                layer.weight.data = w_res
        for _, st in turned_off:
            st.enabled = True


def _coefficient(c: object) -> float:
    """c as a Python float: a real number (int, float, numpy scalar) or a one-element tensor without grad."""
    if isinstance(c, torch.Tensor):
        if c.requires_grad:
            raise AdapterError(
                "ll.scaled: c requires grad, but it is used as a Python float (no gradient would reach it); "
                "pass c.item() or c.detach() if that is what you want"
            )
        if c.numel() == 1 and not c.is_complex() and c.dtype != torch.bool:
            c = c.item()
    if isinstance(c, bool) or not isinstance(c, numbers.Real) or not math.isfinite(c):
        raise AdapterError(f"ll.scaled: the coefficient c must be a finite real number, got {c!r}")
    return float(c)


@contextmanager
def scaled(model: nn.Module, c: float) -> Iterator[nn.Module]:
    """Inside the block every adapter layer runs with steering coefficient `c` (0: base, 1: adapter).

    Blocks nest (the inner c wins until it exits); the previous coefficients are restored on exit.
    """
    c = _coefficient(c)
    layers = [(layer, layer._lora_lite) for layer in targets(model).values()]
    if c != 1.0:  # before any change; eagerly, so a compiled model's first scaled call need not trace it
        for layer, st in layers:
            if st.variant.scaled_reads_original:
                require_original(layer, f"ll.scaled(model, {c}) (which interpolates against the base layer)")
                original_weight(layer)
    before = [st.coef for _, st in layers]
    try:
        for _, st in layers:
            st.coef = float(c)
        yield model
    finally:
        for (_, st), coef in zip(layers, before):
            st.coef = coef
