"""AdaLoRA's rank allocation (peft's `RankAllocator` and `update_and_allocate`), run by `ll.on_step(model, step)`.

Per adapter, over all its layers at once:
- steps < total_step − tfinal: sensitivity EMAs per entry of A, E, B: I = |p·∇p|, Ī ← β₁Ī + (1−β₁)I,
  U ← β₂U + (1−β₂)|I − Ī|; the score of a triplet i is (ĪU)(E_i) + mean_j (ĪU)(A_ij) + mean_j (ĪU)(B_ji).
  The budget is r·n (until tinit), then falls cubically to target_r·n; every deltaT steps the triplets scoring
  at or below the k-th lowest score (k = r·n − budget) get E_i = 0, and `lora_mask` records the kept ones.
- step == total_step − tfinal: the final allocation (budget target_r·n); the EMAs are dropped.
- later steps: E_i = 0 wherever `lora_mask` is 0 (the optimizer may have moved it).
The EMAs live in each layer's `_lora_lite.cache` (not saved, as in peft); the mask is a saved buffer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config import ConfigError, LoraLiteConfig
from ..variant import for_cache

# peft's AdaLoraConfig defaults (r is peft's init_r, alpha its lora_alpha). target_r: min(8, r). total_step: no
# default, as in peft; only ll.on_step needs it (an adapter without a schedule runs, saves and merges).
DEFAULTS = dict(
    target_r=None, tinit=0, tfinal=0, deltaT=1, beta1=0.85, beta2=0.85, orth_reg_weight=0.5, total_step=None
)


def opt(cfg: LoraLiteConfig, key: str) -> Any:
    if key == "target_r" and key not in cfg.variant_kwargs:
        return min(8, cfg.r)
    return cfg.variant_kwargs.get(key, DEFAULTS[key])


def _schedule(n: int, cfg: LoraLiteConfig, step: int) -> tuple[int, bool]:
    """peft's RankAllocator.budget_schedule: (budget, mask now) for n layers."""
    tinit, tfinal, total = opt(cfg, "tinit"), opt(cfg, "tfinal"), opt(cfg, "total_step")
    init_bgt, target_bgt = cfg.r * n, opt(cfg, "target_r") * n
    if step <= tinit:
        return init_bgt, False
    if step > total - tfinal:
        return target_bgt, True
    mul = 1 - (step - tinit) / (total - tfinal - tinit)
    return int((init_bgt - target_bgt) * (mul**3) + target_bgt), step % opt(cfg, "deltaT") == 0


@torch.no_grad()
def _update_ipt(layers: dict[str, nn.Module], cfg: LoraLiteConfig) -> None:
    b1, b2 = opt(cfg, "beta1"), opt(cfg, "beta2")
    for name, a in layers.items():
        ema = a._lora_lite.cache.setdefault("adalora_ema", {})
        for p in ("lora_A", "lora_E", "lora_B"):
            t = getattr(a, p)
            if t.grad is None:
                raise RuntimeError(f"ll.on_step: {name}.{p} has no gradient; call it after loss.backward()")
            with for_cache():
                ipt = (t * t.grad).abs()
                avg, unc = ema.get(p) or (torch.zeros_like(t), torch.zeros_like(t))
                avg = b1 * avg + (1 - b1) * ipt
                ema[p] = (avg, b2 * unc + (1 - b2) * (ipt - avg).abs())


@torch.no_grad()
def _mask_to_budget(layers: dict[str, nn.Module], cfg: LoraLiteConfig, budget: int) -> None:
    scores = {}
    for name, a in layers.items():
        ema = a._lora_lite.cache.get("adalora_ema")
        if not ema:
            raise RuntimeError(f"ll.on_step: no sensitivity collected yet on {name}; call ll.on_step at every step")
        sA, sE, sB = (ema[p][0] * ema[p][1] for p in ("lora_A", "lora_E", "lora_B"))
        ab = torch.cat([sA.mean(1, keepdim=True), sB.mean(0).view(-1, 1)], 1).sum(1)
        scores[name] = sE.view(-1) + ab
    k = cfg.r * len(layers) - budget
    if k <= 0:  # nothing to cut (peft's kthvalue would raise)
        return
    thr = torch.kthvalue(torch.cat(list(scores.values())), k)[0].item()
    for name, a in layers.items():
        keep = scores[name] > thr
        a.lora_E.masked_fill_(~keep[:, None], 0.0)
        a.lora_mask.copy_(keep)


def allocate(layers: dict[str, nn.Module], cfg: LoraLiteConfig, step: int) -> None:
    """peft's AdaLoraModel.update_and_allocate(step), for one adapter's layers."""
    if opt(cfg, "total_step") is None:
        raise ConfigError(
            "adalora: ll.on_step needs variant_kwargs['total_step'] (the number of training steps, as peft's "
            "AdaLoraConfig(total_step=...)) to schedule the rank budget; attach with it set"
        )
    final = opt(cfg, "total_step") - opt(cfg, "tfinal")
    if step < final:
        _update_ipt(layers, cfg)
        budget, mask = _schedule(len(layers), cfg, step)
        if mask:
            _mask_to_budget(layers, cfg, budget)
    elif step == final:
        _mask_to_budget(layers, cfg, opt(cfg, "target_r") * len(layers))
        for a in layers.values():
            a._lora_lite.cache.pop("adalora_ema", None)
    else:
        with torch.no_grad():
            for a in layers.values():
                a.lora_E.masked_fill_(a.lora_mask[:, None] == 0, 0.0)
