"""`disabled` and `scaled`: switch every adapter off, or steer adapters with coefficients, inside a `with` block.

    with ll.disabled(model):             # exactly the base model (e.g. the DPO reference model, no second copy)
        ref_logits = model(ids).logits
    with ll.scaled(model, 0.5):          # every active adapter: c = 0 off, c = 1 as trained, c = -1 "the opposite"
    with ll.scaled(model, {"a": 1.0, "b": -0.5}):   # one coefficient per adapter (the others keep theirs)

Both set fields of each adapter's per-layer record (`enabled`, `coef`) that the hooks read, and restore
them on exit, also when the body raises. For pissa and antipasto, which replaced `layer.weight` by a
residual, `disabled` also swaps the original weight in for the block (original.py), so the output is bit
for bit the base model's. What c means is up to each variant (`Variant.scaled_forward`, documented in
each variant's file): additive variants scale their update, ia3 interpolates its gate, pissa
interpolates against the original weight, antipasto rotates by c (c = -1 is the exact inverse
rotation). c = 1 costs nothing: the hooks take the usual path.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from . import guards, original, saved
from .errors import AdapterError
from .named import model_state
from .state import STACK, LayerAdapter


def _all(model: nn.Module) -> list[LayerAdapter]:
    return [a for info in model_state(model).adapters.values() for a in info.layers.values()]


def _attached(a: LayerAdapter) -> bool:
    """False once the adapter was detached (or replaced) inside the block: then there is nothing to restore."""
    stack = a._base._modules.get(STACK)
    return stack is not None and stack._modules.get(a._lora_lite.adapter) is a


@contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model computes exactly its base output (every adapter off); restored on exit."""
    layers = _all(model)
    for a in layers:  # before any change
        guards.require_original(a._lora_lite, "ll.disabled (the base model)")
    turned_off, swapped, modules = [], [], []
    try:
        for info in model_state(model).adapters.values():  # modules_to_save: their values before attach
            for sm in info.saved.values():
                if saved.use_original(sm):
                    modules.append(sm)
        for a in layers:
            if not a._lora_lite.enabled:  # nested `disabled`: the outer block owns this layer
                continue
            a._lora_lite.enabled = False
            turned_off.append(a)
            if original.use_original(a):  # pissa / antipasto: the original weight for the block (may raise)
                swapped.append(a)
        yield model
    finally:
        for a in swapped:
            if _attached(a):
                original.use_residual(a)
            else:  # detached inside the block: the weight already is the original
                a._lora_lite.cache.pop("w_res", None)
        for a in turned_off:
            a._lora_lite.enabled = True
        for sm in modules:
            saved.use_trained(sm)


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
def scaled(model: nn.Module, c: float | dict[str, float]) -> Iterator[nn.Module]:
    """Inside the block every active adapter runs with steering coefficient `c` (0: off, 1: as trained), or
    each adapter named in the dict `c` with its own coefficient.

    Blocks nest (the inner c wins until it exits); the previous coefficients are restored on exit.
    """
    state = model_state(model)
    coefs = dict(c) if isinstance(c, dict) else {n: c for n, info in state.adapters.items() if info.active}
    guards.check_known(list(coefs), list(state.adapters), "ll.scaled")
    coefs = {n: _coefficient(v) for n, v in coefs.items()}
    layers = [(a, coefs[n]) for n in coefs for a in state.adapters[n].layers.values()]
    for a, k in layers:  # before any change; eagerly, so a compiled model's first scaled call need not trace it
        if k != 1.0 and a._lora_lite.variant.scaled_reads_original:
            guards.require_original(a._lora_lite, f"ll.scaled(model, {k}) (which interpolates against the base layer)")
            original.original_weight(a)
    before = [a._lora_lite.coef for a, _ in layers]
    try:
        for a, k in layers:
            a._lora_lite.coef = k
        yield model
    finally:
        for (a, _), coef in zip(layers, before):
            a._lora_lite.coef = coef
