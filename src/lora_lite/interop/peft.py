"""Export to and import from peft's on-disk adapter format (`adapter_config.json` + `adapter_model.safetensors`).

export_peft: lora (also rslora), eva and pissa as peft LoRA, dora as LoRA with use_dora, ia3 (ia3_ff
layers as `feedforward_modules`) as IA3, loha / lokr / vera as LOHA / LOKR / VERA, so `peft.PeftModel.from_pretrained(base, dir)` on the
unmodified base reproduces the adapted model. Tensor keys are `base_model.model.<module name>.<tensor>`
(peft 0.21.2 `get_peft_model_state_dict`): lora_A.weight (r, d_in), lora_B.weight (d_out, r),
lora_magnitude_vector (d_out,), ia3_l ((d_out, 1), or (1, d_in) for feed-forward layers).
`target_modules` lists the full module names (peft matches a list entry equal to the module name).
Module names are relative to the model passed in: export from, and serve on, the same model class.
Each variant converts its own tensors (`Variant.peft_type`, `peft_tensors`, `peft_config`): pissa, for one,
is written against the ORIGINAL weight as a rank-2r LoRA (peft's PiSSA conversion, see pissa.py).

import_peft: peft LoRA (incl. rslora, DoRA) and IA3 adapters, attached as lora-lite lora / dora / ia3
(a peft PiSSA adapter saved without conversion, init_lora_weights="pissa", as lora-lite pissa: both
re-derive W_res from the exact SVD of the base weight on load).
The targets are read from the tensor keys (exactly the modules peft adapted, whatever `target_modules`
pattern chose them); ia3's feed-forward split from `feedforward_modules` with peft's own matching rule.
`fan_in_fan_out` needs no handling: peft's lora tensors have the same shapes for GPT-2 Conv1D, and our
layout follows the module. Options lora-lite has no equivalent for (bias training, modules_to_save,
per-layer rank/alpha patterns, ...) raise LoadError.
Only safetensors files are read (no pickle).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import guards
from ..config import _DTYPES, REGISTRY, LoraLiteConfig, get_variant
from ..errors import AdapterError, LoadError
from ..io import attach_with_tensors, write_atomic
from ..named import adapters, model_state, resolve
from ..plan import plan
from ..target import all_finite, is_conv1d, is_linear_like, unwrap

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# peft LoraConfig options with no lora-lite equivalent: import refuses any that is set (truthy)
_LORA_UNSUPPORTED = (
    "lora_bias",
    "modules_to_save",
    "rank_pattern",
    "alpha_pattern",
    "layer_replication",
    "target_parameters",
    "trainable_token_indices",
    "use_qalora",
    "alora_invocation_tokens",
    "use_bdlora",
    "arrow_config",
)


# ---------------------------------------------------------------- export


def _key(name: str, tensor: str) -> str:
    return f"{PREFIX}{name}.{tensor}"


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True).contiguous()


def export_peft(model: nn.Module, path: str | os.PathLike, name: str | None = None) -> Path:
    """Write adapter `name` (may be left out when one is attached) as a peft adapter directory; return it.

    Supported: every variant with a `peft_type` (lora incl. rslora, eva, pissa as LoRA, dora, ia3 / ia3_ff, loha, lokr, vera).
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
    tensors = {_key(n, k): _cpu(t) for n, a in layers.items() for k, t in a._lora_lite.variant.peft_tensors(a).items()}
    if variant.peft_shared_tensors is not None:  # model-level tensors (vera's projections): "base_model.<key>"
        tensors.update({f"base_model.{k}": _cpu(t) for k, t in variant.peft_shared_tensors(layers).items()})
    base = getattr(getattr(unwrap(model), "config", None), "_name_or_path", None)
    config = {
        "peft_type": variant.peft_type,
        "task_type": None,
        "target_modules": sorted(layers),
        "fan_in_fan_out": all(is_conv1d(a) for a in layers.values()),
        **variant.peft_config(cfg, layers),
        "base_model_name_or_path": base or None,
        "inference_mode": True,
        "modules_to_save": None,
    }
    path.mkdir(parents=True, exist_ok=True)
    write_atomic(tensors, {"format": "pt"}, path / WEIGHTS_NAME, save_file)
    tmp = path / f".{CONFIG_NAME}.tmp"
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path / CONFIG_NAME)
    return path


# ---------------------------------------------------------------- import


def _exact(names: list[str]) -> tuple[str, ...]:
    return tuple(f"^{re.escape(n)}$" for n in names)


def _split(key: str, suffixes: tuple[str, ...], path: Path) -> tuple[str, str]:
    for suf in suffixes:
        if key.startswith(PREFIX) and key.endswith("." + suf):
            return key[len(PREFIX) : -len(suf) - 1], suf
    raise LoadError(
        f"{str(path)!r}: tensor {key!r} is not supported by import_peft (expected {PREFIX}<module>.<one of "
        f"{list(suffixes)}>): lora-lite imports LoRA/DoRA on linear layers and IA3 only"
    )


def _import_dtype(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        return dtype
    found = {t.dtype for t in tensors.values()}
    if len(found) == 1 and next(iter(found)) in _DTYPES.values():
        return found.pop()
    return torch.float32


def _lora_plan(pc: dict, tensors: dict, path: Path, dtype) -> tuple[LoraLiteConfig, dict[str, dict[str, Any]]]:
    bad = [k for k in _LORA_UNSUPPORTED if pc.get(k)]
    if pc.get("bias", "none") != "none":
        bad.insert(0, "bias")
    if bad:
        raise LoadError(
            f"{str(path)!r}: peft LoRA option(s) {bad} = {[pc[k] for k in bad]} have no lora-lite equivalent "
            "(lora-lite trains only the adapter tensors, one rank and alpha for every layer); cannot import"
        )
    use_dora = bool(pc.get("use_dora", False))
    variant = "dora" if use_dora else "lora"
    init = pc.get("init_lora_weights", True)
    if init == "pissa" and not use_dora:  # peft re-runs the exact SVD on load: so does our pissa (bit-exact)
        variant = "pissa"
    elif isinstance(init, str) and init.lower().startswith(("pissa", "corda", "olora", "loftq")):
        raise LoadError(
            f"{str(path)!r}: init_lora_weights={init!r}: peft replaced the base weight at init in a way lora-lite "
            "cannot re-derive (only the exact-SVD init 'pissa' without DoRA is supported). Convert it to a plain "
            "LoRA with peft: save_pretrained(dir, path_initial_model_for_weight_conversion=...), and import that"
        )
    suffixes = ("lora_A.weight", "lora_B.weight") + (("lora_magnitude_vector",) if use_dora else ())
    per: dict[str, dict[str, Any]] = {}
    for key, t in tensors.items():
        name, suf = _split(key, suffixes, path)
        per.setdefault(name, {})[{"lora_A.weight": "lora_A", "lora_B.weight": "lora_B"}.get(suf, "lora_m")] = t
    r = int(pc["r"])
    for name, ts in per.items():
        missing = [p for p in ("lora_A", "lora_B") + (("lora_m",) if use_dora else ()) if p not in ts]
        if missing:
            raise LoadError(f"{str(path)!r}: {name}: tensors {missing} are missing")
        if ts["lora_A"].shape[0] != r or ts["lora_B"].shape[1] != r:
            raise LoadError(
                f"{str(path)!r}: {name}: rank {ts['lora_A'].shape[0]} differs from the config's r={r} "
                "(a per-layer rank pattern is not supported)"
            )
    cfg = LoraLiteConfig(
        variant=variant,
        r=r,
        alpha=float(pc.get("lora_alpha", 8)),
        dropout=float(pc.get("lora_dropout", 0.0)),
        dtype=_import_dtype(tensors, dtype),
        target_names=_exact(sorted(per)),
        exclude_names=(),
        variant_kwargs={"use_rslora": True} if pc.get("use_rslora") else {},
    )
    return cfg, per


def _ia3_plan(pc: dict, tensors: dict, path: Path, dtype) -> tuple[LoraLiteConfig, dict[str, dict[str, Any]]]:
    if pc.get("modules_to_save"):
        raise LoadError(f"{str(path)!r}: peft IA3 option modules_to_save={pc['modules_to_save']} is not supported")
    per = {_split(k, ("ia3_l",), path)[0]: {"lora_g": t} for k, t in tensors.items()}
    ff_cfg = pc.get("feedforward_modules") or []
    ff = [  # peft 0.21.2 IA3Model._check_target_module_feedforward (ia3/model.py 184-193)
        n
        for n in sorted(per)
        if (re.fullmatch(ff_cfg, n) if isinstance(ff_cfg, str) else any(n.endswith(t) for t in ff_cfg))
    ]
    for n, ts in per.items():
        g = ts["lora_g"]
        if g.dim() != 2 or g.shape[0 if n in ff else 1] != 1:
            raise LoadError(
                f"{str(path)!r}: {n}: ia3_l has shape {tuple(g.shape)}, expected "
                f"{'(1, d_in) (feed-forward)' if n in ff else '(d_out, 1)'}"
            )
        ts["lora_g"] = g.reshape(-1)  # peft's (d_out, 1) / (1, d_in) -> our 1-D gate
    cfg = LoraLiteConfig(
        variant="ia3",
        dtype=_import_dtype(tensors, dtype),
        target_names=_exact(sorted(per)),
        exclude_names=(),
        variant_kwargs={"feedforward_names": list(_exact(ff))} if ff else {},
    )
    return cfg, per


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
    kind = pc.get("peft_type")
    plans = {"LORA": _lora_plan, "IA3": _ia3_plan}
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
    absent = [n for n in per if n not in modules]
    if absent:
        raise LoadError(
            f"{str(path)!r}: module {absent[0]!r} ({len(absent)} in all) is not in this model; "
            "pass the base model the adapter was made for (the model peft wrapped)"
        )
    odd = [n for n in per if not is_linear_like(modules[n])]
    if odd:
        raise LoadError(f"{str(path)!r}: {odd[0]}: {type(modules[odd[0]]).__name__} is not a linear layer")
    try:
        targets = plan(model, cfg, name)
    except ValueError as e:
        raise LoadError(f"{str(path)!r} does not fit this model: {e}") from None
    for t in targets:  # every check before the model is touched
        unknown = [p for p in per[t.name] if p not in t.specs]
        missing = [p for p, s in t.specs.items() if p not in per[t.name] and not s.buffer]  # buffers: re-derived
        if unknown or missing:
            raise LoadError(
                f"{str(path)!r} does not fit this model: {t.name} has tensors {sorted(per[t.name])} in the file, "
                f"this model's {cfg.variant} needs {sorted(t.specs)}"
            )
        for p, v in per[t.name].items():
            if tuple(v.shape) != tuple(t.specs[p].shape):
                raise LoadError(
                    f"{str(path)!r} does not fit this model: {t.name}.{p} has shape {tuple(v.shape)} in the file, "
                    f"this model needs {tuple(t.specs[p].shape)}"
                )
    tensors = {f"{n}.{p}": v for n, ts in per.items() for p, v in ts.items()}
    return attach_with_tensors(model, cfg, name, tensors, keep_original)
