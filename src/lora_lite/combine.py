"""`combine`: a weighted combination of attached adapters, attached as a new lora adapter.

    ll.combine(model, {"a": 1.0, "b": 0.5}, "ab", method="ties", density=0.5)

Two ways to combine, chosen per call:

- **factors** (every source is additive low-rank, `Variant.delta_factors`: lora, eva): peft's
  `add_weighted_adapter` on the factors. "cat" stacks w_i·s_i·A_i and B_i (rank Σ r_i; exactly Σ w_i ΔW_i);
  "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune" mix the A's and the B's separately, with
  weights ±√|w_i s_i| and √|w_i s_i| (needs one rank and the same layers; not Σ w_i ΔW_i: cross terms).
- **dense** (any variant, or a method named "svd" / "..._svd"): ΔW_i = W_eff − W from `merged_weight` at
  c = 1 against the original base weight, the method applied to the dense ΔW_i (peft's merge_utils
  math), the result truncated to rank r by SVD. The relative Frobenius error of the truncation is
  logged per layer and returned. Exact when r ≥ rank of the combined ΔW.

The result is always a plain lora (alpha = r, so s = 1; never rsLoRA) holding B and A. A source that
changes a layer's bias (ia3 on a biased layer) is refused: a lora cannot carry the bias change.
"""

from __future__ import annotations

import functools
import logging
import math
import numbers
import re

import torch
from torch import nn

from . import guards, original
from .config import LoraLiteConfig
from .errors import AdapterError
from .named import model_state
from .runtime import detach
from .state import LayerAdapter
from .target import dense_weight, is_conv1d, unwrap
from .variant import merge_dtype

_log = logging.getLogger("lora_lite")
FACTOR = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")  # on the factors when they exist
METHODS = ("cat", "svd", *FACTOR, *(f"{m}_svd" for m in FACTOR[1:]))
DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune")  # (and their _svd forms)


# ---------------------------------------------------------------- peft's merge_utils math, on a list of tensors


def _prune_magnitude(t: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return t
    mask = torch.zeros_like(t).reshape(-1)
    mask[torch.topk(t.abs().reshape(-1), k=int(density * t.numel())).indices] = 1
    return t * mask.view_as(t)


def _prune_random(t: torch.Tensor, density: float, gen: torch.Generator) -> torch.Tensor:
    if density >= 1:
        return t
    return t * torch.bernoulli(torch.full_like(t, density), generator=gen) / density


def _mix(method: str, ts: list[torch.Tensor], w: torch.Tensor, density: float | None, gen) -> torch.Tensor:
    """Σ w_i t_i after the method's pruning; ties: only the entries agreeing with the elected sign, averaged."""
    method = method.removesuffix("_svd")
    if method in ("ties", "magnitude_prune"):
        ts = [_prune_magnitude(t, density) for t in ts]
    elif method.startswith("dare"):
        ts = [_prune_random(t, density, gen) for t in ts]
    T = torch.stack(ts)
    wT = T * w.view(-1, *[1] * (T.dim() - 1))
    if not method.endswith("ties"):
        return wT.sum(0)
    keep = T.sign() == torch.where(T.sum(0) >= 0, 1, -1)  # peft's majority_sign_method="total"
    return (wT * keep).sum(0) / keep.sum(0).clamp(min=1.0)


# ---------------------------------------------------------------- the two modes


def _delta(a: LayerAdapter, dt: torch.dtype) -> torch.Tensor:
    """ΔW = W_eff − W0 of one adapter alone on its layer, W0 the base weight before any adapter."""
    st, base = a._lora_lite, a._base
    if st.variant.rewrites_weight:  # its merged_weight maps W_res; ΔW is against the weight it replaced
        guards.require_original(st, "ll.combine (ΔW is taken against the original weight)")
        W0, W_in = (_layout(base, w.to(dt)) for w in (original.original_weight(a), original.residual(a)))
    else:
        W0 = W_in = dense_weight(base, dt)
    b = None if base.bias is None else base.bias.to(dt)
    W, b_eff = st.variant.merged_weight(a, W_in, b)
    if b is not None and b_eff is not None and not torch.equal(b_eff, b):
        raise AdapterError(
            f"ll.combine: adapter {st.adapter!r} ({st.variant.name}) changes the bias of {st.name} (max |Δb| = "
            f"{(b_eff - b).abs().max().item():.3g}); the combined adapter is a lora, which cannot carry a bias "
            "change. Leave that adapter out, or exclude biased layers from it."
        )
    return W - W0


def _layout(base: nn.Module, w: torch.Tensor) -> torch.Tensor:
    """A stored weight as (d_out, d_in) (GPT-2 Conv1D stores it transposed)."""
    return w.t() if is_conv1d(base) else w


def _svd(dW: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(B (d_out, r), A (r, d_in), relative Frobenius error) of the rank-r truncation of dW."""
    U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
    k = min(r, S.numel())
    total = S.square().sum()
    err = 0.0 if total == 0 else (S[k:].square().sum() / total).sqrt().item()
    B = torch.zeros(dW.shape[0], r, dtype=dW.dtype, device=dW.device)
    A = torch.zeros(r, dW.shape[1], dtype=dW.dtype, device=dW.device)
    B[:, :k], A[:k] = U[:, :k] * S[:k], Vh[:k]
    return B, A, err


def _factors(method, stack, weights, density, gen, r_new) -> tuple[torch.Tensor, torch.Tensor]:
    """peft's factor-wise combination on one layer: (B, A) of the new adapter, at scale 1."""
    Bs, As, ss = zip(*(a._lora_lite.variant.delta_factors(a) for a in stack))
    w = [weights[a._lora_lite.adapter] for a in stack]
    if method == "cat":
        A = torch.cat([Ai.float() * wi * si for Ai, wi, si in zip(As, w, ss)])
        B = torch.cat([Bi.float() for Bi in Bs], dim=1)
        pad = r_new - A.shape[0]
        return nn.functional.pad(B, (0, pad)), nn.functional.pad(A, (0, 0, 0, pad))
    ws = [wi * si for wi, si in zip(w, ss)]
    wA = torch.tensor([math.copysign(math.sqrt(abs(v)), v) for v in ws], device=As[0].device)
    wB = torch.tensor([math.sqrt(abs(v)) for v in ws], device=As[0].device)
    A = _mix(method, [t.float() for t in As], wA, density, gen)
    B = _mix(method, [t.float() for t in Bs], wB, density, gen)
    return B, A


# ---------------------------------------------------------------- combine


def combine(
    model: nn.Module,
    weights: dict[str, float],
    name: str,
    method: str = "linear",
    r: int | None = None,
    density: float | None = None,
    seed: int = 0,
    *,
    detach_sources: bool = False,
) -> dict[str, float]:
    """Attach Σ_i weights[i]·(adapter i) as a new lora adapter `name`; return {layer: relative truncation error}.

    method: "linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune" (peft's
    add_weighted_adapter), and "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd" (the
    dense form of each). r: the new rank for the dense mode (default: the largest source rank). density in
    (0, 1]: the fraction kept by ties / dare / magnitude_prune. seed: dare's random masks.
    detach_sources=True detaches the source adapters before attaching the result: needed when a source
    rewrites its layers' weight (pissa, antipasto), which no other adapter may share.
    Every check runs before the model changes; the new adapter is active, the others keep their state.
    """
    state = model_state(model)
    attached = list(state.adapters)
    if not isinstance(weights, dict) or not weights:
        raise AdapterError(f"ll.combine: weights must be a non-empty dict {{adapter name: float}}, got {weights!r}")
    guards.check_known(list(weights), attached, "ll.combine")
    for n, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
            raise AdapterError(f"ll.combine: the weight of adapter {n!r} must be a finite number, got {w!r}")
    guards.check_name(name, attached)
    if method not in METHODS:
        raise AdapterError(f"ll.combine: unknown method {method!r}; methods are {list(METHODS)}")
    if method.removesuffix("_svd") in DENSITY:
        if density is None or isinstance(density, bool) or not isinstance(density, numbers.Real):
            raise AdapterError(f"ll.combine: method {method!r} needs density=... in (0, 1], got {density!r}")
        if not 0 < density <= 1:
            raise AdapterError(f"ll.combine: density must be in (0, 1] (the fraction of entries kept), got {density}")
    elif density is not None:
        raise AdapterError(f"ll.combine: method {method!r} takes no density (got {density}); it is for {DENSITY}")
    if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 1):
        raise AdapterError(f"ll.combine: r must be an integer >= 1, got {r!r}")
    guards.check_flag(detach_sources, "detach_sources")
    for n in weights:
        guards.check_layer_targets_only(state.adapters[n], n, "ll.combine")
    names = [n for n in attached if n in weights]  # attach order
    weights = {n: float(weights[n]) for n in names}
    layers: dict[str, list[LayerAdapter]] = {}
    for lname in _layer_order(model, names):
        layers[lname] = [state.adapters[n].layers[lname] for n in names if lname in state.adapters[n].layers]
    for stack in layers.values():
        for a in stack:
            guards.require_outside_blocks(a._lora_lite, "ll.combine", "(it reads the trained adapters, c = 1)")
    factor = not method.endswith("svd") and all(
        a._lora_lite.variant.delta_factors is not None and not a._lora_lite.variant.rewrites_weight
        for stack in layers.values()
        for a in stack
    )
    if method == "cat" and not factor:
        bad = next(a for s in layers.values() for a in s if a._lora_lite.variant.delta_factors is None)
        raise AdapterError(
            f"ll.combine: method 'cat' stacks low-rank factors, but adapter {bad._lora_lite.adapter!r} "
            f"({bad._lora_lite.variant.name}) has none; use method='svd' (its ΔW truncated to rank r)"
        )
    if factor and len(names) == 1:  # as peft: one adapter is scaled by its weight, whatever the method (exact)
        method, density = "linear", None
    ranks = {n: state.adapters[n].cfg.r for n in names}
    if factor and method != "cat":
        if len(set(ranks.values())) > 1:
            raise AdapterError(
                f"ll.combine: method {method!r} mixes the adapters' factors row by row, which needs one rank; "
                f"the ranks are {ranks}. Use method='cat' or 'svd' (or '{method}_svd')."
            )
        missing = {
            lname: [n for n in names if n not in {a._lora_lite.adapter for a in s}] for lname, s in layers.items()
        }
        missing = {k: v for k, v in missing.items() if v}
        if missing:
            k = next(iter(missing))
            raise AdapterError(
                f"ll.combine: method {method!r} mixes the adapters' factors row by row, which needs every adapter "
                f"on the same layers; {len(missing)} layers differ, e.g. {k} (not targeted by {missing[k]}). "
                f"Use method='cat', 'svd' or '{method}_svd' (an adapter absent from a layer counts as zero there)."
            )
    if not factor and not detach_sources:
        for stack in layers.values():
            for a in stack:
                if a._lora_lite.variant.rewrites_weight:
                    raise AdapterError(
                        f"ll.combine: {a._lora_lite.name} holds adapter {a._lora_lite.adapter!r} "
                        f"({a._lora_lite.variant.name}), which rewrites the layer's weight and must be the only "
                        "adapter there, so the combination cannot be attached beside it. Pass detach_sources=True "
                        "(the sources are detached, the original weight restored, then the combination attached)."
                    )
    if method == "cat":
        r_new = max(sum(a._lora_lite.variant.delta_factors(a)[1].shape[0] for a in s) for s in layers.values())
    elif factor:
        r_new = next(iter(ranks.values()))
    else:
        r_new = r if r is not None else max(ranks.values())
    dev = next(iter(layers.values()))[0].weight.device
    gen = torch.Generator(device=dev).manual_seed(seed)
    tensors, errors = {}, {}
    with torch.no_grad():
        for lname, stack in layers.items():
            if factor:
                B, A = _factors(method, stack, weights, density, gen, r_new)
                err = 0.0
            else:
                dt = functools.reduce(torch.promote_types, [merge_dtype(a) for a in stack])
                dW = [_delta(a, dt) for a in stack]
                w = torch.tensor([weights[a._lora_lite.adapter] for a in stack], dtype=dt, device=dW[0].device)
                mixed = _mix("linear" if method == "svd" else method, dW, w, density, gen)
                B, A, err = _svd(mixed, r_new)
            tensors[f"{lname}.lora_B"], tensors[f"{lname}.lora_A"], errors[lname] = B, A, err
    if not factor and errors:
        worst = max(errors, key=errors.get)
        _log.info(
            f"ll.combine {name!r}: rank-{r_new} SVD truncation, relative error max {errors[worst]:.3g} ({worst}), "
            f"mean {sum(errors.values()) / len(errors):.3g}"
        )
    src = state.adapters[names[0]].cfg
    cfg = LoraLiteConfig(
        variant="lora",
        r=r_new,
        alpha=float(r_new),
        dropout=src.dropout,
        dtype=src.dtype,
        target_names=tuple(f"^{re.escape(n)}$" for n in layers),
        exclude_names=(),
    )
    if detach_sources:
        for n in names:
            for a in state.adapters[n].layers.values():
                original.check_restorable(a, "ll.combine(detach_sources=True) (detach restores it)")
        for n in reversed(names):
            detach(model, n)
    from .io import attach_with_tensors

    attach_with_tensors(unwrap(model), cfg, name, {k: v.to(cfg.dtype) for k, v in tensors.items()}, True)
    return errors


def _layer_order(model: nn.Module, names: list[str]) -> list[str]:
    """The layers any of the adapters targets, in module order."""
    state = model_state(model)
    wanted = {lname for n in names for lname in state.adapters[n].layers}
    return [n for n, _ in unwrap(model).named_modules() if n in wanted]
