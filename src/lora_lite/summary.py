"""`summary(model)`: a readable table of what the adapters target (or would target) and what they train.

One row per adapter per target layer: layer name, adapter name, role, variant (after routing, e.g.
ia3 -> ia3_ff), d_in -> d_out, the base layer's type and weight dtype, and the adapter's trainable
parameters on that layer; then one line per adapter (variant, r, alpha, dtype, active or not, targets
per role) and the totals: trainable parameters and their share of all the model's parameters.
bitsandbytes 4-bit weights are counted as d_in·d_out parameters (two per packed byte, whatever the storage
dtype: `quant_storage=torch.bfloat16` packs four per element), as peft does.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from torch import nn

from .config import LoraLiteConfig
from .named import is_attached, model_state
from .plan import plan
from .target import dims, unwrap


def _base_numel(model: nn.Module) -> int:
    """Every parameter that is not an adapter tensor, 4-bit packed weights counted unpacked."""
    n = 0
    for name, p in model.named_parameters():
        if ".lora_lite." in f".{name}" or ".lora_lite_params." in f".{name}":
            continue
        n += p.numel() * (2 * p.element_size() if type(p).__name__ == "Params4bit" else 1)  # two 4-bit per byte
    return n


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _rows(model: nn.Module, cfg: LoraLiteConfig | None) -> tuple[list[tuple], dict[str, tuple], bool]:
    """Rows (layer, adapter, role, variant, d_in, d_out, base layer, trainable); per adapter (cfg, active,
    keep_original dropped); whether attached."""
    if cfg is None and not is_attached(model):
        raise ValueError(
            "no lora-lite adapter is attached to this model: call ll.summary(model) after ll.attach, "
            "or ll.summary(model, cfg) to preview what attach(model, cfg) would target"
        )
    if cfg is not None and not is_attached(model):
        rows = [
            (t.name, "default", t.role, t.variant.name, *_dims(t), _label(t.layer, t.param),
             sum(_numel(s.shape) for s in t.specs.values() if s.trainable and not s.buffer))
            for t in plan(model, cfg)
        ]  # fmt: skip
        return rows, {"default": (cfg, True, False)}, False
    rows, infos = [], {}
    for name, info in model_state(model).adapters.items():
        dropped = any(a._lora_lite.original_dropped for a in info.layers.values())
        infos[name] = (info.cfg, info.active, dropped)
        for layer, a in info.layers.items():
            st = a._lora_lite
            n = sum(getattr(a, p).numel() for p in st.trainable)
            rows.append(
                (layer, name, st.role, st.variant.name, *dims(a), _label(a._base, getattr(a, "_param", None)), n)
            )
    return rows, infos, True


def _label(layer: nn.Module, param: str | None) -> str:
    """The base column: the layer's type and weight dtype (for an expert weight: the owner's type)."""
    w = layer.weight if param is None else layer._parameters[param]
    return f"{type(layer).__name__} {str(w.dtype).removeprefix('torch.')}"


def _dims(t: Any) -> tuple[int, int]:
    if t.param is None:
        return dims(t.layer)
    E, a, b = t.layer._parameters[t.param].shape
    return (a, b) if getattr(t.layer, "is_transposed", False) else (b, a)


def summary(model: nn.Module, cfg: LoraLiteConfig | None = None) -> str:
    """A table of the attached adapters' targets, or, with `cfg` and nothing attached, of what attach would do.

    Nothing in the model is changed.
    """
    model = unwrap(model)
    rows, infos, attached = _rows(model, cfg)
    trainable = sum(r[-1] for r in rows)
    whole = {  # modules_to_save: adapter -> [(module, its parameters' size)]
        n: [
            (m, sum(t.numel() for t in sm.tensors.values() if isinstance(t, nn.Parameter))) for m, sm in i.saved.items()
        ]
        for n, i in (model_state(model).adapters.items() if attached else ())
    }
    trainable += sum(k for n, ms in whole.items() if infos[n][1] for _, k in ms)
    total = _base_numel(model) + (
        sum(
            p.numel()
            for n, p in model.named_parameters()
            if ".lora_lite." in f".{n}" or ".lora_lite_params." in f".{n}"
        )
        if attached
        else trainable
    )
    head = ("layer", "adapter", "role", "variant", "shape", "base", "trainable")
    body = [
        (layer, name, role, var, f"{d_in} -> {d_out}", base, f"{n:,}")
        for layer, name, role, var, d_in, d_out, base, n in rows
    ]  # fmt: skip
    widths = [max(len(str(r[i])) for r in [head, *body]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" if i < len(head) - 1 else f"{{:>{w}}}" for i, w in enumerate(widths))
    lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in body]
    for name, (c, on, dropped) in infos.items():
        roles = Counter(r[2] for r in rows if r[1] == name)
        roles = ", ".join(
            f"{roles[k]} {k}" for k in ("reader", "writer", "inner", "expert", "embedding", "conv") if roles[k]
        )
        state = ("active" if on else "inactive") if attached else "preview (not attached)"
        lines.append(
            f"{name!r} {state}: variant={c.variant} r={c.r} alpha={c.alpha} "
            f"dtype={str(c.dtype).removeprefix('torch.')}; {sum(r[1] == name for r in rows)} targets ({roles})"
        )
        if whole.get(name):
            lines.append(
                f"{name!r} modules_to_save (trained whole): " + ", ".join(f"{m} ({k:,})" for m, k in whole[name])
            )
        if dropped:
            lines.append(
                f"{name!r}: original weights not kept (keep_original=False): ll.detach, ll.disabled, and for pissa "
                "ll.scaled (c != 1) and ll.export_peft raise; ll.merge works"
            )
    if attached:
        infos_ = model_state(model).adapters  # (reported once a backward trained the adapter: watch_unrun_hooks)
        unrun = [f"{n} ({a})" for n, a, *_ in rows if not infos_[a].watch and not infos_[a].layers[n]._lora_lite.ran]
        if unrun:
            lines.append(f"hooks not run since attach: {', '.join(unrun[:8])}{' ...' if len(unrun) > 8 else ''}")
    lines.append(f"trainable params: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.4g}%)")
    return "\n".join(lines)
