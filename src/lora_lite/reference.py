"""`reference_model(model)`: the base model as a module of its own, with no second copy of the weights.

    ll.attach(model, cfg)
    ref = ll.reference_model(model)   # ref(...) == model(...) inside ll.disabled(model), bit for bit
    trainer = DPOTrainer(model=model, ref_model=ref, ...)

For trainers that take a frozen reference model (TRL's DPO, KTO, ...). The reference is a view of
`model`: it owns no parameters, and every call through it runs the model inside `ll.disabled(model)`,
which switches the adapter off (and, for pissa and antipasto, swaps the original weight back in).

Wrapping `forward` alone is not enough. TRL 1.16 replaces the reference's `forward` on the instance
with a fused LM head that calls `ref.base_model(...)` for the hidden states and reads
`ref.get_output_embeddings().weight` itself; a wrapper bypassed on that path silently returns the
policy's log-probabilities. So everything read through the reference is wrapped too: a submodule
(`ref.base_model`, `ref.model.layers[0]`, ...) is itself a reference view whose calls enter
`ll.disabled(model)`; a method (`ref.get_output_embeddings()`, `ref.generate(...)`) runs inside
`ll.disabled(model)` and a module it returns is wrapped; and the `weight` of a layer whose weight
pissa/antipasto replaced by a residual reads as the original weight. Everything else (`config`,
`device`, `dtype`, ...) is the model's own.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from . import guards, original
from .errors import AdapterError
from .named import is_attached, model_state
from .steer import disabled


def reference_model(model: nn.Module) -> nn.Module:
    """A module whose forward is `model`'s forward inside `ll.disabled(model)`: the exact base model.

    Made for `DPOTrainer(model=model, ref_model=ll.reference_model(model))` (TRL; also KTO-style trainers
    that take a reference): no second copy of the weights, for every variant. See `ReferenceModel` for what
    the view does and does not share with the model.

    The reference is the model with its adapter off. To continue from an SFT adapter (DPO after SFT, with the
    SFT model as the reference), fold it in first: `ll.merge(model)`, then attach the DPO adapter.
    """
    if not isinstance(model, nn.Module):
        raise AdapterError(f"ll.reference_model: model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, ReferenceModel):
        raise AdapterError("ll.reference_model: this is already a reference model; pass the adapted model itself")
    if not is_attached(model):
        raise AdapterError(
            "ll.reference_model: no lora-lite adapter is attached to this model, so there is no base model to "
            "switch to (the reference would be the model being trained). Call ll.attach(model, cfg) or ll.load "
            "first, then ll.reference_model(model)."
        )
    for info in model_state(model).adapters.values():
        for a in info.layers.values():
            guards.require_original(a._lora_lite, "ll.reference_model (the base model)")
    return ReferenceModel(model)


class ReferenceModel(nn.Module):
    """A view of an adapted model that computes the base model (the model inside `ll.disabled`).

    What it shares with the model, and what it does not:

    - It owns no parameters or buffers: `parameters()` is empty, so no optimizer, accelerate or DDP sees
      anything new to train, and `requires_grad_`, `to`, `half`, `cuda` on it change nothing (it follows the
      model's device and dtype). It never changes the model's `requires_grad`.
    - `train()` / `eval()` set the reference's own mode (eval when made, like a model from `from_pretrained`):
      each call runs the model's modules in that mode and restores the model's own modes afterwards, so the
      policy's dropout does not leak into the reference and calling `ref.eval()` does not stop the policy
      training. (Under `torch.compile`, the two modes are two compiled graphs.)
    - `state_dict()` is the base model's: no `lora_*` tensors, the original weights of pissa/antipasto layers
      (TRL hashes it to name its cache of precomputed reference log-probabilities). The tensors are the model's
      own, not copies. `load_state_dict` raises: the reference has no weights of its own to load.
    - Attributes set on the reference stay on it (TRL replaces its `forward`); attributes read through it are
      the model's, with submodules, methods and rewritten weights wrapped as described in the module docstring.
      A method called through it acts on the model itself, inside `ll.disabled`: `ref.generate(...)` generates
      with the base model, but `ref.resize_token_embeddings(...)` would resize the policy's embeddings.

    Limitations:

    - Calls through the reference flip the shared adapter state for their duration: do not run the policy
      on another thread (or CUDA stream, asynchronously) at the same time.
    - With gradient checkpointing, run the reference under `torch.no_grad()` (TRL does; see README,
      "Gradient checkpointing"). The reference's default eval mode also turns checkpointing off for its pass.
    - pissa/antipasto: `ll.disabled` keeps a dense copy of each rewritten layer's original weight after its
      first use (one weight per targeted layer: with every projection targeted, close to the size of those
      layers); `keep_original=False` adapters cannot have a reference.
    - After `ll.detach` or `ll.merge` calls raise: the model no longer holds a base separate from the adapter.
    - TRL's `sync_ref_model=True` (mix the policy into the reference every few steps) has no reference
      weights to write and fails at its first sync (TRL's "zip() argument 2 is longer than argument 1");
      leave it off. DeepSpeed and FSDP (`prepare_deepspeed`, `prepare_fsdp` of the
      reference) are untested; tested: TRL 1.16 DPO in one process.
    """

    def __init__(self, model: nn.Module, *, _target: nn.Module | None = None, _top: ReferenceModel | None = None):
        super().__init__()
        # kept out of nn.Module's registries: the model's parameters and modules must not become ours
        object.__setattr__(self, "_ll_model", model)  # the adapted model whose adapter is switched off
        object.__setattr__(self, "_ll_target", model if _target is None else _target)  # what calls run
        object.__setattr__(self, "_ll_top", self if _top is None else _top)  # holds the mode and the views
        if _top is None:
            object.__setattr__(self, "_ll_views", {id(model): self})
            self.train(False)

    # ---------------------------------------------------------------- calls

    @contextmanager
    def _ll_base(self) -> Iterator[None]:
        """The model's adapter off, and the target's modules in the reference's mode, for the block."""
        if not is_attached(self._ll_model):
            raise AdapterError(
                "ll.reference_model: the model no longer has a lora-lite adapter (ll.detach or ll.merge since the "
                "reference was made), so there is no adapter to switch off (after ll.merge the weights hold it). "
                "Make the reference again after ll.attach / ll.load, or load a separate base model as the reference."
            )
        with disabled(self._ll_model), _mode(self._ll_target, self._ll_top.training):
            yield

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self._ll_base():
            return self._ll_target(*args, **kwargs)

    # ---------------------------------------------------------------- reads

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # what was set on the reference itself (parameters, modules)
        except AttributeError:
            pass
        target = self.__dict__.get("_ll_target")
        if target is None or name.startswith("__") or name.startswith("_ll_"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        value = getattr(target, name)
        rewriting = _rewriting(target) if name == "weight" else None
        if rewriting is not None:
            return original.original_weight(rewriting)  # pissa/antipasto: layer.weight holds the residual
        return self._ll_wrap(value)

    def _ll_wrap(self, value: Any) -> Any:
        if isinstance(value, nn.Module):
            return self._ll_view(value)
        if inspect.ismethod(value) and isinstance(value.__self__, nn.Module):
            return self._ll_method(value)
        return value

    def _ll_view(self, module: nn.Module) -> ReferenceModel:
        """The reference view of a submodule (one per module, so `ref.lm_head is ref.get_output_embeddings()`)."""
        views = self._ll_top._ll_views
        view = views.get(id(module))
        if view is None or view._ll_target is not module:
            view = views[id(module)] = ReferenceModel(self._ll_model, _target=module, _top=self._ll_top)
        return view

    def _ll_method(self, method: Any) -> Any:
        @functools.wraps(method)
        def call(*args: Any, **kwargs: Any) -> Any:
            with self._ll_base():
                out = method(*args, **kwargs)
            return self._ll_view(out) if isinstance(out, nn.Module) else out

        return call

    # container submodules (ModuleList, Sequential, ModuleDict): ref.model.layers[0]
    def __getitem__(self, key: Any) -> Any:
        return self._ll_wrap(self._ll_target[key])

    def __len__(self) -> int:
        return len(self._ll_target)

    def __iter__(self) -> Iterator[Any]:
        return (self._ll_wrap(m) for m in self._ll_target)

    def __bool__(self) -> bool:  # `ref or model` (TRL): never falls back to the model through __len__
        return True

    # ---------------------------------------------------------------- state

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The base model's state dict: the model's inside `ll.disabled`, without the `lora_*` tensors."""
        if kwargs.get("keep_vars") or (len(args) > 2 and args[2]):
            raise AdapterError(
                "ReferenceModel.state_dict(keep_vars=True) is not supported: the parameters are the model's, "
                "and pissa/antipasto ones hold the residual outside ll.disabled; use keep_vars=False"
            )
        with self._ll_base():
            sd = self._ll_target.state_dict(*args, **kwargs)
        for key in [k for k in sd if k.rsplit(".", 1)[-1].startswith("lora_")]:
            del sd[key]
        return sd

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        raise AdapterError(
            "a lora-lite reference model has no weights of its own to load: it is the adapted model with its "
            "adapter switched off. Load the weights into the model itself (before ll.attach), or use a separate "
            "model as the reference."
        )

    def extra_repr(self) -> str:
        model, target = type(self._ll_model).__name__, type(self._ll_target).__name__
        of = "" if self._ll_target is self._ll_model else f" of {model}"
        return f"{target}{of}, lora-lite adapter off"


def _rewriting(layer: nn.Module) -> nn.Module | None:
    """The pissa/antipasto adapter that replaced this layer's `weight` by a residual, if any (attached with
    keep_original=False: original_weight raises, naming the fix)."""
    stack = layer._modules.get("lora_lite")
    for a in [] if stack is None else stack.values():
        if a._lora_lite.original is not None or a._lora_lite.original_dropped:
            return a
    return None


@contextmanager
def _mode(module: nn.Module, training: bool) -> Iterator[None]:
    """Every submodule's `training` flag set to `training` for the block, then each restored as it was."""
    flipped = [m for m in module.modules() if m.training != training]
    for m in flipped:
        m.training = training
    try:
        yield
    finally:
        for m in flipped:
            m.training = not training


__all__ = ["ReferenceModel", "reference_model"]
