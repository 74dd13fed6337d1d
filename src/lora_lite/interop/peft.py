"""Export to and import from peft's on-disk adapter format (`adapter_config.json` + `adapter_model.safetensors`).

export_peft: lora (also rslora), eva, pissa and olora as peft LoRA, loftq as peft LoRA with
init_lora_weights="loftq" (peft re-runs its LoftQ init on load), dora as LoRA with use_dora, ia3 (ia3_ff
layers as `feedforward_modules`) as IA3, loha / lokr / vera as LOHA / LOKR / VERA, so
`peft.PeftModel.from_pretrained(base, dir)` on the
unmodified base reproduces the adapted model. Tensor keys are `base_model.model.<module name>.<tensor>`
(peft 0.21.2 `get_peft_model_state_dict`): lora_A.weight (r, d_in), lora_B.weight (d_out, r),
lora_magnitude_vector (d_out,), ia3_l ((d_out, 1), or (1, d_in) for feed-forward layers); on an nn.Embedding
lora_embedding_A (r, vocab) and lora_embedding_B (d, r), on a convolution the kernels (r, c_in, *k), (c_out, r, 1, ...)
and the magnitude (1, c_out, 1, ...).
`target_modules` lists the full module names (peft matches a list entry equal to the module name).
Module names are relative to the model passed in: export from, and serve on, the same model class.
Each variant converts its own tensors (`Variant.peft_type`, `peft_tensors`, `peft_config`): pissa, for one,
is written against the ORIGINAL weight as a rank-2r LoRA (peft's PiSSA conversion, see pissa.py).

import_peft: peft LoRA (incl. rslora, DoRA) and IA3 adapters, attached as lora-lite lora / dora / ia3
(a peft PiSSA, OLoRA or LoftQ adapter saved without conversion, init_lora_weights="pissa" / "olora" /
"loftq", as lora-lite pissa / olora / loftq: both re-derive W_res from the base weight on load, bit-exact).
The targets are read from the tensor keys (exactly the modules peft adapted, whatever `target_modules`
pattern chose them); ia3's feed-forward split from `feedforward_modules` with peft's own matching rule.
`fan_in_fan_out` needs no handling: peft's lora tensors have the same shapes for GPT-2 Conv1D, and our
layout follows the module. How a LoRA / IA3 config maps onto ours: peft_plans.py. Options lora-lite has no
equivalent for (bias training, layer_replication, ...) raise LoadError.
Only safetensors files are read (no pickle).
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import experts, guards
from ..config import REGISTRY, LoraLiteConfig, get_variant
from ..errors import AdapterError, LoadError
from ..io import attach_with_tensors, write_atomic
from ..named import adapter_state_dict, adapters, model_state, resolve
from ..plan import plan
from ..state import ParamAdapter
from ..target import all_finite, is_conv1d, kind_of, unwrap
from .peft_plans import PREFIX, _applies, _exact, _ia3_plan, _import_dtype, _lora_plan

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


# ---------------------------------------------------------------- export


def _key(name: str, tensor: str) -> str:
    return f"{PREFIX}{name}.{tensor}"


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True).contiguous()


def export_peft(model: nn.Module, path: str | os.PathLike, name: str | None = None) -> Path:
    """Write adapter `name` (may be left out when one is attached) as a peft adapter directory; return it.

    Supported: every variant with a `peft_type` (lora incl. rslora, eva, pissa and olora as LoRA,
    loftq as LoftQ, dora, ia3 / ia3_ff, loha, lokr, vera, oft, boft, road, adalora).
    Other variants raise AdapterError.
    """
    from safetensors.torch import save_file

    name = resolve(model, name, "ll.export_peft")
    info = model_state(model).adapters[name]
    cfg, layers = info.cfg, info.layers
    for a in layers.values():
        guards.require_outside_blocks(a._lora_lite, "export_peft", "(it exports the trained adapter, c = 1)")
    variant = get_variant(cfg.variant)
    if variant.peft_type is None:
        exportable = sorted(n for n, v in REGISTRY.items() if v.peft_type is not None)
        raise AdapterError(
            f"export_peft: variant {cfg.variant!r} has no peft LoRA/IA3 equivalent (supported: {', '.join(exportable)}). "
            "To deploy it use ll.merge(model) or ll.merged_state_dict(model) (plain dense weights), or ll.save "
            "for lora-lite's own format."
        )
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise AdapterError(
            f"export_peft: {str(path)!r} is a file; peft adapters are directories (adapter_config.json + "
            f"{WEIGHTS_NAME}). Pass a directory path"
        )
    linear = {n: a for n, a in layers.items() if not isinstance(a, ParamAdapter)}
    params = {n: a for n, a in layers.items() if isinstance(a, ParamAdapter)}
    tensors = {_key(n, k): _cpu(t) for n, a in linear.items() for k, t in a._lora_lite.variant.peft_tensors(a).items()}
    for n, a in params.items():  # peft nests one ParamWrapper per parameter: the first one innermost (base_layer.)
        mine = [p for p, _ in a._base.named_parameters(recurse=False) if f"{n.rpartition('.')[0]}.{p}" in params]
        owner = n.rpartition(".")[0] + ".base_layer" * (len(mine) - 1 - mine.index(a._param))
        tensors.update({_key(owner, k): _cpu(t) for k, t in experts.to_peft(a).items()})
    mts = model_state(model).adapters[name].saved
    sd = adapter_state_dict(model, name)
    tensors.update({_key(m, k): _cpu(sd[f"{m}.{k}"]) for m, sm in mts.items() for k in sm.tensors})
    if variant.peft_shared_tensors is not None:  # model-level tensors (vera's projections): "base_model.<key>"
        tensors.update({f"base_model.{k}": _cpu(t) for k, t in variant.peft_shared_tensors(layers).items()})
    base = getattr(getattr(unwrap(model), "config", None), "_name_or_path", None)
    config = {
        "peft_type": variant.peft_type,
        "task_type": None,
        "target_modules": sorted(linear) if linear or not params else None,
        "fan_in_fan_out": bool(linear) and all(is_conv1d(a) for a in linear.values()),
        **variant.peft_config(cfg, layers),
        **_patterns(variant, cfg, layers),
        "base_model_name_or_path": base or None,
        "inference_mode": True,
        "modules_to_save": sorted(mts) or None,
    }
    if params:
        config["target_parameters"] = sorted(params)
    if variant.peft_type in ("LOHA", "LOKR", "ROAD"):  # their peft configs have no such field (peft would warn)
        del config["fan_in_fan_out"]
    path.mkdir(parents=True, exist_ok=True)
    write_atomic(tensors, {"format": "pt"}, path / WEIGHTS_NAME, save_file)
    tmp = path / f".{CONFIG_NAME}.tmp"
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path / CONFIG_NAME)
    return path


def _patterns(variant, cfg: LoraLiteConfig, layers: dict) -> dict[str, Any]:
    """peft's rank_pattern / alpha_pattern for the layers whose r / alpha differ from the global ones: one exact
    key per layer (peft matches a key against the end of the module name), values as the variant exports them."""
    if not (cfg.rank_pattern or cfg.alpha_pattern):
        return {}
    glob = variant.peft_config(cfg, layers)
    out: dict[str, dict] = {"rank_pattern": {}, "alpha_pattern": {}}
    for n, a in layers.items():
        mine = variant.peft_config(a._lora_lite.cfg, {n: a})
        for field, pattern in (("r", "rank_pattern"), ("lora_alpha", "alpha_pattern"), ("alpha", "alpha_pattern")):
            if field in mine and mine[field] != glob[field]:
                out[pattern][f"^{re.escape(n)}"] = mine[field]
    return out


# ---------------------------------------------------------------- import


def _variant_plan(variant):
    """The plan for a peft_type read by a variant's own `peft_import` hook (loha, lokr, vera, oft, ...)."""

    def plan_(pc: dict, tensors: dict, path: Path, dtype) -> tuple[LoraLiteConfig, dict[str, dict[str, Any]]]:
        bare = {}
        for key, t in tensors.items():
            if not key.startswith("base_model."):
                raise LoadError(f"{str(path)!r}: tensor {key!r} does not start with {PREFIX!r}")
            # per layer: "base_model.model.<module>.<tensor>"; model-level (vera_A): "base_model.<tensor>"
            bare[key.removeprefix(PREFIX) if key.startswith(PREFIX) else key.removeprefix("base_model.")] = t
        try:
            fields, per = variant.peft_import(pc, bare)
        except ValueError as e:
            raise LoadError(f"{str(path)!r}: {e}") from None
        for pattern in ("rank_pattern", "alpha_pattern"):  # keys matching no adapted layer: ignored, as peft does
            if pattern in fields:
                fields[pattern] = {k: v for k, v in fields[pattern].items() if _applies(k, sorted(per))}
        cfg = LoraLiteConfig(
            **fields, dtype=_import_dtype(tensors, dtype), target_names=_exact(sorted(per)), exclude_names=()
        )
        return cfg, per

    return plan_


def import_peft(
    model: nn.Module,
    path: str | os.PathLike,
    name: str = "default",
    *,
    dtype: torch.dtype | None = None,
    allow_nonfinite: bool = False,
    keep_original: bool = True,
) -> list[str]:
    """Attach a peft LoRA / DoRA / IA3 adapter directory to `model` as lora-lite lora / dora / ia3.

    `model` is the plain base model peft's adapter was made for. `dtype`: of the adapter tensors
    (default: the file's). A damaged directory (unreadable config or weights, a missing field, NaN/inf
    values unless `allow_nonfinite=True`) raises `LoadError`. Attached as adapter `name`; returns the targeted
    layer names. On any error the model is left unchanged. keep_original: as in `ll.attach` (a peft PiSSA adapter).
    """
    from safetensors.torch import load_file

    guards.check_flag(keep_original, "keep_original")
    model, path = unwrap(model), Path(path)
    guards.check_name(name, adapters(model))
    if not (path / CONFIG_NAME).is_file():
        raise LoadError(f"{str(path)!r} is not a peft adapter directory (no {CONFIG_NAME})")
    if not (path / WEIGHTS_NAME).is_file():
        raise LoadError(
            f"{str(path)!r} has no {WEIGHTS_NAME} (pickled adapter_model.bin is not read: re-save it with "
            "peft's save_pretrained(safe_serialization=True))"
        )
    try:
        pc = json.loads((path / CONFIG_NAME).read_text())
    except (OSError, ValueError) as e:  # (UnicodeDecodeError and JSONDecodeError are ValueErrors)
        raise LoadError(f"{str(path)!r}: {CONFIG_NAME} is not readable JSON: {e}") from None
    if not isinstance(pc, dict):
        raise LoadError(f"{str(path)!r}: {CONFIG_NAME} must hold a JSON object, got {type(pc).__name__}")
    try:
        tensors = load_file(str(path / WEIGHTS_NAME))
    except Exception as e:  # safetensors raises its own SafetensorError (truncated, bad header) or OSError
        raise LoadError(f"{str(path)!r}: {WEIGHTS_NAME} is not a readable safetensors file: {e}") from None
    if not tensors:
        raise LoadError(f"{str(path)!r}: {WEIGHTS_NAME} holds no tensors")
    # peft saves a targeted embedding's own weight too (save_embedding_layers, for a resized vocabulary): it must be
    # the model's, bit for bit (checked below), and is not part of the adapter
    bases = {
        k[len(PREFIX) : -len(".base_layer.weight")]: tensors.pop(k)
        for k in list(tensors)
        if k.endswith(".base_layer.weight")
    }
    kind = pc.get("peft_type")
    plans = {"LORA": functools.partial(_lora_plan, model=model), "IA3": _ia3_plan}
    plans.update({v.peft_type: _variant_plan(v) for v in REGISTRY.values() if v.peft_import is not None})
    if kind not in plans:
        raise LoadError(
            f"{str(path)!r}: peft_type {kind!r} is not supported by import_peft (supported: {', '.join(sorted(plans))})"
        )
    try:
        cfg, per = plans[kind](pc, tensors, path, dtype)
    except LoadError:
        raise
    except (KeyError, TypeError, ValueError) as e:  # a missing or ill-typed field (r, lora_alpha, ...)
        raise LoadError(f"{str(path)!r}: {CONFIG_NAME} has a missing or invalid field: {e!r}") from None
    if not allow_nonfinite:
        for layer, ts in per.items():
            for p, v in ts.items():
                if not all_finite(v):
                    raise LoadError(
                        f"{str(path)!r}: {layer}: {p} contains NaN or inf values; "
                        "pass allow_nonfinite=True to import it anyway"
                    )
    modules = dict(model.named_modules())
    tmodules = {n for n, ts in per.items() if not any(k.startswith("lora_") for k in ts)}  # modules_to_save
    params = {n for n in per if n not in modules and n.rpartition(".")[0] in modules}  # target_parameters
    absent = [n for n in per if n not in modules and n not in params]
    if absent:
        raise LoadError(
            f"{str(path)!r}: module {absent[0]!r} ({len(absent)} in all) is not in this model; "
            "pass the base model the adapter was made for (the model peft wrapped)"
        )
    changed = [n for n, w in bases.items() if n not in modules or not torch.equal(w, modules[n].weight.detach().cpu())]
    if changed:
        raise LoadError(
            f"{str(path)!r}: the file holds a base weight for {changed[0]!r} (peft's save_embedding_layers) that differs "
            "from this model's: the adapter was trained on other (e.g. resized) embeddings; load the model they belong to"
        )
    odd = [n for n in per if n in modules and n not in tmodules and kind_of(modules[n]) is None]
    if odd:
        raise LoadError(
            f"{str(path)!r}: {odd[0]}: {type(modules[odd[0]]).__name__} is not a layer lora-lite adapts "
            "(linear, nn.Embedding, nn.Conv1d/2d/3d)"
        )
    try:
        targets = plan(model, cfg, name)
    except ValueError as e:
        raise LoadError(f"{str(path)!r} does not fit this model: {e}") from None
    for t in targets:  # every check before the model is touched
        if kind_of(t.layer) == "conv" and cfg.variant in ("lora", "dora") and any(d != 1 for d in t.layer.dilation):
            raise LoadError(
                f"{str(path)!r}: {t.name}: dilation={t.layer.dilation}: peft 0.21.2's lora_A ignores the layer's "
                "dilation, lora-lite's uses it; cannot import"
            )
        unknown = [p for p in per[t.name] if p not in t.specs]
        missing = [p for p, s in t.specs.items() if p not in per[t.name] and not s.buffer]  # buffers: re-derived
        if unknown or missing:
            raise LoadError(
                f"{str(path)!r} does not fit this model: {t.name} has tensors {sorted(per[t.name])} in the file, "
                f"this model's {cfg.variant} needs {sorted(t.specs)}"
            )
        for p, v in per[t.name].items():
            if v.dim() > len(t.specs[p].shape) and v.numel() == math.prod(t.specs[p].shape):
                v = per[t.name][p] = v.reshape(t.specs[p].shape)  # a conv's (r, c_in, *k), (c_out, r, 1, ...)
            if tuple(v.shape) != tuple(t.specs[p].shape):
                raise LoadError(
                    f"{str(path)!r} does not fit this model: {t.name}.{p} has shape {tuple(v.shape)} in the file, "
                    f"this model needs {tuple(t.specs[p].shape)}"
                )
    for n in tmodules:
        have = modules[n].state_dict()
        bad = [k for k in have if k not in per[n] or tuple(per[n][k].shape) != tuple(have[k].shape)]
        bad += [k for k in per[n] if k not in have]
        if bad:
            raise LoadError(
                f"{str(path)!r}: modules_to_save {n}.{bad[0]}: missing, unexpected or of another shape than this model's"
            )
    tensors = {f"{n}.{p}": v for n, ts in per.items() for p, v in ts.items()}
    return attach_with_tensors(model, cfg, name, tensors, keep_original)
