"""Checks on every call of a hooked layer, and refusals of operations on an attached adapter."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import AdapterError

# ---------------------------------------------------------------- hooks (every call)


def layer_input(
    layer: nn.Module, args: tuple, kwargs: dict[str, Any], name: str = ""
) -> tuple[torch.Tensor, str | None]:
    """(x, None) for `layer(x, ...)`, (x, name) for `layer(name=x)` (e.g. nn.Linear's `input=`); else raise.
    (tests/test_unusual_modules.py)"""
    if args:
        return args[0], None
    if len(kwargs) == 1:
        ((key, x),) = kwargs.items()
        if isinstance(x, torch.Tensor):
            return x, key
    raise AdapterError(
        f"{name}: {type(layer).__name__} was called without a positional input (keywords: {sorted(kwargs)}); lora-lite "
        "reads the layer input from the first positional argument or a single keyword argument. Call the layer "
        "as layer(x)."
    )


def check_output(layer: nn.Module, y: Any, name: str) -> None:
    """The hooked layer must return its output tensor (not a tuple or a dict). (tests/test_unusual_modules.py)"""
    if not isinstance(y, torch.Tensor):
        raise AdapterError(
            f"{name}: {type(layer).__name__} returned a {type(y).__name__}, not a tensor; lora-lite adapts layers whose "
            "forward returns the output tensor. Exclude this layer (exclude_names)."
        )


def adapter_dtype(a: nn.Module, x: torch.Tensor) -> torch.dtype:
    """The dtype the adapter math runs in: that of its first floating lora_* tensor (cfg.dtype, unless the model
    was cast since attach: then the math follows the tensors). Raises if those tensors were offloaded to the meta
    device after attach (accelerate's hooks move them away before ours runs). (tests/test_unusual_modules.py)"""
    st = a._lora_lite
    for n in st.names:
        t = getattr(a, n)
        if t.is_floating_point():
            if t.is_meta and not x.is_meta:
                raise AdapterError(
                    f"{st.name}: the adapter tensors are on the meta device while the input is not: the layer was "
                    "offloaded after attach (accelerate's cpu_offload / dispatch_model moves a layer's tensors away "
                    "after its forward, before lora-lite's hook runs). Offloaded targets are not supported: keep "
                    "them on a device, or ll.merge the adapter before offloading."
                )
            return t.dtype
    return st.cfg.dtype


def describe(on: bool, coef: float) -> str:
    return "disabled (ll.disabled)" if not on else ("on" if coef == 1.0 else f"scaled by c={coef:g} (ll.scaled)")


def same_state_as_forward(stack: Any) -> None:
    """Gradient checkpointing re-runs a block's forward during backward, with the state (ll.disabled, ll.scaled,
    ll.set_active) of that moment: raise if no forward since the last backward ran in that state, as the recompute
    would then silently compute the gradients of another model. Any earlier state counts, so a no-grad reference
    pass between the forward and its backward (DPO, as TRL orders it) passes. Skipped under torch.compile (the
    task-id query would break the graph at every hook). (tests/test_ecosystem.py, checkpointing tests)"""
    if torch.compiler.is_compiling():
        return
    now = tuple((a._lora_lite.on, a._lora_lite.coef) for a in stack.values())
    if torch._C._current_graph_task_id() == -1:  # not inside a backward pass: an ordinary call
        if stack.recomputed:  # the first call after a backward: a new step
            stack.forward_states.clear()
            stack.recomputed = False
        stack.forward_states.add(now)
        return
    stack.recomputed = True
    if now not in stack.forward_states:
        name = next(iter(stack.values()))._lora_lite.name
        was = " or ".join(sorted(" / ".join(describe(*s) for s in st) for st in stack.forward_states)) or "never run"
        raise AdapterError(
            f"{name}: a checkpointed forward is being recomputed during backward with the adapter "
            f"{' / '.join(describe(*s) for s in now)}, but the forwards since the last backward ran with it {was}: "
            "the gradients would be those of the wrong model. With gradient checkpointing, call backward inside "
            "the same ll.disabled / ll.scaled block as the forward (for a loss over several coefficients: one "
            "backward per block, the gradients accumulate), or turn checkpointing off. Zero the gradients before "
            "retrying."
        )


# ---------------------------------------------------------------- operations on an attached adapter


def require_original(st: Any, what: str) -> None:
    """Raise if `what` needs the weight a rewriting variant replaced and attach did not keep it
    (keep_original=False). (tests/test_keep_original.py)"""
    if st.original_dropped:
        raise AdapterError(
            f"{st.name}: {what} needs the original base weight, which {st.variant.name!r} replaced by its residual "
            "at attach, and this adapter was attached with keep_original=False, so it was not kept; nothing was "
            "changed. Attach with keep_original=True (the default) to use it. To get the base model back, reload "
            "it; ll.merge(model) gives a plain model with the adapter folded in."
        )


def require_outside_blocks(st: Any, what: str, why: str) -> None:
    """Raise if `what` (which reads the trained adapter at c = 1) runs inside ll.disabled or ll.scaled.
    (tests/test_steer.py)"""
    if not st.enabled or st.coef != 1.0:
        raise AdapterError(
            f"{st.name}: {what} called inside ll.disabled or ll.scaled; call it outside those blocks {why}"
        )


def refuse_copy_inside_blocks(st: Any) -> None:
    """copy.deepcopy and pickle (torch.save(model)) inside ll.disabled / ll.scaled: the copy would keep that state
    (and, for pissa/antipasto, the swapped-in original weight) for good. (tests/test_steer.py)"""
    if not st.enabled or st.coef != 1.0:
        raise AdapterError(
            f"{st.name}: the model is being copied or pickled inside ll.disabled / ll.scaled; the copy would "
            f"keep the adapter {describe(st.enabled, st.coef)} for good. Copy it outside the block; for a "
            "plain copy of the base model, copy outside the block and ll.detach(copy)."
        )


def check_layer_targets_only(info: Any, name: str, what: str) -> None:
    """ll.combine and hotswap work on layer adapters; expert weights (target_parameters) and modules_to_save
    are refused naming the adapter, rather than dropped from the result. (tests/test_combine.py)"""
    extra = "modules_to_save" if info.saved else "target_parameters" if info.cfg.target_parameters else None
    if extra:
        raise AdapterError(
            f"{what}: adapter {name!r} uses {extra}, which {what} does not support (only adapters on layers); "
            "nothing was changed"
        )


def check_per_sample(state: Any) -> None:
    """ll.per_sample routes rows through the layer hooks; expert weights (target_parameters) and modules_to_save
    act outside them, so every row would get them: refused, naming the adapter. (tests/test_per_sample.py)"""
    for n, info in state.adapters.items():
        what = "modules_to_save" if info.saved else "target_parameters" if info.cfg.target_parameters else None
        if what and info.active:
            raise AdapterError(
                f"ll.per_sample: adapter {n!r} uses {what}, which apply to the whole batch, not per row; "
                f"deactivate it (ll.set_active) or run its rows in a batch of their own"
            )
