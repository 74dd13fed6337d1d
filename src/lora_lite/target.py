"""Structural targeting: which modules are linear-like, their roles, and their dense weight.

"Linear-like" = has `weight` and either `in_features`/`out_features` (nn.Linear, bitsandbytes
Linear4bit/Linear8bitLt) or `nx`/`nf` (transformers' GPT-2 `Conv1D`, weight stored (d_in, d_out)).
Roles by shape against the model width d_model:
  reader: in == d_model != out   (up/gate projections)
  writer: out == d_model != in   (down projections)
  inner:  everything else        (square q/o projections, ...)
Embeddings (`nn.Embedding`) and convolutions (`nn.Conv1d/2d/3d`) have no role: `target_names` alone selects
them, and their role is their kind, "embedding" or "conv". Every kind has a dense (d_out, d_in) view of its
weight (`dense_weight`): the embedding's Eᵀ (d, vocab), the convolution's W flattened to (c_out, c_in·∏k).
"""

from __future__ import annotations

import hashlib
import math
import re
import sys
from collections import Counter

import torch
from torch import nn
from torch.nn.utils import parametrize

from .config import LoraLiteConfig

_BLOCK_RE = re.compile(r"(?:^|\.)(?:layers?|h|blocks?)\.(\d+)(?:\.|$)")


class TargetError(ValueError):
    """Targeting matched nothing, or a target cannot carry the requested variant."""


def unwrap(model: nn.Module) -> nn.Module:
    """The module `torch.compile` wrapped (`OptimizedModule._orig_mod`), else `model` itself: every public
    function works on the model's own module names, so an adapter attached through the compiled wrapper
    saves the keys a plain model loads (not `_orig_mod.`-prefixed ones)."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # (never imported here: only compile users have it)
    return model._orig_mod if eval_frame is not None and isinstance(model, eval_frame.OptimizedModule) else model


def is_linear_like(m: nn.Module) -> bool:
    if getattr(m, "weight", None) is None or getattr(m, "is_lora_lite_adapter", False):
        return False
    return (hasattr(m, "in_features") and hasattr(m, "out_features")) or (hasattr(m, "nx") and hasattr(m, "nf"))


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# exclude_names' defaults: they give way to a target_names pattern that spells them out (find_targets)
DEFAULT_EXCLUDE = ("lm_head", "embed_tokens")


def kind_of(m: nn.Module) -> str | None:
    """ "linear", "embedding" or "conv" (the `Variant.kinds` names), or None for a module lora-lite cannot adapt.
    An adapter module (`layer.lora_lite[name]`) has its layer's kind."""
    b = _base(m)
    if isinstance(b, nn.Embedding):
        return "embedding"
    if isinstance(b, _CONVS):
        return "conv"
    return "linear" if is_linear_like(b) else None


def _base(m: nn.Module) -> nn.Module:
    """The layer itself, for an adapter module (`layer.lora_lite[name]`) too."""
    return getattr(m, "_base", m) if getattr(m, "is_lora_lite_adapter", False) else m


def is_conv1d(m: nn.Module) -> bool:
    """transformers' GPT-2 Conv1D: y = x @ W + b with W of shape (d_in, d_out)."""
    return not hasattr(m, "in_features") and hasattr(m, "nx") and hasattr(m, "nf")


def dims(m: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a target, from its attributes (never from a packed weight): an embedding's (vocab, d), a
    convolution's (c_in/groups·∏kernel, c_out), the shape of its dense view transposed."""
    b = _base(m)
    if isinstance(b, nn.Embedding):
        return int(b.num_embeddings), int(b.embedding_dim)
    if isinstance(b, _CONVS):
        return b.in_channels // b.groups * math.prod(b.kernel_size), int(b.out_channels)
    if is_conv1d(m):
        return int(m.nx), int(m.nf)
    return int(m.in_features), int(m.out_features)


def is_quantized(m: nn.Module) -> bool:
    return not torch.is_floating_point(m.weight) or hasattr(m.weight, "quant_state") or hasattr(m.weight, "SCB")


def computed_weight(m: nn.Module) -> str | None:
    """How `m.weight` is recomputed from other tensors on every access (so writing it changes nothing), or None."""
    if parametrize.is_parametrized(m, "weight"):
        return "parametrized (torch.nn.utils.parametrize, e.g. parametrizations.weight_norm or orthogonal)"
    if any(type(h).__name__ == "WeightNorm" for h in m._forward_pre_hooks.values()):
        return "computed by torch.nn.utils.weight_norm from weight_g and weight_v"
    return None


def unhooked_linears(model: nn.Module) -> set[int]:
    """ids of linear modules torch applies without calling them, so no hook on them ever runs:
    nn.MultiheadAttention's out_proj (its weight goes straight into F.multi_head_attention_forward)."""
    return {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}


def dense_weight(m: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The layer's weight as a dense (d_out, d_in) tensor: dequantized (bitsandbytes), un-transposed (Conv1D)."""
    w = m.weight
    if hasattr(w, "quant_state"):  # bitsandbytes 4-bit
        import bitsandbytes.functional as bnbF

        if getattr(w.quant_state, "packing_format_for_cpu", False):
            return _dequantize_4bit_cpu_packed(w).to(dtype)
        return bnbF.dequantize_4bit(w.data, w.quant_state).to(dtype)
    if not torch.is_floating_point(w):  # bitsandbytes 8-bit: int8 rows with per-row absmax SCB
        scb = getattr(w, "SCB", None)
        if scb is None:
            scb = getattr(getattr(m, "state", None), "SCB", None)
        if scb is None:
            raise TargetError(f"cannot dequantize the {w.dtype} weight of {type(m).__name__}")
        import bitsandbytes.functional as bnbF

        return bnbF.int8_vectorwise_dequant(w.data, scb.to(w.device)).to(dtype)  # W·SCB/127, as peft's dequantize
    w = w.detach()
    if isinstance(_base(m), _CONVS):
        return w.flatten(1).to(dtype)
    return (w.t() if is_conv1d(m) or isinstance(_base(m), nn.Embedding) else w).to(dtype)


def _dequantize_4bit_cpu_packed(w: torch.Tensor) -> torch.Tensor:
    """Dequantize a bitsandbytes 4-bit weight held in bnb's CPU inference layout, as fp32 (d_out, d_in).

    bitsandbytes (observed: 0.50.2) on an AVX512-BF16 CPU repacks a `Linear4bit` weight in place at its first
    eval-mode forward whose input does not require grad (`_convert_weight_packed_for_cpu`): nibbles
    reordered in 32-row tiles, absmax de-nested, transposed to (d_in/blocksize, d_out) and rounded to
    bf16. `dequantize_4bit` reads that layout as garbage (and so does peft's `dequantize_bnb_weight`);
    bnb's own inverse restores the nibbles exactly but leaves a non-nested absmax transposed. So: the
    inverse for the nibbles (on a shallow copy of the state: the layer is untouched), the absmax
    un-transposed here, then W = code[nibble] * absmax per block — `dequantize_4bit`'s formula (equal to
    it bit for bit on an unpacked weight), so the result is the weight up to the bf16 rounding of absmax.
    """
    import copy

    import bitsandbytes.functional as bnbF

    qs = w.quant_state
    data, _ = bnbF._convert_weight_packed_for_cpu_inverse(w.data, copy.copy(qs))
    flat = data.reshape(-1).view(torch.uint8)
    nibbles = torch.stack([flat >> 4, flat & 0xF], -1).reshape(-1).long()  # high nibble first, as bnb packs
    absmax = qs.absmax.T.reshape(-1).float()  # (d_out * d_in / blocksize,), block order of the flat weight
    return (qs.code.float().to(flat.device)[nibbles].view(-1, qs.blocksize) * absmax[:, None]).view(qs.shape)


def to_layout(m: nn.Module, w: torch.Tensor) -> torch.Tensor:
    """A dense (d_out, d_in) weight in the layer's own layout and dtype (`dense_weight`'s inverse)."""
    if isinstance(_base(m), _CONVS):
        return w.reshape(m.weight.shape).to(m.weight.dtype).contiguous()
    return (w.t() if is_conv1d(m) or isinstance(_base(m), nn.Embedding) else w).to(m.weight.dtype).contiguous()


def set_dense_weight(m: nn.Module, w: torch.Tensor) -> None:
    """Write a dense (d_out, d_in) weight back in the layer's own layout and dtype."""
    m.weight.data = to_layout(m, w)


def all_finite(t: torch.Tensor) -> bool:
    """True if t has no NaN/inf. One reduction: the sum of finite values is finite unless it overflows, and
    any NaN/inf makes it non-finite, so only a non-finite sum needs the elementwise check (40× slower)."""
    if not t.is_floating_point():
        return True
    total = t.sum(dtype=torch.float32 if t.element_size() < 4 else t.dtype)
    return bool(torch.isfinite(total)) or bool(torch.isfinite(t).all())


def fingerprint(m: nn.Module) -> str:
    """sha256 of the weight's raw bytes (exact: any changed bit changes it)."""
    return tensor_hash(m.weight)


def tensor_hash(t: torch.Tensor) -> str:
    """sha256 of a tensor's raw bytes, 32 hex digits."""
    t = t.detach().cpu().contiguous()
    return hashlib.sha256(t.view(torch.uint8).reshape(-1).numpy()).hexdigest()[:32]  # (hashes the buffer, no copy)


def weight_sharers(model: nn.Module) -> dict[int, dict[int, str]]:
    """id(weight tensor) -> {id(module): name} of every module holding it as its `weight` (tied weights: several)."""
    owners: dict[int, dict[int, str]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        w = None if getattr(mod, "is_lora_lite_adapter", False) else getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor):
            owners.setdefault(id(w), {}).setdefault(id(mod), name)
    return owners


def model_width(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    for attr in ("hidden_size", "d_model", "n_embd"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int):
            return v
    counts = Counter(dims(m)[0] for _, m in model.named_modules() if is_linear_like(m))
    if not counts:
        raise TargetError(f"{type(model).__name__} has no linear-like modules (nothing with weight + in/out features)")
    return counts.most_common(1)[0][0]


def role_of(m: nn.Module, d_model: int) -> str:
    d_in, d_out = dims(m)
    if d_in == d_model and d_out != d_model:
        return "reader"
    if d_out == d_model and d_in != d_model:
        return "writer"
    return "inner"


def block_index(name: str) -> int | None:
    """Transformer block index parsed from a module name (`model.layers.3.mlp`, `h.3.attn`)."""
    found = _BLOCK_RE.findall(name)
    return int(found[-1]) if found else None


def linear_modules(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    d_model = model_width(model)
    return [(n, m, role_of(m, d_model)) for n, m in model.named_modules() if is_linear_like(m)]


def adaptable_modules(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(name, module, role) of every module lora-lite can adapt, in module order: linear-like ones with their
    role, embeddings and convolutions with their kind ("embedding", "conv") as role."""
    mods = [(n, m, kind_of(m)) for n, m in model.named_modules() if not getattr(m, "is_lora_lite_adapter", False)]
    d_model = model_width(model) if any(k == "linear" for _, _, k in mods) else 0
    return [(n, m, role_of(m, d_model) if k == "linear" else k) for n, m, k in mods if k is not None]


def module_names(model: nn.Module) -> dict[int, list[str]]:
    """id(module) -> every name it is reachable under (a submodule registered twice has two; the first is
    the one `named_modules()` gives, which lora-lite reports and saves under)."""
    names: dict[int, list[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), []).append(n)
    return names


def grouped(modules: list[tuple[str, nn.Module, str]]) -> list[str]:
    """'name  role  d_in->d_out' per module, one line per block pattern: `model.layers.{0..31}.mlp.up_proj`."""
    groups: dict[tuple, list[int]] = {}
    for n, m, role in modules:
        found = list(_BLOCK_RE.finditer(n))
        if found:
            i = found[-1].start(1)
            key = (n[:i], n[i + len(found[-1].group(1)) :], role, dims(m))
            groups.setdefault(key, []).append(int(found[-1].group(1)))
        else:
            groups.setdefault((n, None, role, dims(m)), [])
    out = []
    for (head, tail, role, (d_in, d_out)), idx in groups.items():
        if tail is None:
            name = head
        else:
            span = (
                f"{idx[0]}..{idx[-1]}"
                if idx == list(range(idx[0], idx[-1] + 1)) and len(idx) > 1
                else ",".join(map(str, idx))
            )
            name = f"{head}{{{span}}}{tail}" if len(idx) > 1 else f"{head}{idx[0]}{tail}"
        out.append(f"{name}  {role}  {d_in}->{d_out}")
    return out


def find_targets(model: nn.Module, cfg: LoraLiteConfig) -> list[tuple[str, nn.Module, str]]:
    """(name, module, role) of every module that passes the config's filters.

    Roles select linear-like modules only; embeddings and convolutions are selected by `target_names` alone. A
    module reachable under several names is excluded if any of them matches exclude_names, and matched by
    target_names if any of them does. A default exclude pattern (`DEFAULT_EXCLUDE`) does not apply to a module
    that a target_names pattern spelling it out matches: target_names=("embed_tokens",) targets the embeddings."""
    everything = adaptable_modules(model)
    aliases = module_names(model)
    if cfg.layers is not None:  # an index no block has is a typo or the wrong model, not "nothing there"
        present = {block_index(n) for n, _, _ in everything} - {None}
        missing = sorted(set(cfg.layers) - present)
        if missing:
            raise TargetError(
                f"layers={cfg.layers}: no block has index {missing} (the model's blocks with linear layers: "
                f"{sorted(present) if present else 'none found'}); fix layers"
            )
    out = []
    for name, m, role in everything:
        names = aliases.get(id(m), [name])
        named = [p for p in cfg.target_names if any(re.search(p, n) for n in names)]
        exclude = [p for p in cfg.exclude_names if not (p in DEFAULT_EXCLUDE and any(p in t for t in named))]
        if any(re.search(p, n) for p in exclude for n in names):
            continue
        if cfg.target_names:
            if not named:
                continue
        elif role not in cfg.target_roles:
            continue
        if cfg.layers is not None and block_index(name) not in cfg.layers:
            continue
        out.append((name, m, role))
    if not out and cfg.target_parameters and not cfg.target_names and not cfg.target_roles:
        return out  # only expert weights (experts.py): target_roles=() and no target_names
    if not out:
        rows = grouped(everything)
        listing = "\n".join(f"  {row}" for row in rows[:60])
        more = f"\n  ... and {len(rows) - 60} more" if len(rows) > 60 else ""
        raise TargetError(
            f"no module matched target_roles={cfg.target_roles} target_names={cfg.target_names} "
            f"exclude_names={cfg.exclude_names} layers={cfg.layers}. "
            f"Adaptable modules (name, role, d_in->d_out; embeddings and convolutions by target_names only):\n{listing or '  (none)'}{more}"
        )
    return out
