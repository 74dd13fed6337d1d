"""attach -> hook -> detach, save -> load: the whole runtime.

`attach` puts `lora_*` tensors on each target layer (so they appear in the model's
`named_parameters()` and `state_dict()` under their full path), stores a small
`_LayerState` on the layer as `layer._lora_lite`, freezes every base parameter and
registers one forward hook (or pre-hook) per layer. `detach` undoes exactly that.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import _global_forward_hooks
from torch.utils.hooks import RemovableHandle

from .config import ConfigError, LoraLiteConfig
from .original import _WIDENS, Original
from .target import (
    TargetError,
    all_finite,
    computed_weight,
    dims,
    find_targets,
    fingerprint,
    is_conv1d,
    is_quantized,
    tensor_hash,
    unhooked_linears,
    unwrap,
    weight_sharers,
)
from .variant import ParamSpec, Variant, for_cache, get_variant

FORMAT = "lora-lite"
FORMAT_VERSION = "1"
_STATE = "_lora_lite_state"  # on the model
_LAYER = "_lora_lite"  # on each target layer
_log = logging.getLogger("lora_lite")  # attach logs what it targeted at INFO (silent by default)


class AdapterError(RuntimeError):
    """Misuse of attach/detach/save (attached twice, nothing attached, ...)."""


class LoadError(AdapterError):
    """An adapter file cannot be loaded onto this model; nothing was changed."""


@dataclass
class _LayerState:
    name: str
    role: str
    variant: type[Variant]
    cfg: LoraLiteConfig
    scale: float
    names: tuple[str, ...]  # the lora_* tensors on this layer
    handle: RemovableHandle | None = None
    original: Original | None = None  # rewriting variants: what restores the weight before attach (original.py)
    fingerprint: str | None = None  # of the base weight before attach (save/load)
    residual_hash: str | None = None  # of W_res right after init, when `original` needs it to rebuild the weight
    original_dropped: bool = False  # attached with keep_original=False: no `original`, so no detach / ll.disabled
    enabled: bool = True
    coef: float = 1.0  # steering coefficient (ll.scaled)
    writable: torch.Tensor | None = None  # during a hook call: the base output, if safe to update in place
    forward_states: set[tuple[bool, float]] = field(default_factory=set)  # (enabled, coef) of calls since a recompute
    recomputed: bool = False  # a checkpointed forward of this layer was recomputed in backward since the last call
    cache: dict[str, Any] = field(default_factory=dict)  # variant-private, never saved (e.g. frozen norms)

    def __getstate__(self) -> dict[str, Any]:
        """copy.deepcopy and pickle (torch.save(model)) go through here: refuse inside ll.disabled / ll.scaled,
        whose state (and, for pissa/antipasto, the swapped-in original weight) the copy would keep for good."""
        if not self.enabled or self.coef != 1.0:
            raise AdapterError(
                f"{self.name}: the model is being copied or pickled inside ll.disabled / ll.scaled; the copy would "
                f"keep the adapter {_describe((self.enabled, self.coef))} for good. Copy it outside the block; for a "
                "plain copy of the base model, copy outside the block and ll.detach(copy)."
            )
        return self.__dict__


@dataclass
class _ModelState:
    cfg: LoraLiteConfig
    layers: dict[str, nn.Module]
    requires_grad: dict[str, bool] = field(default_factory=dict)
    cpu_repack: dict[nn.Module, bool] = field(default_factory=dict)  # bitsandbytes 4-bit: the flag before attach


def _stop_cpu_repacking(model: nn.Module, state: _ModelState) -> None:
    """bitsandbytes (observed: 0.50.2) on an AVX512-BF16 CPU repacks a Linear4bit weight in place, for good, at
    its first eval-mode no-grad forward, into an inference layout through which no gradient reaches the layer's
    input: every adapter at or before it would silently stop learning after an evaluation. Off while attached
    (detach restores the flag); a layer repacked before attach gets a warning (fine for inference only)."""
    packed = []
    for name, m in model.named_modules():
        if getattr(m, "support_avx512bf16_for_cpu", False):
            state.cpu_repack[m] = True
            m.support_avx512bf16_for_cpu = False
        if getattr(getattr(getattr(m, "weight", None), "quant_state", None), "packing_format_for_cpu", False):
            packed.append(name)
    if packed:
        warnings.warn(
            f"bitsandbytes already repacked {len(packed)} 4-bit layer(s) for CPU inference (e.g. {packed[0]}): "
            "no gradient flows through them, so adapters at or before them will not learn. Fine for inference; "
            "to train, reload the quantized model and attach before any eval-mode no_grad forward (lora-lite "
            "turns the repacking off while attached).",
            stacklevel=3,
        )


# ---------------------------------------------------------------- hooks


def _adapter_dtype(layer: nn.Module, st: _LayerState, x: torch.Tensor | None = None) -> torch.dtype:
    """The dtype the adapter math runs in: that of the layer's first floating lora_* tensor.

    This is cfg.dtype, unless the model was cast after attach (`model.half()`, `model.to(torch.float64)`
    also cast the lora_* tensors): then the math follows the tensors, so it never mixes dtypes.
    With the layer input `x` (the hooks): raise if the adapter tensors are on the meta device and x is not.
    """
    for n in st.names:
        t = getattr(layer, n)
        if t.is_floating_point():
            if t.is_meta and x is not None and not x.is_meta:
                raise AdapterError(
                    f"{st.name}: the adapter tensors are on the meta device while the input is not: the layer was "
                    "offloaded after attach (accelerate's cpu_offload / dispatch_model moves a layer's tensors away "
                    "after its forward, before lora-lite's hook runs). Offloaded targets are not supported: keep "
                    "them on a device, or ll.merge the adapter before offloading."
                )
            return t.dtype
    return st.cfg.dtype


def _saved_config(state: _ModelState) -> LoraLiteConfig:
    """The config `save` writes: cfg.dtype replaced by the adapter tensors' actual dtype.

    They differ after `model.half()` / `model.to(dtype)`; the file then holds the tensors as they
    are (no rounding) and a config that says so, so `load` recreates exactly what was saved.
    """
    dtypes = {_adapter_dtype(layer, layer._lora_lite) for layer in state.layers.values()}
    if len(dtypes) > 1:
        raise AdapterError(
            f"the adapter tensors have mixed dtypes {sorted(map(str, dtypes))} across layers; "
            "cast the whole model to one dtype (model.to(dtype)) before ll.save"
        )
    dtype = dtypes.pop() if dtypes else state.cfg.dtype
    return state.cfg if dtype == state.cfg.dtype else dataclasses.replace(state.cfg, dtype=dtype)


def _same_state_as_forward(st: _LayerState) -> None:
    """Gradient checkpointing re-runs a block's forward during backward, with the state (ll.disabled, ll.scaled)
    of that moment: raise if no forward since the last backward ran in that state, as the recompute would then
    silently compute the gradients of another model. Any earlier state counts, so a no-grad reference pass
    between the forward and its backward (DPO, as TRL orders it) passes. Skipped under torch.compile (the
    task-id query, an int, would break the graph at every hook)."""
    if torch.compiler.is_compiling():
        return
    now = (st.enabled, st.coef)
    if torch._C._current_graph_task_id() == -1:  # not inside a backward pass: an ordinary call
        if st.recomputed:  # the first call after a backward: a new step
            st.forward_states.clear()
            st.recomputed = False
        st.forward_states.add(now)
        return
    st.recomputed = True
    if now not in st.forward_states:
        was = " or ".join(sorted(map(_describe, st.forward_states))) or "never run"
        raise AdapterError(
            f"{st.name}: a checkpointed forward is being recomputed during backward with the adapter "
            f"{_describe(now)}, but the forwards since the last backward ran with it {was}: the gradients would be "
            "those of the wrong model. With gradient checkpointing, call backward inside the same ll.disabled / "
            "ll.scaled block as the forward (for a loss over several coefficients: one backward per block, "
            "the gradients accumulate), or turn checkpointing off. Zero the gradients before retrying."
        )


def _describe(state: tuple[bool, float]) -> str:
    enabled, coef = state
    return "disabled (ll.disabled)" if not enabled else ("on" if coef == 1.0 else f"scaled by c={coef:g} (ll.scaled)")


def layer_input(layer: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[torch.Tensor, str | None]:
    """(x, None) for `layer(x, ...)`, (x, name) for `layer(name=x)` (e.g. nn.Linear's `input=`); else raise."""
    if args:
        return args[0], None
    if len(kwargs) == 1:
        ((key, x),) = kwargs.items()
        if isinstance(x, torch.Tensor):
            return x, key
    raise AdapterError(
        f"{layer._lora_lite.name}: {type(layer).__name__} was called without a positional input (keywords: "
        f"{sorted(kwargs)}); lora-lite reads the layer input from the first positional argument or a single "
        "keyword argument. Call the layer as layer(x)."
    )


def _forward_hook(layer: nn.Module, args: tuple, kwargs: dict[str, Any], y: Any) -> torch.Tensor | None:
    st: _LayerState = layer._lora_lite
    _same_state_as_forward(st)
    if not st.enabled:
        return None
    if not isinstance(y, torch.Tensor):
        raise AdapterError(
            f"{st.name}: {type(layer).__name__} returned a {type(y).__name__}, not a tensor; lora-lite adapts layers "
            "whose forward returns the output tensor. Exclude this layer (exclude_names)."
        )
    x = args[0] if args else layer_input(layer, args, kwargs)[0]
    dtype = _adapter_dtype(layer, st, x)
    if x.dtype != dtype:  # hot path: no .to() call when nothing is cast (the common case)
        x = x.to(dtype)
    if st.coef != 1.0:  # inside ll.scaled(model, c)
        out = st.variant.scaled_forward(layer, x, y, st.coef)
    else:
        # (never under torch.compile, where add_lowrank stays out of place: the handle lookup would break the graph)
        st.writable = y if not torch.compiler.is_compiling() and _sole_owner(layer, st, y) else None
        try:
            out = st.variant.forward(layer, x, y)
        finally:
            st.writable = None
    return out if out.dtype == y.dtype else out.to(y.dtype)


def _sole_owner(layer: nn.Module, st: _LayerState, y: torch.Tensor) -> bool:
    """Nobody but our hook can have seen y: no global hooks, ours is the layer's first, y is no grad leaf, and
    the layer's forward is its class's (not replaced on the instance by a wrapper that may keep y, as accelerate's
    hooks do).

    Not under torch.func transforms (vmap, grad, ...): their wrapped tensors get the plain out-of-place path.
    """
    return (
        not _global_forward_hooks
        and not torch._C._are_functorch_transforms_active()
        and st.handle is not None
        and next(iter(layer._forward_hooks), None) == st.handle.id
        and not (y.requires_grad and y.is_leaf)
        and "forward" not in layer.__dict__
    )


def _pre_hook(layer: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
    st: _LayerState = layer._lora_lite
    _same_state_as_forward(st)
    if not st.enabled:
        return None
    x, key = layer_input(layer, args, kwargs)
    # x here is also the base path: an adapter dtype narrower than x (bf16 adapter, fp32 model) rounds
    # the layer input through it, so pre-hook variants are then identity at init only to that rounding.
    dtype = _adapter_dtype(layer, st, x)
    xa = x if x.dtype == dtype else x.to(dtype)
    if st.coef != 1.0:  # inside ll.scaled(model, c)
        out = st.variant.scaled_forward_input(layer, xa, st.coef)
    else:
        out = st.variant.forward_input(layer, xa)
    out = out if out.dtype == x.dtype else out.to(x.dtype)
    return ((out, *args[1:]), kwargs) if key is None else (args, {**kwargs, key: out})


# ---------------------------------------------------------------- plan


@dataclass
class _Target:
    name: str
    layer: nn.Module
    role: str
    variant: type[Variant]
    specs: dict[str, ParamSpec]


def _plan(model: nn.Module, cfg: LoraLiteConfig) -> list[_Target]:
    """What attach would add, without touching the model."""
    base = get_variant(cfg.variant)
    plan, owners = [], None
    unhooked = unhooked_linears(model)
    for name, layer, role in find_targets(model, cfg):
        variant = base.route(name, role, cfg)
        if id(layer) in unhooked:
            raise TargetError(
                f"{name}: this is nn.MultiheadAttention's out_proj, which torch applies through "
                "F.multi_head_attention_forward without calling the module, so no adapter hook on it would ever "
                "run (the adapter would be silently ignored). Exclude it (exclude_names): nn.MultiheadAttention has "
                "no other linear submodule (its input projection is a bare parameter)."
            )
        if hasattr(layer.weight, "quant_state") and layer.weight.quant_state is None:
            raise AdapterError(
                f"{name}: this bitsandbytes {type(layer).__name__} is not quantized yet (bitsandbytes quantizes "
                "its weight when the layer is moved to a device): call model.to(device) (e.g. 'cpu' or 'cuda') "
                "first, then attach."
            )
        if layer.weight.is_meta:
            raise AdapterError(
                f"{name}: the weight is on the meta device (no values): the model was built without weights "
                "(torch.device('meta'), accelerate's init_empty_weights) or its weights are offloaded (accelerate's "
                "cpu_offload, a device_map with offload). lora-lite needs the layer's real tensors: materialize the "
                "model (model.to_empty(device=...) and load its weights), or load it without offloading, then attach."
            )
        how = computed_weight(layer) if variant.rewrites_weight else None
        if how:
            raise ConfigError(
                f"{name}: variant {variant.name!r} replaces the weight by a residual, but this weight is {how}, so a "
                "written weight would be recomputed away. Remove the parametrization first (e.g. "
                "torch.nn.utils.parametrize.remove_parametrizations(layer, 'weight')), or use another variant."
            )
        if variant.rewrites_weight and is_quantized(layer):
            raise ConfigError(
                f"{name}: variant {variant.name!r} rewrites the weight and needs a dense floating-point weight, "
                f"but this layer is {type(layer).__name__} with a {layer.weight.dtype} weight. "
                "Load the base unquantized, or use lora/dora/eva on the quantized base."
            )
        if variant.rewrites_weight:
            owners = weight_sharers(model) if owners is None else owners
            shared = [n for m, n in owners.get(id(layer.weight), {}).items() if m != id(layer)]
            if shared:
                raise ConfigError(
                    f"{name}: variant {variant.name!r} replaces the weight by a residual, but this weight is shared "
                    f"with {shared} (tied weights), which would change too. Exclude this layer (exclude_names), "
                    "or untie the weights first."
                )
        d_in, d_out = dims(layer)
        try:
            specs = variant.param_specs(d_in, d_out, cfg)
        except ConfigError as e:  # shape-dependent refusals: say which layer
            raise ConfigError(f"{name} ({d_in}->{d_out}): {e}") from None
        for pname in specs:
            if not pname.startswith("lora_"):
                raise ConfigError(f"variant {variant.name!r}: tensor name {pname!r} must start with 'lora_'")
            if hasattr(layer, pname):
                raise AdapterError(
                    f"{name}: {type(layer).__name__} already has an attribute {pname!r} (another adapter library, "
                    "e.g. peft, on this model?). Attach lora-lite to the plain base model."
                )
        plan.append(_Target(name, layer, role, variant, specs))
    base.check_plan([(t.name, t.role) for t in plan], cfg)
    return plan


def _state(model: nn.Module) -> _ModelState:
    st = getattr(unwrap(model), _STATE, None)
    if st is None:
        raise AdapterError(
            "no lora-lite adapter is attached to this model; call ll.attach(model, cfg) or ll.load first"
        )
    return st


def is_attached(model: nn.Module) -> bool:
    return getattr(unwrap(model), _STATE, None) is not None


def _expected(plan: list[_Target], cfg: LoraLiteConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {f"{t.name}.{p}": (tuple(s.shape), s.dtype or cfg.dtype) for t in plan for p, s in t.specs.items()}


# ---------------------------------------------------------------- attach / detach


def attach(
    model: nn.Module,
    cfg: LoraLiteConfig,
    calibration_data: Any = None,
    *,
    keep_original: bool = True,
    _skip_group_init: bool = False,
) -> list[str]:
    """Add the adapter described by `cfg` to `model` in place; return the names of the targeted layers.

    Every base parameter is frozen; only trainable `lora_*` tensors require grad. If anything
    fails half way, everything added so far is removed and the model is as before.

    keep_original=False (pissa, antipasto; no effect on other variants): do not keep what restores the
    weight they rewrote (original.py), as peft keeps nothing. Saves its memory after attach; `detach`,
    `ll.disabled`, pissa's `ll.scaled` and pissa's `export_peft` then raise (`merge`, save, load still work).
    """
    if not isinstance(model, nn.Module):
        raise AdapterError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(keep_original, bool):
        raise AdapterError(f"keep_original must be True or False, got {keep_original!r}")
    model = unwrap(model)
    if not isinstance(cfg, LoraLiteConfig):
        raise ConfigError(f"cfg must be a ll.LoraLiteConfig, got {type(cfg).__name__}")
    cfg.__post_init__()  # re-validate: the dataclass may have been mutated since construction
    if is_attached(model):
        raise AdapterError("an adapter is already attached to this model; call ll.detach(model) first")
    if any(hasattr(m, _LAYER) for m in model.modules()):
        raise AdapterError("a submodule of this model already carries a lora-lite adapter; detach it first")
    plan = _plan(model, cfg)
    state = _ModelState(cfg, {}, {n: p.requires_grad for n, p in model.named_parameters()})
    setattr(model, _STATE, state)
    try:
        _stop_cpu_repacking(model, state)
        for t in plan:
            dev = t.layer.weight.device
            st = _LayerState(t.name, t.role, t.variant, cfg, cfg.scale, tuple(t.specs))
            setattr(t.layer, _LAYER, st)  # first, so a failure below still cleans this layer up
            state.layers[t.name] = t.layer
            for pname, spec in t.specs.items():
                tensor = spec.make(cfg.dtype, dev)
                if spec.buffer:
                    t.layer.register_buffer(pname, tensor, persistent=True)
                else:
                    t.layer.register_parameter(pname, nn.Parameter(tensor, requires_grad=spec.trainable))
            if t.variant.rewrites_weight:
                st.original = Original.dense_copy(t.layer.weight.data)  # until init succeeded
                st.fingerprint = fingerprint(t.layer)
            with torch.no_grad():
                t.variant.init(t.layer, cfg)
                if t.variant.rewrites_weight:
                    st.original = _compact_original(t.layer, st.original)
                    if st.original.dense is None:  # rebuilt from W_res: note which W_res (_check_residual)
                        st.residual_hash = tensor_hash(t.layer.weight)
        if not _skip_group_init:
            for variant in dict.fromkeys(t.variant for t in plan):
                if variant.group_init is not None:
                    group = [(t.name, t.layer, t.role) for t in plan if t.variant is variant]
                    variant.group_init(model, group, cfg, calibration_data)
        for t in plan:  # fail loudly on an init that overflowed (extreme alpha, degenerate weights or data)
            _check_finite_init(t, cfg)
        for p in model.parameters():
            p.requires_grad_(False)
        for t in plan:
            for pname, spec in t.specs.items():
                if not spec.buffer and spec.trainable:
                    getattr(t.layer, pname).requires_grad_(True)
        for t in plan:
            st = getattr(t.layer, _LAYER)
            if hasattr(t.variant, "forward_input"):
                st.handle = t.layer.register_forward_pre_hook(_pre_hook, with_kwargs=True)
            else:
                st.handle = t.layer.register_forward_hook(_forward_hook, with_kwargs=True)
    except BaseException:
        _remove(model)
        raise
    if not keep_original:  # only now: a failed attach above still restored every weight from its original
        _drop_originals(model)
    if _log.isEnabledFor(logging.INFO):
        from .summary import one_line

        _log.info(one_line(model))
    return [t.name for t in plan]


def _drop_originals(model: nn.Module) -> None:
    """keep_original=False: free what restores the rewritten weights (pissa, antipasto); detach can no longer."""
    for layer in _state(model).layers.values():
        st: _LayerState = layer._lora_lite
        if st.original is not None:
            st.original, st.residual_hash, st.original_dropped = None, None, True
            st.cache.pop("original", None)


def require_original(layer: nn.Module, what: str) -> None:
    """Raise if `what` needs the weight a rewriting variant replaced and attach did not keep it."""
    st: _LayerState = layer._lora_lite
    if st.original_dropped:
        raise AdapterError(
            f"{st.name}: {what} needs the original base weight, which {st.variant.name!r} replaced by its residual "
            "at attach, and this adapter was attached with keep_original=False, so it was not kept; nothing was "
            "changed. Attach with keep_original=True (the default) to use it. To get the base model back, reload "
            "it; ll.merge(model) gives a plain model with the adapter folded in."
        )


def require_outside_blocks(layer: nn.Module, what: str, why: str) -> None:
    """Raise if `what` (which reads the trained adapter at c = 1) runs inside ll.disabled or ll.scaled."""
    st: _LayerState = layer._lora_lite
    if not st.enabled or st.coef != 1.0:
        raise AdapterError(
            f"{st.name}: {what} called inside ll.disabled or ll.scaled; call it outside those blocks {why}"
        )


def _compact_original(layer: nn.Module, dense: Original) -> Original:
    """The compact Original (original.py) from the variant's `residual_factors` (W − W_res ≈ L R), if it has them."""
    factors = getattr(layer._lora_lite.variant, "residual_factors", None)
    if factors is None:
        return dense
    L, R = factors(layer)
    if is_conv1d(layer):  # the weight is stored (d_in, d_out): factors of the transpose
        L, R = R.T, L.T
    return Original.compact(dense.dense, layer.weight.data, L, R, finite=dense.finite)


def _check_finite_init(t: _Target, cfg: LoraLiteConfig) -> None:
    st: _LayerState = getattr(t.layer, _LAYER)
    named = [(p, getattr(t.layer, p)) for p in t.specs]
    if st.original is not None and st.original.finite:
        named.append(("weight", t.layer.weight))
    for pname, v in named:
        if not all_finite(v):
            raise ConfigError(
                f"{t.name}: {t.variant.name!r} init made {pname} non-finite (NaN/inf) with r={cfg.r}, "
                f"alpha={cfg.alpha}, dtype={cfg.dtype}, variant_kwargs={cfg.variant_kwargs}. "
                "Use a less extreme alpha/r or a wider dtype, or exclude this layer."
            )


def _remove(model: nn.Module) -> None:
    model = unwrap(model)
    state: _ModelState = getattr(model, _STATE)
    for layer in state.layers.values():
        st: _LayerState | None = getattr(layer, _LAYER, None)
        if st is None:
            continue
        if st.handle is not None:
            st.handle.remove()
        for pname in st.names:
            if hasattr(layer, pname):
                delattr(layer, pname)
        if st.original is not None and "w_res" not in st.cache:  # (inside ll.disabled it already is the original)
            layer.weight.data = original_weight(layer)  # in today's dtype/device (model.to since attach)
        delattr(layer, _LAYER)
    for n, p in model.named_parameters():
        if n in state.requires_grad:
            p.requires_grad_(state.requires_grad[n])
    for m, flag in state.cpu_repack.items():
        m.support_avx512bf16_for_cpu = flag
    delattr(model, _STATE)


def original_weight(layer: nn.Module, *, cache: bool = True) -> torch.Tensor:
    """The weight a rewriting variant (pissa, antipasto) replaced, in the current weight's dtype and device.

    Rebuilt bit for bit from the compact form (original.py) on first use, then kept in the layer's cache,
    so that repeated `ll.disabled` / `ll.scaled` blocks (a DPO reference model every step) cost nothing
    after the first: the memory of a dense copy, paid only by models that use them. detach frees it.
    cache=False (one-off readers such as export_peft): rebuilt if not cached, and not kept.
    """
    require_original(layer, "original_weight")
    st: _LayerState = layer._lora_lite
    w_res = st.cache.get("w_res", layer.weight.data)  # inside ll.disabled, layer.weight is the original itself
    W0 = _cached_original(st, w_res)
    if W0 is None:  # first use, or model.to() since
        _check_residual(layer)
        if not cache:
            return st.original.weight(w_res)
        with for_cache():
            W0 = st.cache["original"] = st.original.weight(w_res)
    return W0


def _cached_original(st: _LayerState, w_res: torch.Tensor) -> torch.Tensor | None:
    W0 = st.cache.get("original")
    return W0 if W0 is not None and W0.dtype == w_res.dtype and W0.device == w_res.device else None


def _check_residual(layer: nn.Module) -> None:
    """Raise if a rewriting variant's W_res is not the one attach wrote (the compact original is rebuilt from it).

    Not checkable after a narrowing cast of the model (`model.half()`), which rounds W_res: then the
    original is rebuilt to that rounding (original.py).
    """
    st: _LayerState = layer._lora_lite
    if st.residual_hash is None:
        return
    w = st.cache.get("w_res", layer.weight.data)
    if w.is_meta or w.dtype not in _WIDENS[st.original.dtype]:
        return
    if tensor_hash(w.to(st.original.dtype)) != st.residual_hash:
        raise AdapterError(
            f"{st.name}: layer.weight is no longer the residual W_res that {st.variant.name!r} wrote at attach "
            "(it was written since, e.g. by load_state_dict of a full checkpoint), so the original base weight "
            "cannot be rebuilt from it; nothing was changed. To get the base model back, reload it; to keep the "
            "adapted model as plain weights, use ll.merge(model)."
        )


def detach(model: nn.Module) -> None:
    """Remove every tensor, hook and attribute `attach` added; restore rewritten weights and requires_grad."""
    state = _state(model)
    for layer in state.layers.values():  # every check before the first change
        st = layer._lora_lite
        require_original(layer, "ll.detach (which restores it)")
        if st.original is not None and "w_res" not in st.cache and _cached_original(st, layer.weight.data) is None:
            _check_residual(layer)  # (what _remove's original_weight would check half way through)
    _remove(model)


def targets(model: nn.Module) -> dict[str, nn.Module]:
    """name -> layer for every layer carrying the attached adapter."""
    return dict(_state(model).layers)


# ---------------------------------------------------------------- save / load


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every lora_* parameter and buffer under its full state_dict key (relative to `model`)."""
    state = _state(model)
    return {f"{name}.{p}": getattr(layer, p) for name, layer in state.layers.items() for p in layer._lora_lite.names}


def save(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the attached adapter to one .safetensors file, atomically (temp file + rename).

    FSDP2 (adapter tensors are DTensor shards): EVERY rank must call save; the shards are all-gathered
    (`full_tensor()`), rank 0 writes, and save returns on each rank once the file is complete.
    Plain tensors (single process, DDP): whoever calls save writes; under DDP call it on rank 0 only.
    """
    from safetensors.torch import save_file

    state = _state(model)
    sd = adapter_state_dict(model)
    sharded = any(hasattr(v, "full_tensor") for v in sd.values())  # FSDP2 DTensor
    sd = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in sd.items()}  # collective
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in sd.items()}
    fps = {n: layer._lora_lite.fingerprint for n, layer in state.layers.items() if layer._lora_lite.fingerprint}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": _saved_config(state).to_json(),
        "fingerprints": json.dumps(fps, sort_keys=True),
    }
    path = Path(path)
    try:
        if not sharded or torch.distributed.get_rank() == 0:
            _write_atomic(tensors, meta, path, save_file)
    finally:
        if sharded:
            torch.distributed.barrier()  # the other ranks return only once rank 0's file is complete
    return path


def _write_atomic(tensors: dict[str, torch.Tensor], meta: dict[str, str], path: Path, save_file) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp/safetensors make 0600; give the adapter ordinary permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_adapter(path: str | os.PathLike) -> tuple[LoraLiteConfig, dict[str, str], dict[str, torch.Tensor]]:
    """Parse and validate a lora-lite file: (config, fingerprints, tensors). Raises LoadError."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if path.is_dir():
        raise LoadError(f"{str(path)!r} is a directory; pass the adapter's .safetensors file itself")
    if not path.is_file():
        raise LoadError(f"adapter file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise LoadError(
                    f"{str(path)!r} is a safetensors file but not a lora-lite adapter (no format={FORMAT!r} "
                    "in its metadata): a file from another library (a peft adapter_model.safetensors, a plain "
                    "state dict)? ll.load reads only files written by ll.save; ll.import_peft converts a peft adapter."
                )
            if meta.get("format_version") != FORMAT_VERSION:
                raise LoadError(
                    f"{str(path)!r} has lora-lite format version {meta.get('format_version')!r}; "
                    f"this lora-lite reads version {FORMAT_VERSION} (a newer file needs a newer lora-lite)."
                )
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        if isinstance(e, LoadError):
            raise
        raise LoadError(f"{str(path)!r} is not a readable safetensors file (truncated or corrupt?): {e}") from None
    try:
        cfg = LoraLiteConfig.from_json(meta["config"])
        fps = json.loads(meta.get("fingerprints", "{}"))
        if not isinstance(fps, dict) or not all(isinstance(v, str) for v in fps.values()):
            raise TypeError(f"fingerprints must map layer names to strings, got {meta.get('fingerprints')!r}")
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise LoadError(f"{str(path)!r}: the adapter config in its metadata is invalid: {e!r}") from None
    return cfg, fps, tensors


def load(
    model: nn.Module, path: str | os.PathLike, *, allow_nonfinite: bool = False, keep_original: bool = True
) -> list[str]:
    """Attach the adapter saved in `path` (config from the file) and load its tensors strictly.

    Every check runs before the model is touched: on any error the model is unchanged.
    No calibration data is needed (data-initialised variants load their tensors from the file).
    keep_original: as in `attach`.
    """
    if not isinstance(keep_original, bool):
        raise AdapterError(f"keep_original must be True or False, got {keep_original!r}")
    cfg, fps, tensors = read_adapter(path)
    model = unwrap(model)
    if is_attached(model):
        raise AdapterError("an adapter is already attached to this model; call ll.detach(model) before ll.load")
    try:
        plan = _plan(model, cfg)
    except (ValueError, AdapterError) as e:
        raise LoadError(f"adapter {str(path)!r} does not fit this model: {e}") from None
    for t in plan:
        if t.variant.rewrites_weight and t.name not in fps:
            raise LoadError(
                f"adapter {str(path)!r} has no base-weight fingerprint for {t.name}, which variant "
                f"{t.variant.name!r} needs to re-derive its residual weight; the file is damaged or was not "
                "written by ll.save. Save the adapter again from the trained model."
            )
        if t.name in fps:
            now = fingerprint(t.layer)
            if now != fps[t.name]:
                raise LoadError(
                    f"{t.name}: base weight fingerprint {now} differs from the one the adapter was made on "
                    f"({fps[t.name]}). Variant {t.variant.name!r} depends on the exact base weight: "
                    "load it onto the same base model it was trained on."
                )
    expected = _expected(plan, cfg)
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise LoadError(f"adapter {str(path)!r} is missing tensor {missing[0]!r} ({len(missing)} missing in all)")
    unexpected = [k for k in tensors if k not in expected]
    if unexpected:
        raise LoadError(
            f"adapter {str(path)!r} has unexpected tensor {unexpected[0]!r} ({len(unexpected)} in all): "
            "it was made for a different model or targeting"
        )
    for k, (shape, dtype) in expected.items():
        t = tensors[k]
        if tuple(t.shape) != shape:
            raise LoadError(f"{k}: shape {tuple(t.shape)} in the file, this model needs {shape}")
        if t.dtype != dtype:
            raise LoadError(f"{k}: dtype {t.dtype} in the file, the adapter config says {dtype}")
        if not allow_nonfinite and not all_finite(t):
            raise LoadError(f"{k}: contains NaN or inf values; pass allow_nonfinite=True to load it anyway")
    names = attach(model, cfg, _skip_group_init=True)
    try:
        with torch.no_grad():
            for k, v in adapter_state_dict(model).items():
                v.copy_(tensors[k])
    except BaseException:
        detach(model)
        raise
    if not keep_original:
        _drop_originals(model)
    return names
