"""`summary(model)`: a readable table of what an adapter targets (or would target) and what it trains.

One row per target layer: name, role, variant (after routing, e.g. ia3 -> ia3_ff), d_in -> d_out,
the base layer's type and weight dtype, and the layer's trainable adapter parameters; then the
totals: targets per role, trainable parameters and their share of all the model's parameters.
bitsandbytes 4-bit weights are counted as d_in·d_out parameters (two per packed byte, whatever the storage
dtype: `quant_storage=torch.bfloat16` packs four per element), as peft does.
"""

from __future__ import annotations

from collections import Counter

from torch import nn

from .adapter import _plan, _state, is_attached
from .config import LoraLiteConfig
from .target import dims, unwrap


def _base_numel(model: nn.Module) -> int:
    """Every parameter that is not a lora_* tensor, 4-bit packed weights counted unpacked."""
    n = 0
    for name, p in model.named_parameters():
        if name.rsplit(".", 1)[-1].startswith("lora_"):
            continue
        n += p.numel() * (2 * p.element_size() if type(p).__name__ == "Params4bit" else 1)  # two 4-bit per byte
    return n


def _rows(model: nn.Module, cfg: LoraLiteConfig | None) -> tuple[list[tuple], LoraLiteConfig, bool]:
    """(name, role, variant, d_in, d_out, base, trainable) per target; the config; whether attached."""
    if is_attached(model):
        state = _state(model)
        rows = []
        for name, layer in state.layers.items():
            st = layer._lora_lite
            n = sum(getattr(layer, p).numel() for p in st.names if getattr(layer, p).requires_grad)
            rows.append((name, st.role, st.variant.name, *dims(layer), layer, n))
        return rows, state.cfg, True
    if cfg is None:
        raise ValueError(
            "no lora-lite adapter is attached to this model: call ll.summary(model) after ll.attach, "
            "or ll.summary(model, cfg) to preview what attach(model, cfg) would target"
        )
    rows = []
    for t in _plan(model, cfg):
        n = sum(_numel(s.shape) for s in t.specs.values() if s.trainable and not s.buffer)
        rows.append((t.name, t.role, t.variant.name, *dims(t.layer), t.layer, n))
    return rows, cfg, False


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _totals(model: nn.Module, rows: list[tuple], attached: bool) -> tuple[int, int, str]:
    trainable = sum(r[-1] for r in rows)
    total = _base_numel(model) + (
        sum(p.numel() for n, p in model.named_parameters() if n.rsplit(".", 1)[-1].startswith("lora_"))
        if attached
        else trainable
    )
    roles = Counter(r[1] for r in rows)
    return trainable, total, ", ".join(f"{roles[k]} {k}" for k in ("reader", "writer", "inner") if roles[k])


def one_line(model: nn.Module) -> str:
    """'attached <variant> to N layers (a reader, b writer), M trainable params (p% of T)': attach's log line."""
    rows, cfg, attached = _rows(model, None)
    trainable, total, roles = _totals(model, rows, attached)
    return (
        f"attached {cfg.variant} to {len(rows)} layers ({roles}), {trainable:,} trainable params "
        f"({100 * trainable / max(total, 1):.4g}% of {total:,})"
    )


def summary(model: nn.Module, cfg: LoraLiteConfig | None = None) -> str:
    """A table of the attached adapter's targets, or, with `cfg` and nothing attached, of what attach would do.

    Columns: layer name, role, variant, d_in -> d_out, base layer type and weight dtype, trainable params.
    The last lines give the targets per role and the trainable parameter count and its percentage of
    all the model's parameters (base + adapter). Nothing in the model is changed.
    """
    model = unwrap(model)
    rows, cfg, attached = _rows(model, cfg)
    trainable, total, roles = _totals(model, rows, attached)
    head = ("layer", "role", "variant", "shape", "base", "trainable")
    body = [
        (
            name,
            role,
            var,
            f"{d_in} -> {d_out}",
            f"{type(layer).__name__} {str(layer.weight.dtype).removeprefix('torch.')}",
            f"{n:,}",
        )
        for name, role, var, d_in, d_out, layer, n in rows
    ]
    widths = [max(len(str(r[i])) for r in [head, *body]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" if i < len(head) - 1 else f"{{:>{w}}}" for i, w in enumerate(widths))
    lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in body]
    state = "attached" if attached else "preview (not attached)"
    lines.append(
        f"{state}: variant={cfg.variant} r={cfg.r} alpha={cfg.alpha} dtype={str(cfg.dtype).removeprefix('torch.')}; "
        f"{len(rows)} targets ({roles})"
    )
    lines.append(f"trainable params: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.4g}%)")
    if attached and any(layer._lora_lite.original_dropped for *_, layer, _ in rows):
        lines.append(
            "original weights not kept (keep_original=False): ll.detach, ll.disabled, and for pissa ll.scaled "
            "(c != 1) and ll.export_peft raise; ll.merge works"
        )
    return "\n".join(lines)
