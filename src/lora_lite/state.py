"""What attach leaves on a model: plain records and the two small modules that hold adapter tensors.

    model._lora_lite_state                     ModelState: the adapters by name, in attach order
    layer.lora_lite                            AdapterStack (an nn.ModuleDict): this layer's adapters, by name
    layer.lora_lite[name]                      LayerAdapter: one adapter's lora_* tensors on this layer
    layer.lora_lite[name]._lora_lite           AdapterState: that adapter's per-layer record

So `model.state_dict()` holds `<layer>.lora_lite.<name>.lora_A`: the adapter's name and the tensor's name,
which Trainer checkpoints, DDP and FSDP2 handle like any parameter. A `LayerAdapter` shows the base
layer's `weight`, `bias` and shape attributes, so a variant reads `layer.lora_A` and `layer.weight` from
one object and never sees the other adapters on the layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .guards import refuse_copy_inside_blocks

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

    from .config import LoraLiteConfig
    from .variant import Variant

STATE = "_lora_lite_state"  # on the model
STACK = "lora_lite"  # on each target layer


@dataclass(eq=False)
class AdapterState:
    """One adapter on one layer (`layer.lora_lite[name]._lora_lite`)."""

    name: str  # the layer's name in the model
    adapter: str  # the adapter's name
    role: str
    variant: type[Variant]
    cfg: LoraLiteConfig
    scale: float
    names: tuple[str, ...]  # the lora_* tensors
    trainable: tuple[str, ...]  # those of them that train while the adapter is active
    original: Any = None  # rewriting variants: what restores the weight before attach (original.py)
    original_weight: Callable[[bool, str], torch.Tensor] | None = None  # rebuilds it (original.py fills this)
    fingerprint: str | None = None  # of the base weight before attach (save/load)
    residual_hash: str | None = None  # of W_res right after init, when `original` needs it to rebuild the weight
    original_dropped: bool = False  # attached with keep_original=False: no detach / ll.disabled
    active: bool = True  # ll.set_active
    enabled: bool = True  # False inside ll.disabled
    coef: float = 1.0  # steering coefficient (ll.scaled)
    ran: bool = False  # its hook has run since attach (guards.watch_unrun_hooks)
    writable: torch.Tensor | None = None  # during a hook call: the base output, if safe to update in place
    cache: dict[str, Any] = field(default_factory=dict)  # variant-private, never saved (e.g. frozen norms)

    @property
    def on(self) -> bool:
        return self.active and self.enabled

    def __getstate__(self) -> dict[str, Any]:
        refuse_copy_inside_blocks(self)
        return self.__dict__


class LayerAdapter(nn.Module):
    """One adapter's tensors on one layer; shows the base layer's weight, bias and shape attributes."""

    def __init__(self, base: nn.Module, st: AdapterState) -> None:
        super().__init__()
        object.__setattr__(self, "_base", base)  # a plain reference: not a submodule (no cycle in the tree)
        self._lora_lite = st
        self.training = base.training

    weight = property(lambda self: self._base.weight)
    bias = property(lambda self: getattr(self._base, "bias", None))  # (nn.Embedding has none)
    in_features = property(lambda self: self._base.in_features)
    out_features = property(lambda self: self._base.out_features)
    nx = property(lambda self: self._base.nx)  # transformers' GPT-2 Conv1D
    nf = property(lambda self: self._base.nf)
    state = property(lambda self: self._base.state)  # bitsandbytes 8-bit
    is_lora_lite_adapter = True  # targeting never takes it for a linear layer
    base_layer = property(lambda self: self._base)  # the layer itself (e.g. to hook it during calibration)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Calling it calls the layer (with every adapter on it)."""
        return self._base(*args, **kwargs)

    def extra_repr(self) -> str:
        st = self._lora_lite
        return f"{st.variant.name}, r={st.cfg.r}, alpha={st.cfg.alpha}"


class ParamAdapter(LayerAdapter):
    """One adapter's tensors on one 3-D expert parameter (`target_parameters`, experts.py).

    `_base` is the module owning the parameter (e.g. transformers' `Qwen3MoeExperts`), `_param` its name;
    `weight` is that parameter, (E, d_out, d_in), or (E, d_in, d_out) when the owner says `is_transposed`.
    """

    def __init__(self, base: nn.Module, st: AdapterState, param: str) -> None:
        super().__init__(base, st)
        self._param = param

    weight = property(lambda self: self._base._parameters[self._param])
    bias = None
    transposed = property(lambda self: bool(getattr(self._base, "is_transposed", False)))
    num_experts = property(lambda self: self.weight.shape[0])
    in_features = property(lambda self: self.weight.shape[1 if self.transposed else 2])
    out_features = property(lambda self: self.weight.shape[2 if self.transposed else 1])


class ParamStack(nn.ModuleDict):
    """`owner.lora_lite_params`: adapter name -> nn.ModuleDict(param name -> ParamAdapter), attach order, and the
    owner's two hooks (the pre-hook swaps W + ΔW in for the call, the post-hook puts W back)."""

    def __init__(self) -> None:
        super().__init__()
        self.pre_handle: RemovableHandle | None = None
        self.post_handle: RemovableHandle | None = None
        self.swapped: dict[str, nn.Parameter] = {}  # during a call: param name -> the parameter swapped out


class AdapterStack(nn.ModuleDict):
    """A layer's adapters in attach order, and what its two hooks need between calls."""

    def __init__(self) -> None:
        super().__init__()
        self.order: tuple[LayerAdapter, ...] = ()  # every adapter, attach order
        self.outputs: tuple[LayerAdapter, ...] = ()  # output-side adapters, attach order
        self.inputs: tuple[LayerAdapter, ...] = ()  # input-side adapters, attach order
        self.post_handle: RemovableHandle | None = None
        self.pre_handle: RemovableHandle | None = None
        self.seen: dict[int, torch.Tensor] | None = None  # per call: id(output adapter) -> the x it sees
        # (inside ll.per_sample: a list of such dicts, one per group of rows)
        self.rows: Any = None  # inside ll.per_sample: this layer's plan for the mixed batch (mixed.Rows)
        self.forward_states: set[tuple] = set()  # stack states of the calls since the last backward
        self.recomputed = False  # a checkpointed forward was recomputed in backward since the last call

    def refresh(self) -> None:
        """Recompute the output-/input-side tuples after an adapter was added or removed."""
        adapters = self.order = tuple(self.values())
        self.outputs = tuple(a for a in adapters if a._lora_lite.variant.forward is not None)
        self.inputs = tuple(a for a in adapters if a._lora_lite.variant.forward_input is not None)


@dataclass
class AdapterInfo:
    """One named adapter on the model."""

    cfg: LoraLiteConfig
    layers: dict[str, LayerAdapter]  # layer name -> this adapter's module on it
    active: bool = True
    trainable: bool = True  # ll.set_active(..., trainable=...): an active adapter may run frozen
    watch: list = field(default_factory=list)  # gradient-hook handles of guards.watch_unrun_hooks
    saved: dict[str, SavedModule] = field(default_factory=dict)  # modules_to_save: module name -> its record


@dataclass(eq=False)
class SavedModule:
    """A module of `modules_to_save` (saved.py): its own tensors train in place while the adapter is active;
    `original` holds their values before attach (restored by detach, swapped in while the adapter is off)."""

    module: nn.Module
    tensors: dict[str, torch.Tensor]  # "<param or buffer name>" -> the module's live tensor (module.state_dict keys)
    original: dict[str, torch.Tensor]  # copies of their values before attach
    stashed: dict[str, torch.Tensor] | None = None  # while swapped out (adapter off): the trained values


@dataclass
class ModelState:
    adapters: dict[str, AdapterInfo] = field(default_factory=dict)  # attach order
    requires_grad: dict[str, bool] = field(default_factory=dict)  # of the base parameters before the first attach
    cpu_repack: dict[nn.Module, bool] = field(default_factory=dict)  # bitsandbytes 4-bit: the flag before attach


@contextmanager
def for_cache() -> Iterator[None]:
    """Build tensors kept across calls (`layer._lora_lite.cache`) in here: plain tensors without autograd history.

    Also when the first call runs under `torch.inference_mode()` (an evaluation before training): an inference
    tensor in the cache would make every later training step raise ("Inference tensors cannot be saved for
    backward"). `inference_mode(False)` turns grad mode on, hence the `no_grad`.
    """
    with torch.inference_mode(False), torch.no_grad():
        yield
