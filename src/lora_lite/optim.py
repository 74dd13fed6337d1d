"""`ll.param_groups`: optimizer parameter groups over the active adapters' trainable tensors, with LoRA+.

LoRA+ (Hayou et al. 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models", arXiv 2402.12354) trains the
"B-type" tensors (the output-side factor) at `loraplus_lr_ratio` times the learning rate of the others. Which
tensors are B-type each variant declares in `Variant.b_tensors`, chosen to reproduce peft 0.21.2's
`create_loraplus_optimizer` (peft/optimizers/loraplus.py) on peft's names: a tensor is B-type there when its
name contains "lora_B" or it is 1-D (dora's magnitude, delora's lambda). Adapters on embedding layers go to
their own group at `loraplus_lr_embedding` (peft's default 1e-6), as peft's. Every group gets `weight_decay`
(peft's `loraplus_weight_decay`); peft's B-no-decay group only holds tensors named "bias", which no variant has.
The trained parameters of `modules_to_save` join the groups by peft's rule (1-D ones, e.g. a head's bias, are B).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .config import ConfigError
from .named import active, model_state


def param_groups(
    model: nn.Module,
    lr: float,
    loraplus_lr_ratio: float | None = None,
    weight_decay: float = 0.0,
    *,
    loraplus_lr_embedding: float = 1e-6,
) -> list[dict[str, Any]]:
    """Parameter groups for `torch.optim.*(groups)`: the trainable tensors of the active adapters.

    Without `loraplus_lr_ratio`: one group at `lr`. With it: A-type tensors at `lr`, B-type ones at
    `loraplus_lr_ratio * lr`, and (if any) the tensors of adapters on embedding layers at `loraplus_lr_embedding`.
    Empty groups are left out. Each group also has a "name" ("adapters", "A", "B" or "embedding").
    """
    for what, v in (("lr", lr), ("weight_decay", weight_decay), ("loraplus_lr_embedding", loraplus_lr_embedding)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise ConfigError(f"ll.param_groups: {what} must be a number >= 0, got {v!r}")
    if loraplus_lr_ratio is not None and (
        isinstance(loraplus_lr_ratio, bool) or not isinstance(loraplus_lr_ratio, (int, float)) or loraplus_lr_ratio <= 0
    ):
        raise ConfigError(
            f"ll.param_groups: loraplus_lr_ratio must be a number > 0 (LoRA+ uses ~16), got {loraplus_lr_ratio!r}"
        )
    state = model_state(model)
    groups: dict[str, list[torch.Tensor]] = {"adapters": [], "A": [], "B": [], "embedding": []}
    seen: set[int] = set()
    for name in active(model):
        for a in state.adapters[name].layers.values():
            st = a._lora_lite
            for p in st.trainable:
                t = getattr(a, p)
                if not isinstance(t, nn.Parameter) or not t.requires_grad or id(t) in seen:
                    continue
                seen.add(id(t))
                if loraplus_lr_ratio is None:
                    kind = "adapters"
                elif isinstance(a._base, nn.Embedding):
                    kind = "embedding"
                else:
                    kind = "B" if p in st.variant.b_tensors else "A"
                groups[kind].append(t)
        for sm in state.adapters[name].saved.values():  # modules_to_save: peft's rule on their own names (1-D: B)
            for t in sm.tensors.values():
                if isinstance(t, nn.Parameter) and t.requires_grad and id(t) not in seen:
                    seen.add(id(t))
                    groups["adapters" if loraplus_lr_ratio is None else "B" if t.dim() == 1 else "A"].append(t)
    ratio = 1.0 if loraplus_lr_ratio is None else float(loraplus_lr_ratio)
    lrs = {"adapters": lr, "A": lr, "B": ratio * lr, "embedding": loraplus_lr_embedding}
    return [{"params": ps, "lr": lrs[k], "weight_decay": weight_decay, "name": k} for k, ps in groups.items() if ps]
