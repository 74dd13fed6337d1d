"""The runtime: attach -> the two hooks -> detach, in the order a call takes them.

`attach(model, cfg, name=...)` plans the targets (plan.py), puts one `LayerAdapter` holding the adapter's
`lora_*` tensors on each target layer (`layer.lora_lite[name]`, state.py), lets the variant initialise
them, freezes the base, and makes sure the layer has its hooks. A layer has at most two hooks, whatever
the number of adapters on it: a forward hook for output-side variants (lora, dora, ...) and a pre-hook
for input-side ones (hra, ia3_ff). The hooks run the layer's active adapters in attach order, each on
the layer as the adapters before it left it:

    layer_0 = the base layer;  layer_k(x) = f_k(x, layer_{k-1}(x))   (output side: f_k maps the output)
                                layer_k(x) = layer_{k-1}(g_k(x))      (input side: g_k maps the input)

so a stack computes what merging its adapters one by one into the weight gives (merge.py). `detach`
removes one adapter or all; with none left the model is bit for bit the base model. Every rare case
is one call into guards/; what pissa/antipasto keep to restore the weight is original.py.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import torch
from torch import nn

from . import experts, fast, guards, mixed, original, saved
from .config import ConfigError, LoraLiteConfig
from .errors import AdapterError
from .named import adapters, model_state, set_trainable
from .plan import Target, plan
from .state import STACK, STATE, AdapterInfo, AdapterStack, AdapterState, LayerAdapter, ModelState, ParamAdapter
from .target import unwrap

_log = logging.getLogger("lora_lite")  # attach logs what it targeted at INFO (silent by default)


# ---------------------------------------------------------------- attach


def attach(
    model: nn.Module,
    cfg: LoraLiteConfig,
    calibration_data: Any = None,
    *,
    name: str = "default",
    keep_original: bool = True,
    _skip_group_init: bool = False,
) -> list[str]:
    """Add the adapter `cfg` describes to `model` in place, as adapter `name`; return the targeted layer names.

    Every base parameter is frozen; only the trainable `lora_*` tensors of active adapters require grad.
    If anything fails half way, everything this call added is removed and the model is as before.
    keep_original=False (pissa, antipasto; no effect on other variants): do not keep what restores the
    weight they rewrote (original.py), as peft keeps nothing: `detach`, `ll.disabled`, pissa's
    `ll.scaled` and `export_peft` then raise (`merge`, save, load still work).
    """
    if not isinstance(model, nn.Module):
        raise AdapterError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    guards.check_flag(keep_original, "keep_original")
    model = unwrap(model)
    if not isinstance(cfg, LoraLiteConfig):
        raise ConfigError(f"cfg must be a ll.LoraLiteConfig, got {type(cfg).__name__}")
    cfg.__post_init__()  # re-validate: the dataclass may have been mutated since construction
    guards.check_name(name, adapters(model))
    guards.warn_fp16(cfg)
    _check_owned(model)
    targets = plan(model, cfg, name)
    to_save = saved.find_modules(model, cfg, targets, name)
    state = getattr(model, STATE, None)
    if state is None:
        state = ModelState(requires_grad={n: p.requires_grad for n, p in model.named_parameters()})
        setattr(model, STATE, state)
        guards.stop_cpu_repacking(model, state.cpu_repack)
    info = state.adapters[name] = AdapterInfo(cfg, {})
    try:
        for t in targets:
            _add(t, cfg, info, name)
        for n, m in to_save.items():
            info.saved[n] = saved.keep(m)
        for variant in dict.fromkeys(t.variant for t in targets):
            if variant.group_init is not None and not _skip_group_init:
                group = [(t.name, info.layers[t.name], t.role) for t in targets if t.variant is variant]
                variant.group_init(model, group, cfg, calibration_data)
        for a in info.layers.values():
            _check_finite(a)
        set_trainable(model)
        for a in info.layers.values():
            if not isinstance(a, ParamAdapter):  # (experts.add hooked the owners of expert weights)
                _rehook(a._base)
        guards.watch_unrun_hooks(info.layers, info.watch)
    except BaseException:
        _remove(model, name)
        raise
    if not keep_original:  # only now: a failed attach above still restored every weight from its original
        for a in info.layers.values():
            original.drop(a)
    if _log.isEnabledFor(logging.INFO):
        note = experts.untargeted_note(model, cfg)
        if note:
            _log.info(note)
        n = sum(getattr(a, p).numel() for a in info.layers.values() for p in a._lora_lite.trainable)
        roles = Counter(t.role for t in targets)
        roles = ", ".join(
            f"{roles[k]} {k}" for k in ("reader", "writer", "inner", "expert", "embedding", "conv") if roles[k]
        )
        _log.info(f"attached {cfg.variant} to {len(targets)} layers ({roles}), {n:,} trainable params, as {name!r}")
    return [t.name for t in targets]


def _add(t: Target, cfg: LoraLiteConfig, info: AdapterInfo, name: str) -> None:
    """Put adapter `name`'s tensors on one layer and let the variant initialise them."""
    lcfg = t.cfg or cfg  # this layer's r / alpha (rank_pattern, alpha_pattern)
    trainable = tuple(p for p, s in t.specs.items() if s.trainable and not s.buffer)
    st = AdapterState(t.name, name, t.role, t.variant, lcfg, lcfg.scale, tuple(t.specs), trainable)
    if t.param is not None:  # a 3-D expert weight (target_parameters): no stack, the owner's swap hooks
        a = info.layers[t.name] = ParamAdapter(t.layer, st, t.param)
        experts.add(t.layer, a, name)
        for pname, spec in t.specs.items():
            a.register_parameter(pname, nn.Parameter(spec.make(cfg.dtype, a.weight.device), requires_grad=False))
        return
    stack = t.layer._modules.get(STACK)
    if stack is None:
        stack = AdapterStack()
        t.layer.add_module(STACK, stack)
    a = stack[name] = info.layers[t.name] = LayerAdapter(t.layer, st)  # first: a failure below still cleans it up
    for pname, spec in t.specs.items():
        tensor = spec.make(cfg.dtype, t.layer.weight.device)
        if spec.buffer:
            a.register_buffer(pname, tensor, persistent=True)
        else:
            a.register_parameter(pname, nn.Parameter(tensor, requires_grad=False))
    if t.variant.rewrites_weight:
        original.keep(a)
    with torch.no_grad():
        t.variant.init(a, lcfg)
        if t.variant.rewrites_weight:
            original.compact(a)


def _check_owned(model: nn.Module) -> None:
    """Every layer carrying adapters belongs to this model's record (not to a submodule or a parent attached
    separately, whose detach would then leave this model's record wrong)."""
    known = {
        id(a._base) for info in getattr(model, STATE, ModelState()).adapters.values() for a in info.layers.values()
    }
    if any(STACK in m._modules and id(m) not in known for m in model.modules()):
        raise AdapterError(
            "a submodule of this model already carries a lora-lite adapter attached to another module; detach it first"
        )


def _check_finite(a: LayerAdapter) -> None:
    st = a._lora_lite
    named = [(p, getattr(a, p)) for p in st.names]
    if st.original is not None and st.original.finite:
        named.append(("weight", a.weight))
    guards.check_finite_init(st.name, st.variant, st.cfg, named)


def _rehook(layer: nn.Module) -> None:
    """Give the layer the hooks its adapters need, and only those (none left: the stack itself goes)."""
    stack: AdapterStack = layer._modules[STACK]
    stack.refresh()
    if stack.outputs and stack.post_handle is None:
        stack.post_handle = layer.register_forward_hook(_output_hook, with_kwargs=True)
    if stack.inputs and stack.pre_handle is None:
        stack.pre_handle = layer.register_forward_pre_hook(_input_hook, with_kwargs=True)
    if not stack.outputs and stack.post_handle is not None:
        stack.post_handle = stack.post_handle.remove()
    if not stack.inputs and stack.pre_handle is not None:
        stack.pre_handle = stack.pre_handle.remove()
    if not len(stack):
        del layer._modules[STACK]


# ---------------------------------------------------------------- the hooks


def _input_hook(layer: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
    """Input-side adapters, the last attached first (it wraps the others); notes the input each output-side
    adapter sees, for `_output_hook`."""
    stack: AdapterStack = layer._modules[STACK]
    guards.same_state_as_forward(stack)
    if stack.rows is not None:  # inside ll.per_sample: each group of rows through its own adapters
        return mixed.input_hook(layer, stack, args, kwargs)
    x0, key = guards.layer_input(layer, args, kwargs, stack.order[0]._lora_lite.name)
    x, seen = x0, {} if stack.outputs else None
    for a in reversed(stack.order):
        st = a._lora_lite
        if st.variant.forward is not None and seen is not None:
            seen[id(a)] = x
        if st.variant.forward_input is not None and st.active and st.enabled:  # (both: boft)
            st.ran = True
            dtype = guards.adapter_dtype(a, x)  # x is also the base path: an adapter dtype narrower than x rounds it
            xa = x if x.dtype == dtype else x.to(dtype)
            out = st.variant.forward_input(a, xa) if st.coef == 1.0 else st.variant.scaled_forward_input(a, xa, st.coef)
            x = out if out.dtype == x.dtype else out.to(x.dtype)
    stack.seen = seen
    if x is x0:
        return None
    return ((x, *args[1:]), kwargs) if key is None else (args, {**kwargs, key: x})


def _output_hook(layer: nn.Module, args: tuple, kwargs: dict[str, Any], y: Any) -> torch.Tensor:
    """Output-side adapters in attach order, each mapping the output the previous one produced."""
    stack: AdapterStack = layer._modules[STACK]
    if stack.pre_handle is None:  # (else the pre-hook checked this call already)
        guards.same_state_as_forward(stack)
    if stack.rows is not None:  # inside ll.per_sample
        return mixed.output_hook(layer, stack, args, kwargs, y)
    seen, stack.seen = stack.seen, None
    first = True
    for a in stack.outputs:
        st = a._lora_lite
        if not (st.active and st.enabled):
            continue
        st.ran = True
        if first:
            guards.check_output(layer, y, st.name)
        if seen is not None:
            x = seen[id(a)]
        else:
            x = args[0] if args else guards.layer_input(layer, args, kwargs, st.name)[0]
        dtype = guards.adapter_dtype(a, x)
        if x.dtype != dtype and x.is_floating_point():  # hot path: no .to() when nothing is cast; ids never are
            x = x.to(dtype)
        if st.coef != 1.0:  # inside ll.scaled(model, c)
            out = st.variant.scaled_forward(a, x, y, st.coef)
        else:  # the first adapter may add into the base output in place, if nothing else can hold it (fast.py)
            st.writable = y if first and fast.sole_owner(layer, stack, y) else None
            try:
                out = st.variant.forward(a, x, y)
            finally:
                st.writable = None
        y = out if out.dtype == y.dtype else out.to(y.dtype)
        first = False
    return y


# ---------------------------------------------------------------- detach


def detach(model: nn.Module, name: str | None = None) -> None:
    """Remove adapter `name` (default: every adapter): its tensors, its hooks if no other adapter needs them,
    and for pissa/antipasto the residual weight (the original is restored). With no adapter left, the model
    is bit for bit the base model again, requires_grad flags included."""
    state = model_state(model)
    names = list(state.adapters) if name is None else [name]
    guards.check_known(names, list(state.adapters), "ll.detach")
    for n in names:  # every check before the first change
        for a in state.adapters[n].layers.values():
            original.check_restorable(a, "ll.detach (which restores it)")
    for n in reversed(names):
        _remove(model, n)


def _remove(model: nn.Module, name: str) -> None:
    """Undo what attach did for adapter `name` (also half way through a failed attach)."""
    model = unwrap(model)
    state: ModelState = getattr(model, STATE)
    info = state.adapters.pop(name)
    for h in info.watch:
        h.remove()
    for sm in info.saved.values():
        saved.restore(sm)
        saved.set_trainable(sm, False)  # (the flags before the first attach come back below, with no adapter left)
    for a in info.layers.values():
        if isinstance(a, ParamAdapter):
            experts.remove(a, name)
            continue
        original.restore(a)
        layer = a._base
        del layer._modules[STACK][name]
        _rehook(layer)
    if state.adapters:
        return
    for n, p in model.named_parameters():
        if n in state.requires_grad:
            p.requires_grad_(state.requires_grad[n])
    for m, flag in state.cpu_repack.items():
        m.support_avx512bf16_for_cpu = flag
    delattr(model, STATE)
