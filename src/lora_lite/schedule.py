"""Training-time hooks of the active adapters: `ll.on_step` (schedules, e.g. AdaLoRA's rank allocation) and
`ll.regularizer` (a loss term, e.g. AdaLoRA's orthogonality penalty). Both are no-ops for the other variants.

A plain training loop with them (the order peft documents for AdaLoRA's `update_and_allocate`):

    loss = model(**batch).loss + ll.regularizer(model)
    loss.backward()
    optimizer.step()
    ll.on_step(model, step)
    optimizer.zero_grad()
"""

from __future__ import annotations

import torch
from torch import nn

from .config import get_variant
from .named import model_state


def on_step(model: nn.Module, step: int) -> None:
    """Run the training-time schedule of every active adapter that has one, at global step `step` (0, 1, ...).

    Call it after `loss.backward()` (and `optimizer.step()`) and before `optimizer.zero_grad()`: AdaLoRA reads
    the gradients. A no-op for variants without a schedule.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise TypeError(f"ll.on_step: step must be an integer >= 0 (the global training step), got {step!r}")
    for info in model_state(model).adapters.values():
        variant = get_variant(info.cfg.variant)
        if info.active and variant.on_step is not None:
            variant.on_step(dict(info.layers), info.cfg, step)


def regularizer(model: nn.Module) -> torch.Tensor:
    """The sum of the active adapters' loss terms (a 0-dim tensor; 0 when none has one): add it to the loss."""
    terms = []
    for info in model_state(model).adapters.values():
        variant = get_variant(info.cfg.variant)
        if info.active and variant.regularizer is not None:
            terms.append(variant.regularizer(dict(info.layers), info.cfg))
    if terms:
        return torch.stack(terms).sum() if len(terms) > 1 else terms[0]
    p = next(iter(next(iter(model_state(model).adapters.values())).layers.values())).parameters()
    t = next(p, None)
    return torch.zeros((), device=None if t is None else t.device)
