"""Hotswap: `ll.load(model, path, name="x", replace=True)` copies a file's tensors into the attached adapter "x".

Nothing is attached, detached or re-hooked: the adapter's tensors keep their identity (same storage, same
shapes), so a `torch.compile`d model keeps its graph (dynamo guards on tensor metadata and on the Python
floats the hooks read, never on tensor values) and an optimizer holding the tensors keeps them.

What may differ between the file and the slot:

- nothing but the tensor values, for every variant (same config: variant, r, alpha, variant_kwargs, dropout,
  dtype, the same layers);
- for additive low-rank variants (`Variant.delta_factors`: lora, eva), also r and alpha (and use_rslora): a
  rank below the slot's is zero-padded into it (A's extra rows and B's extra columns are zero, so s·B A is
  unchanged), as peft's `prepare_model_for_compiled_hotswap(target_rank=...)`; the scale stays the slot's
  Python float and the ratio s_file / s_slot is folded into B (peft turns the scale into a tensor instead).

Anything else (another variant, other layers, a rank beyond the slot, non-finite values, another base
weight) raises before the first tensor is written: the adapter is unchanged.
"""

from __future__ import annotations

import dataclasses
import os

import torch
from torch import nn

from . import guards
from .config import LoraLiteConfig
from .errors import LoadError
from .named import adapter_state_dict, model_state
from .target import all_finite, fingerprint, unwrap


def _resizable(cfg: LoraLiteConfig, slot_layers: dict) -> bool:
    """Additive low-rank (s·B A on lora_A, lora_B), no rewritten weight: rank and scale may change."""
    return all(
        a._lora_lite.variant.delta_factors is not None
        and not a._lora_lite.variant.rewrites_weight
        and set(a._lora_lite.names) == {"lora_A", "lora_B"}
        for a in slot_layers.values()
    )


def swap_in(
    model: nn.Module,
    path: str | os.PathLike,
    cfg: LoraLiteConfig,
    fps: dict[str, str],
    tensors: dict[str, torch.Tensor],
    name: str,
    allow_nonfinite: bool = False,
) -> list[str]:
    """Copy `tensors` (a file read by io._read) into the attached adapter `name`, in place; every check first."""
    model = unwrap(model)
    state = model_state(model)
    guards.check_known([name], list(state.adapters), "ll.load(..., replace=True)")
    info = state.adapters[name]
    guards.check_layer_targets_only(info, name, "ll.load(replace=True)")
    where = f"ll.load(replace=True): {str(path)!r} into adapter {name!r}"
    if cfg.variant != info.cfg.variant:
        raise LoadError(f"{where}: the file holds a {cfg.variant!r} adapter, the slot is {info.cfg.variant!r}")
    for a in info.layers.values():
        guards.require_outside_blocks(a._lora_lite, "ll.load(replace=True)", "(it changes the adapter's tensors)")
    resizable = _resizable(cfg, info.layers)
    ignore = dict(r=0, alpha=0.0, variant_kwargs={}) if resizable else {}
    kw_file = {k: v for k, v in cfg.variant_kwargs.items() if not (resizable and k == "use_rslora")}
    kw_slot = {k: v for k, v in info.cfg.variant_kwargs.items() if not (resizable and k == "use_rslora")}
    diff = [
        f.name
        for f in dataclasses.fields(LoraLiteConfig)
        if f.name not in ("target_roles", "target_names", "exclude_names", "layers", "dtype", *ignore)
        and getattr(cfg, f.name) != getattr(info.cfg, f.name)
    ] + (["variant_kwargs"] if kw_file != kw_slot else [])
    if diff:
        hint = "" if resizable else f" (only {cfg.variant}'s tensor values can be swapped; r and alpha too for lora)"
        raise LoadError(
            f"{where}: the config differs in {sorted(set(diff))}: file {[getattr(cfg, d) for d in diff]}, "
            f"slot {[getattr(info.cfg, d) for d in diff]}{hint}"
        )
    live = adapter_state_dict(model, name)
    have, got = set(info.layers), {k.rsplit(".", 1)[0] for k in tensors}
    if have != got:
        missing, extra = sorted(have - got), sorted(got - have)
        raise LoadError(
            f"{where}: the file and the slot target different layers: "
            + (
                f"{missing[0]} is not in the file ({len(missing)} missing"
                if missing
                else f"{extra[0]} is not in the slot ("
            )
            + f", {len(extra)} extra); attach the slot with the file's targeting, or load it as a new adapter"
        )
    if set(live) != set(tensors):
        k = sorted(set(live) ^ set(tensors))[0]
        raise LoadError(f"{where}: tensor {k!r} is in only one of the file and the slot")
    for lname, a in info.layers.items():
        st = a._lora_lite
        want = fps.get(lname)
        have = st.fingerprint or (fingerprint(a._base) if want and not st.variant.rewrites_weight else None)
        if want and have and want != have:
            raise LoadError(
                f"{where}: {lname}: the file was made on another base weight (fingerprint {want}, here {have})"
            )
    for k, v in live.items():
        t = tensors[k]
        if t.dtype != v.dtype:
            raise LoadError(f"{where}: {k}: dtype {t.dtype} in the file, the slot holds {v.dtype}")
        if tuple(t.shape) != tuple(v.shape):
            grow = (
                resizable
                and t.dim() == 2
                and (
                    k.endswith("lora_A")
                    and t.shape[1] == v.shape[1]
                    or k.endswith("lora_B")
                    and t.shape[0] == v.shape[0]
                )
            )
            r_f, r_s = (t.shape[0], v.shape[0]) if k.endswith("lora_A") else (t.shape[-1], v.shape[-1])
            if not grow or r_f > r_s:
                why = (
                    f"rank {r_f} is beyond the slot's {r_s}; attach the slot with r >= {r_f}"
                    if grow
                    else "shapes differ"
                )
                raise LoadError(
                    f"{where}: {k}: shape {tuple(t.shape)} in the file, the slot holds {tuple(v.shape)} ({why})"
                )
        a = info.layers[k.rsplit(".", 1)[0]]
        frozen = a._lora_lite.variant.rewrites_weight and k.rsplit(".", 1)[1] not in a._lora_lite.trainable
        if frozen and not torch.equal(t.to(v.device), v):  # antipasto's U, S, Vh define the residual weight
            raise LoadError(f"{where}: {k}: the file's frozen tensor differs from the slot's (another residual split)")
        if not allow_nonfinite and not all_finite(t):
            raise LoadError(f"{where}: {k}: contains NaN or inf values; pass allow_nonfinite=True to load it anyway")
    with torch.no_grad():  # every check passed: now write
        for lname, a in info.layers.items():
            ratio = cfg.scale / a._lora_lite.scale
            for p in a._lora_lite.names:
                v, t = getattr(a, p), tensors[f"{lname}.{p}"].to(getattr(a, p).device)
                if p == "lora_B" and resizable and ratio != 1.0:
                    t = t * ratio
                if v.shape == t.shape:
                    v.copy_(t)
                else:
                    v.zero_()
                    (v[: t.shape[0]] if p == "lora_A" else v[:, : t.shape[1]]).copy_(t)
    return list(info.layers)
