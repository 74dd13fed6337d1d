"""Export to and import from peft's on-disk adapter format (`adapter_config.json` + `adapter_model.safetensors`).

export_peft: lora (also rslora), eva and pissa as peft LoRA, dora as LoRA with use_dora, ia3 (ia3_ff
layers as `feedforward_modules`) as IA3, so `peft.PeftModel.from_pretrained(base, dir)` on the
unmodified base reproduces the adapted model. Tensor keys are `base_model.model.<module name>.<tensor>`
(peft 0.21.2 `get_peft_model_state_dict`): lora_A.weight (r, d_in), lora_B.weight (d_out, r),
lora_magnitude_vector (d_out,), ia3_l ((d_out, 1), or (1, d_in) for feed-forward layers).
`target_modules` lists the full module names (peft matches a list entry equal to the module name).
Module names are relative to the model passed in: export from, and serve on, the same model class.
pissa is written against the ORIGINAL weight as a rank-2r LoRA (peft's PiSSA conversion, see pissa.py).

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
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapter import (
    AdapterError,
    LoadError,
    _drop_originals,
    _plan,
    _state,
    _write_atomic,
    attach,
    detach,
    original_weight,
    require_original,
    require_outside_blocks,
    targets,
)
from .config import _DTYPES, LoraLiteConfig
from .target import all_finite, dense_weight, is_conv1d, is_linear_like, unwrap

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_LORA_LIKE = ("lora", "eva", "pissa", "dora")
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


@torch.no_grad()
def _pissa_initial(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(A₀, B₀) with s·B₀A₀ = W − W_res: the principal part pissa moved out of the weight at attach."""
    require_original(layer, "export_peft (pissa's B₀A₀ = (W − W_res)/s)")
    st = layer._lora_lite
    W0 = original_weight(layer, cache=False).float()  # (raises if W_res was overwritten since attach)
    W0 = W0.t() if is_conv1d(layer) else W0
    U, S, Vh = torch.linalg.svd((W0 - dense_weight(layer)) / st.scale, full_matrices=False)
    r = st.cfg.r
    sqrt_s = S[:r].sqrt()
    return sqrt_s[:, None] * Vh[:r], U[:, :r] * sqrt_s


def _export_lora(model: nn.Module, cfg: LoraLiteConfig) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    rslora = bool(cfg.variant_kwargs.get("use_rslora", False))
    r, alpha = cfg.r, cfg.alpha
    tensors = {}
    for name, layer in targets(model).items():
        A, B = layer.lora_A, layer.lora_B
        if cfg.variant == "pissa":  # ΔW = s·(B A − B₀ A₀) against the original weight, rank 2r
            A0, B0 = _pissa_initial(layer)
            A = torch.cat([A.float(), A0], dim=0).to(A.dtype)
            B = torch.cat([B.float(), -B0], dim=1).to(B.dtype)
        tensors[_key(name, "lora_A.weight")] = _cpu(A)
        tensors[_key(name, "lora_B.weight")] = _cpu(B)
        if cfg.variant == "dora":
            tensors[_key(name, "lora_magnitude_vector")] = _cpu(layer.lora_m)
    if cfg.variant == "pissa":  # same scaling at rank 2r: alpha/r -> 2alpha/2r, alpha/√r -> √2·alpha/√(2r)
        r, alpha = 2 * r, alpha * (math.sqrt(2) if rslora else 2)
    layers = targets(model).values()
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": cfg.dropout,
        "use_rslora": rslora,
        "use_dora": cfg.variant == "dora",
        "target_modules": sorted(targets(model)),
        "fan_in_fan_out": all(is_conv1d(layer) for layer in layers),
        "bias": "none",
        "init_lora_weights": True,
    }
    return config, tensors


def _export_ia3(model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    tensors, ff = {}, []
    for name, layer in targets(model).items():
        g = layer.lora_g
        if layer._lora_lite.variant.name == "ia3_ff":
            ff.append(name)
            tensors[_key(name, "ia3_l")] = _cpu(g.reshape(1, -1))
        else:
            tensors[_key(name, "ia3_l")] = _cpu(g.reshape(-1, 1))
    config = {
        "peft_type": "IA3",
        "task_type": None,
        "target_modules": sorted(targets(model)),
        "feedforward_modules": sorted(ff),
        "fan_in_fan_out": all(is_conv1d(layer) for layer in targets(model).values()),
        "init_ia3_weights": True,
    }
    return config, tensors


def export_peft(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the attached adapter as a peft adapter directory; return the directory.

    Supported: lora (rslora), eva, pissa (as LoRA), dora, ia3 / ia3_ff. Other variants raise AdapterError.
    """
    from safetensors.torch import save_file

    state = _state(model)
    cfg = state.cfg
    for layer in state.layers.values():
        require_outside_blocks(layer, "export_peft", "(it exports the trained adapter, c = 1)")
    if cfg.variant in _LORA_LIKE:
        config, tensors = _export_lora(model, cfg)
    elif cfg.variant in ("ia3", "ia3_ff"):
        config, tensors = _export_ia3(model)
    else:
        raise AdapterError(
            f"export_peft: variant {cfg.variant!r} has no peft LoRA/IA3 equivalent (supported: "
            f"{', '.join(_LORA_LIKE)}, ia3, ia3_ff). To deploy it use ll.merge(model) or ll.merged_state_dict(model) "
            "(plain dense weights), or ll.save for lora-lite's own format."
        )
    base = getattr(getattr(model, "config", None), "_name_or_path", None)
    config.update(base_model_name_or_path=base or None, inference_mode=True, modules_to_save=None)
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise AdapterError(
            f"export_peft: {str(path)!r} is a file; peft adapters are directories (adapter_config.json + "
            f"{WEIGHTS_NAME}). Pass a directory path"
        )
    path.mkdir(parents=True, exist_ok=True)
    _write_atomic(tensors, {"format": "pt"}, path / WEIGHTS_NAME, save_file)
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


def import_peft(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    allow_nonfinite: bool = False,
    keep_original: bool = True,
) -> list[str]:
    """Attach a peft LoRA / DoRA / IA3 adapter directory to `model` as lora-lite lora / dora / ia3.

    `model` is the plain base model peft's adapter was made for. `dtype`: of the adapter tensors
    (default: the file's). A damaged directory (unreadable config or weights, a missing field, NaN/inf
    values unless `allow_nonfinite=True`) raises `LoadError`. Returns the targeted layer names. On any
    error the model is left unchanged. keep_original: as in `ll.attach` (a peft PiSSA adapter).
    """
    from safetensors.torch import load_file

    if not isinstance(keep_original, bool):
        raise AdapterError(f"keep_original must be True or False, got {keep_original!r}")

    model, path = unwrap(model), Path(path)
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
    if kind not in plans:
        raise LoadError(f"{str(path)!r}: peft_type {kind!r} is not supported by import_peft (LORA incl. DoRA, IA3)")
    try:
        cfg, per = plans[kind](pc, tensors, path, dtype)
    except LoadError:
        raise
    except (KeyError, TypeError, ValueError) as e:  # a missing or ill-typed field (r, lora_alpha, ...)
        raise LoadError(f"{str(path)!r}: {CONFIG_NAME} has a missing or invalid field: {e!r}") from None
    if not allow_nonfinite:
        for name, ts in per.items():
            for p, v in ts.items():
                if not all_finite(v):
                    raise LoadError(
                        f"{str(path)!r}: {name}: {p} contains NaN or inf values; "
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
        plan = _plan(model, cfg)
    except ValueError as e:
        raise LoadError(f"{str(path)!r} does not fit this model: {e}") from None
    for t in plan:  # every check before the model is touched
        for p, v in per[t.name].items():
            if tuple(v.shape) != tuple(t.specs[p].shape):
                raise LoadError(
                    f"{str(path)!r} does not fit this model: {t.name}.{p} has shape {tuple(v.shape)} in the file, "
                    f"this model needs {tuple(t.specs[p].shape)}"
                )
    names = attach(model, cfg)
    try:
        with torch.no_grad():
            for name, layer in targets(model).items():
                for p, v in per[name].items():
                    getattr(layer, p).copy_(v)
    except BaseException:
        detach(model)
        raise
    if not keep_original:
        _drop_originals(model)
    return names
