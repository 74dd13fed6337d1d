"""How a peft LoRA or IA3 `adapter_config.json` and its tensors map onto a lora-lite config and tensors.

`_lora_plan` (LoRA, rsLoRA, DoRA, the pissa / olora / loftq inits, embeddings and convolutions, MoE expert
weights, rank_pattern / alpha_pattern, modules_to_save) and `_ia3_plan` return (LoraLiteConfig,
{module name: {our tensor name: tensor}}); interop/peft.py's `import_peft` checks the result against the
model and attaches it. Other peft types are read by their variant's own `peft_import` hook.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import experts
from ..config import _DTYPES, LoraLiteConfig
from ..errors import LoadError

PREFIX = "base_model.model."


# peft LoraConfig options with no lora-lite equivalent: import refuses any that is set (truthy)
_LORA_UNSUPPORTED = (
    "lora_bias",
    "layer_replication",
    "trainable_token_indices",
    "use_qalora",
    "alora_invocation_tokens",
    "use_bdlora",
    "arrow_config",
    "ensure_weight_tying",  # an adapter on a tied lm_head too, sharing the embedding's A and B
)


def _exact(names: list[str]) -> tuple[str, ...]:
    return tuple(f"^{re.escape(n)}$" for n in names)


def _split(key: str, suffixes: tuple[str, ...], path: Path) -> tuple[str, str]:
    for suf in suffixes:
        if key.startswith(PREFIX) and key.endswith("." + suf):
            return key[len(PREFIX) : -len(suf) - 1], suf
    raise LoadError(
        f"{str(path)!r}: tensor {key!r} is not supported by import_peft (expected {PREFIX}<module>.<one of "
        f"{list(suffixes)}>): lora-lite imports LoRA/DoRA (linear, embedding, conv layers) and IA3 only"
    )


def _import_dtype(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        return dtype
    found = {t.dtype for t in tensors.values()}
    if len(found) == 1 and next(iter(found)) in _DTYPES.values():
        return found.pop()
    return torch.float32


def _lora_plan(
    pc: dict, tensors: dict, path: Path, dtype, model: nn.Module | None = None
) -> tuple[LoraLiteConfig, dict[str, dict[str, Any]]]:
    bad = [k for k in _LORA_UNSUPPORTED if pc.get(k)]
    if pc.get("bias", "none") != "none":
        bad.insert(0, "bias")
    if bad:
        raise LoadError(
            f"{str(path)!r}: peft LoRA option(s) {bad} = {[pc[k] for k in bad]} have no lora-lite equivalent "
            "(lora-lite trains only the adapter tensors and modules_to_save); cannot import"
        )
    use_dora = bool(pc.get("use_dora", False))
    variant = "dora" if use_dora else "lora"
    init = pc.get("init_lora_weights", True)
    kwargs: dict[str, Any] = {}
    # peft re-runs these inits on the base weight on load, and so do ours (deterministic: bit-exact in fp32)
    init = "olora" if isinstance(init, str) and init.lower() == "olora" else init  # (peft: case-insensitive)
    if init in ("pissa", "olora", "loftq") and not use_dora:
        variant = init
        if init == "loftq":
            lq = pc.get("loftq_config") or {}
            kwargs = {"loftq_bits": int(lq.get("loftq_bits", 4)), "loftq_iter": int(lq.get("loftq_iter", 1))}
    elif isinstance(init, str) and init.lower().startswith(("pissa", "corda", "olora", "loftq")):
        raise LoadError(
            f"{str(path)!r}: init_lora_weights={init!r}{' with use_dora' if use_dora else ''}: peft replaced the "
            "base weight at init in a way lora-lite cannot re-derive (supported: 'pissa' (exact SVD), 'olora' and "
            "'loftq', without DoRA). Convert it to a plain LoRA with peft: save_pretrained(dir, "
            "path_initial_model_for_weight_conversion=...), and import that"
        )
    mts = _peft_modules_to_save(pc, model)
    saved_tensors: dict[str, dict[str, Any]] = {}
    for key in list(tensors):
        m = next((m for m in mts if key.startswith(f"{PREFIX}{m}.")), None)
        if m is not None:
            saved_tensors.setdefault(m, {})[key[len(PREFIX) + len(m) + 1 :]] = tensors.pop(key)
    empty = [m for m in mts if m not in saved_tensors]
    if empty:
        raise LoadError(
            f"{str(path)!r}: modules_to_save {pc['modules_to_save']} selects {empty[0]} in this model, but the weights "
            f"file has no tensors for it ({PREFIX}{empty[0]}.*): the adapter was made for another model, or is damaged"
        )
    ours = {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B", "lora_embedding_A": "lora_A"}
    ours.update({"lora_embedding_B": "lora_B"}, **({"lora_magnitude_vector": "lora_m"} if use_dora else {}))
    per: dict[str, dict[str, Any]] = {}
    for key, t in tensors.items():
        name, suf = _split(key, tuple(ours), path)
        per.setdefault(name, {})[ours[suf]] = t
    per, params = _peft_param_targets(pc, per, model, path)
    ranks = {}
    for name, ts in per.items():
        missing = [p for p in ("lora_A", "lora_B") + (("lora_m",) if use_dora else ()) if p not in ts]
        if missing:
            raise LoadError(f"{str(path)!r}: {name}: tensors {missing} are missing")
        if name in params:  # peft's (E·r, d_in), (d_out, r·E) -> ours (E, r, d_in), (E, d_out, r)
            E = params[name]
            if ts["lora_A"].shape[0] % E or ts["lora_B"].shape[1] != ts["lora_A"].shape[0]:
                raise LoadError(f"{str(path)!r}: {name}: lora_A / lora_B shapes do not fit {E} experts")
            ts["lora_A"], ts["lora_B"] = experts.from_peft(ts["lora_A"], ts["lora_B"], E)
            ranks[name] = ts["lora_A"].shape[1]
        else:
            ranks[name] = ts["lora_A"].shape[0]
    linear = sorted(n for n in per if n not in params)
    names = list(per)
    cfg = LoraLiteConfig(
        variant=variant,
        r=int(pc["r"]),
        alpha=float(pc.get("lora_alpha", 8)),
        dropout=float(pc.get("lora_dropout", 0.0)),
        dtype=_import_dtype({**tensors, **{k: v for ts in saved_tensors.values() for k, v in ts.items()}}, dtype),
        target_names=_exact(linear),
        target_roles=("reader", "writer") if linear else (),
        exclude_names=(),
        variant_kwargs={**kwargs, **({"use_rslora": True} if pc.get("use_rslora") else {})},
        target_parameters=_exact(sorted(params)),
        # keys matching no target never applied in peft either (it warns): left out, as lora-lite refuses them
        rank_pattern={k: v for k, v in (pc.get("rank_pattern") or {}).items() if _applies(k, names)},
        alpha_pattern={k: v for k, v in (pc.get("alpha_pattern") or {}).items() if _applies(k, names)},
        modules_to_save=_exact(mts),
    )
    for name, r in ranks.items():
        if cfg.for_layer(name).r != r:
            raise LoadError(
                f"{str(path)!r}: {name}: rank {r} differs from the config's r={cfg.for_layer(name).r} for this layer "
                "(r, or its rank_pattern entry)"
            )
    per.update(saved_tensors)
    return cfg, per


def _applies(key: str, names: list[str]) -> bool:
    return any(re.match(rf"(.*\.)?({key})$", n) for n in names)


def _peft_modules_to_save(pc: dict, model: nn.Module | None) -> list[str]:
    """The modules peft wraps for `modules_to_save` (peft 0.21.2 `_set_trainable`: a name ending with an entry),
    outermost first."""
    entries = pc.get("modules_to_save") or []
    if not entries or model is None:
        return []
    out: list[str] = []
    for n, _ in model.named_modules():
        if n and any(n.endswith(e) for e in entries) and not any(n.startswith(o + ".") for o in out):
            out.append(n)
    return out


def _peft_param_targets(pc: dict, per: dict, model: nn.Module | None, path: Path) -> tuple[dict, dict[str, int]]:
    """peft's `target_parameters` keys `<owner>(.base_layer)*` -> `<owner>.<param>` (peft nests one ParamWrapper
    per parameter, the first of the owner's parameters innermost), and {that name: number of experts}."""
    want = pc.get("target_parameters") or []
    if not want or model is None:
        return per, {}
    modules = dict(model.named_modules())
    out, params = {}, {}
    for name, ts in per.items():
        owner, depth = name, 0
        while owner.endswith(".base_layer"):
            owner, depth = owner[: -len(".base_layer")], depth + 1
        m = modules.get(owner)
        mine = [] if m is None else [
            p for p, _ in m.named_parameters(recurse=False)
            if any(f"{owner}.{p}" == t or f"{owner}.{p}".endswith("." + t) for t in want)
        ]  # fmt: skip
        if not mine:
            out[name] = ts
            continue
        if depth >= len(mine):
            raise LoadError(f"{str(path)!r}: {name}: more nested base_layer than targeted parameters of {owner}")
        pname = mine[len(mine) - 1 - depth]
        p = m._parameters[pname]
        if p.dim() != 3:
            raise LoadError(
                f"{str(path)!r}: target_parameters {owner}.{pname} has {p.dim()} dimensions; lora-lite adapts 3-D "
                "expert weights only"
            )
        out[f"{owner}.{pname}"], params[f"{owner}.{pname}"] = ts, p.shape[0]
    return out, params


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
