"""Refusals before and at attach: arguments (names, flags) and targets (kinds, shared or tied weights, stacking)."""

from __future__ import annotations

import re
import warnings
from typing import Any

import torch
from torch import nn

from ..config import REGISTRY, ConfigError, LoraLiteConfig
from ..errors import AdapterError
from ..target import TargetError, all_finite, computed_weight, is_quantized

NAME = re.compile(r"[A-Za-z0-9_]+")


# ---------------------------------------------------------------- arguments


def check_name(name: object, taken: list[str]) -> None:
    """A new adapter's name: [A-Za-z0-9_]+ (it is part of state_dict keys) and not attached yet.
    (tests/test_named.py::test_bad_names_change_nothing)"""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise AdapterError(f"adapter name must match [A-Za-z0-9_]+ (it becomes part of state_dict keys), got {name!r}")
    if name in taken:
        raise AdapterError(
            f"an adapter named {name!r} is already attached to this model (attached: {taken}); pass another "
            f"name=..., or ll.detach(model, {name!r}) first"
        )


def check_known(names: list[str], attached: list[str], what: str) -> None:
    """Names given to set_active / detach / save / merge / scaled must be attached. (test_named.py)"""
    unknown = [n for n in names if n not in attached]
    if unknown:
        raise AdapterError(f"{what}: no adapter named {unknown[0]!r} is attached; attached adapters: {attached}")


def check_trainable(trainable: list[str], names: list[str]) -> None:
    """set_active(names, trainable=...): only adapters being activated can train. (test_named.py)"""
    odd = [n for n in trainable if n not in names]
    if odd:
        raise AdapterError(
            f"ll.set_active: trainable={odd[0]!r} is not among the adapters being activated {names}; "
            "an adapter trains only while it is active: add it to names"
        )


def check_flag(value: object, what: str) -> None:
    if not isinstance(value, bool):
        raise AdapterError(f"{what} must be True or False, got {value!r}")


# ---------------------------------------------------------------- targets (before anything is attached)


def check_kind(name: str, layer: nn.Module, kind: str, variant: type) -> None:
    """A target_names match on a module kind the variant cannot adapt (hra on an nn.Embedding): name the variants
    that can, from the registry's `kinds`. (tests/test_targets_embedding_conv.py)"""
    if kind not in variant.kinds:
        able = sorted(n for n, v in REGISTRY.items() if kind in v.kinds)
        raise TargetError(
            f"{name}: variant {variant.name!r} cannot adapt this {type(layer).__name__} (kind {kind!r}; it adapts "
            f"{', '.join(variant.kinds)} layers). Variants that adapt {kind} layers: {', '.join(able) or 'none'}. "
            "Use one of those, or leave this layer out of target_names."
        )


def check_target(model: nn.Module, name: str, layer: nn.Module, variant: type, owners: Any, unhooked: set[int]) -> None:
    """Refuse a target no hook could serve correctly (tests/test_unusual_modules.py, test_quantized.py).
    `unhooked`: target.unhooked_linears(model)."""
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
    if variant.rewrites_weight:
        check_rewritable(model, name, layer, variant, owners)


def check_param_owner(name: str, owner: nn.Module) -> None:
    """A target_parameters target: a real, plain parameter (experts.py swaps W + ΔW in for each call).
    (tests/test_targets_params_patterns.py)"""
    pname = name.rpartition(".")[2]
    if ".parametrizations." in f".{name}":
        raise TargetError(
            f"target_parameters: {name} is a torch.nn.utils.parametrize parametrization's tensor; remove the "
            "parametrization (parametrize.remove_parametrizations) before targeting it"
        )
    if owner._parameters[pname].is_meta:
        raise AdapterError(
            f"{name}: the parameter is on the meta device (no values); materialize the model before attaching"
        )


def check_rewritable(model: nn.Module, name: str, layer: nn.Module, variant: type, owners: Any) -> None:
    """pissa/antipasto write W_res into the weight: it must be a plain, dense, untied weight. (test_unusual_modules)"""
    how = computed_weight(layer)
    if how:
        raise ConfigError(
            f"{name}: variant {variant.name!r} replaces the weight by a residual, but this weight is {how}, so a "
            "written weight would be recomputed away. Remove the parametrization first (e.g. "
            "torch.nn.utils.parametrize.remove_parametrizations(layer, 'weight')), or use another variant."
        )
    if is_quantized(layer):
        raise ConfigError(
            f"{name}: variant {variant.name!r} rewrites the weight and needs a dense floating-point weight, "
            f"but this layer is {type(layer).__name__} with a {layer.weight.dtype} weight. "
            "Load the base unquantized, or use lora/dora/eva on the quantized base."
        )
    shared = [n for m, n in owners.get(id(layer.weight), {}).items() if m != id(layer)]
    if shared:
        raise ConfigError(
            f"{name}: variant {variant.name!r} replaces the weight by a residual, but this weight is shared "
            f"with {shared} (tied weights), which would change too. Exclude this layer (exclude_names), "
            "or untie the weights first."
        )


def check_stacking(name: str, layer: nn.Module, variant: type, adapter: str) -> None:
    """A weight-rewriting adapter never shares a layer: detaching one would restore (or keep) a weight the other
    does not expect. Refused at attach, both ways round. (tests/test_named.py::test_rewriting_adapters_do_not_stack)"""
    stack = layer._modules.get("lora_lite")
    if stack is None or not len(stack):
        return
    rewriting = [n for n, a in stack.items() if a._lora_lite.variant.rewrites_weight]
    if variant.rewrites_weight or rewriting:
        who = f"{variant.name!r} (adapter {adapter!r})" if variant.rewrites_weight else f"{rewriting[0]!r}"
        raise AdapterError(
            f"{name}: adapter {adapter!r} cannot share this layer with {list(stack)}: {who} replaces the layer's "
            "weight by a residual, so it must be the only adapter on the layer. Exclude the layer from one "
            "of them (exclude_names), or merge the rewriting adapter first (ll.merge)."
        )


def check_no_clash(name: str, layer: nn.Module, specs: dict) -> None:
    """An attribute named like ours that lora-lite did not add: another adapter library (peft's LoraLayer has
    lora_A / lora_B) already adapts this layer. (tests/test_misuse.py::test_attach_on_a_peft_model_refuses_the_name_clash)"""
    clash = [p for p in specs if hasattr(layer, p)]
    if hasattr(layer, "lora_lite") and type(layer._modules.get("lora_lite")).__name__ != "AdapterStack":
        clash.insert(0, "lora_lite")
    if clash:
        raise AdapterError(
            f"{name}: {type(layer).__name__} already has an attribute {clash[0]!r} (another adapter library, "
            "e.g. peft, on this model?). Attach lora-lite to the plain base model."
        )


def check_finite_init(name: str, variant: type, cfg: LoraLiteConfig, named: list[tuple[str, torch.Tensor]]) -> None:
    """Fail loudly on an init that overflowed (extreme alpha, degenerate weights or data). (test_robustness)"""
    for pname, v in named:
        if not all_finite(v):
            raise ConfigError(
                f"{name}: {variant.name!r} init made {pname} non-finite (NaN/inf) with r={cfg.r}, "
                f"alpha={cfg.alpha}, dtype={cfg.dtype}, variant_kwargs={cfg.variant_kwargs}. "
                "Use a less extreme alpha/r or a wider dtype, or exclude this layer."
            )


def stop_cpu_repacking(model: nn.Module, saved: dict[nn.Module, bool]) -> None:
    """bitsandbytes (observed: 0.50.2) on an AVX512-BF16 CPU repacks a Linear4bit weight in place, for good, at
    its first eval-mode no-grad forward, into an inference layout through which no gradient reaches the layer's
    input: every adapter at or before it would silently stop learning after an evaluation. Off while attached
    (detach restores the flag); a layer repacked before attach gets a warning. (tests/test_quantized.py)"""
    packed = []
    for name, m in model.named_modules():
        if getattr(m, "is_lora_lite_adapter", False):
            continue
        if getattr(m, "support_avx512bf16_for_cpu", False):
            saved[m] = True
            m.support_avx512bf16_for_cpu = False
        if getattr(getattr(getattr(m, "weight", None), "quant_state", None), "packing_format_for_cpu", False):
            packed.append(name)
    if packed:
        warnings.warn(
            f"bitsandbytes already repacked {len(packed)} 4-bit layer(s) for CPU inference (e.g. {packed[0]}): "
            "no gradient flows through them, so adapters at or before them will not learn. Fine for inference; "
            "to train, reload the quantized model and attach before any eval-mode no_grad forward (lora-lite "
            "turns the repacking off while attached).",
            stacklevel=4,
        )


def warn_fp16(cfg: LoraLiteConfig) -> None:
    """An fp16 adapter trained with AdamW turns NaN within a step or two (eps = 1e-8 underflows to 0 in fp16, so a
    zero second moment divides by zero). (tests/test_named.py::test_fp16_adapter_warns)"""
    if cfg.dtype == torch.float16:
        warnings.warn(
            "dtype=torch.float16 for the adapter tensors: training them with AdamW turns them NaN within a step or "
            "two (its eps=1e-8 underflows in fp16). Use dtype=torch.bfloat16 or torch.float32 for the adapter (an "
            "fp16 base model is fine: the adapter math runs in the adapter's dtype).",
            stacklevel=3,
        )


def watch_unrun_hooks(layers: dict[str, Any], handles: list) -> None:
    """A targeted layer whose hook never runs (its weight consumed directly by a fused kernel: TRL's fused LM head,
    Liger kernels) leaves its adapter untrained in silence. At the first backward in which this adapter's tensors
    get gradients, warn once naming every layer of it whose hook has not run since attach; then the gradient
    hooks are removed (no cost afterwards). (tests/test_named.py::test_a_layer_whose_hook_never_runs_is_reported)"""

    check = _UnrunWatch(layers, handles)
    for a in layers.values():  # one tensor per layer: any layer whose hook ran triggers the check
        if a._lora_lite.trainable:
            handles.append(getattr(a, a._lora_lite.trainable[0]).register_post_accumulate_grad_hook(check))


class _UnrunWatch:
    """The gradient hook of `watch_unrun_hooks` (a class, so a model holding it can be copied and pickled)."""

    def __init__(self, layers: dict[str, Any], handles: list) -> None:
        self.layers, self.handles = layers, handles

    def __call__(self, _: torch.Tensor) -> None:
        if not self.handles:
            return
        for h in self.handles:
            h.remove()
        self.handles.clear()
        dead = [n for n, a in self.layers.items() if not a._lora_lite.ran]
        if dead:
            warnings.warn(
                f"lora-lite: the hooks of {len(dead)} adapted layer(s) never ran although the adapter is training: "
                f"{dead[:8]}{' ...' if len(dead) > 8 else ''}. Their adapter tensors get no gradient: something uses "
                "these layers' weights directly without calling the layers (a fused kernel, e.g. TRL's fused LM head "
                "or Liger kernels). Exclude these layers (exclude_names) or turn the fused kernel off.",
                stacklevel=2,
            )
