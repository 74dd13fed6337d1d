"""The variant contract: `ParamSpec`, the `Variant` base class (every hook declared), `register`.

A variant owns the map `(x, layer.weight, layer.lora_*) -> new output` and nothing else. The runtime
creates the tensors a variant asks for in `param_specs`, calls `init` once per layer (and `group_init`
once per model for data-driven variants), then calls `forward` from a forward hook (or `forward_input`
from a pre-hook) on every call of the layer.

What a variant's `layer` argument is: the adapter's own module on that layer (`state.LayerAdapter`),
which holds this adapter's `lora_*` tensors and shows the base layer's `weight`, `bias` and shape
attributes. So a variant reads `layer.lora_A`, `layer.weight`, `layer._lora_lite.scale` and never
sees other adapters on the same layer or their names. Variants import this module (and each other),
never the runtime.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import REGISTRY, get_variant  # noqa: F401  (re-exported: the registry is the contract's)
from .fast import add_lowrank  # noqa: F401  (re-exported for variants)
from .guards import layer_input  # noqa: F401  (re-exported for variants that read layer inputs: eva)
from .state import for_cache  # noqa: F401  (re-exported for variants that cache tensors)

if TYPE_CHECKING:
    from .config import LoraLiteConfig

Tensor = torch.Tensor


@dataclass(frozen=True)
class ParamSpec:
    """One adapter tensor. `init` is "zeros", "ones", "kaiming" or a callable filling the tensor in place.

    `buffer=True` registers a persistent buffer (saved, never trained) instead of a Parameter.
    `dtype=None` means the config's adapter dtype.
    """

    shape: tuple[int, ...]
    init: str | Callable[[torch.Tensor], Any] = "zeros"
    trainable: bool = True
    buffer: bool = False
    dtype: torch.dtype | None = None

    def make(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        t = torch.empty(self.shape, dtype=self.dtype or dtype, device=device)
        with torch.no_grad():
            if callable(self.init):
                self.init(t)
            elif self.init == "zeros":
                t.zero_()
            elif self.init == "ones":
                t.fill_(1.0)
            elif self.init == "kaiming":  # nn.Linear's and peft's lora_A init
                nn.init.kaiming_uniform_(t, a=math.sqrt(5))
            else:
                raise ValueError(f"unknown ParamSpec init {self.init!r}")
        return t


class Variant:
    """Base class; subclasses are namespaces of static methods (never instantiated).

    Required: `name`, `param_specs`, and `forward` (output side) or `forward_input` (input side), or both: a
    variant that defines both (boft: rotates the input, scales the output) runs in both hooks of a layer.
    Every other attribute below is optional, with the default shown.
    """

    name: str = ""
    # The variant_kwargs keys it accepts; any other key is a ConfigError (a typo must not train the default).
    # None: not checked by the config (a custom variant's own `validate` may check them).
    kwargs: tuple[str, ...] | None = None
    # True for variants that replace `layer.weight` (pissa, antipasto): the runtime keeps what restores the
    # original for `detach` (original.py), fingerprints it for `load`, refuses quantized bases and any other
    # adapter on the same layer.
    rewrites_weight: bool = False
    # True for variants that read dense values of `layer.weight` in init or forward.
    reads_weight: bool = False
    # True when scaled_forward reads `original_weight(layer)` (pissa): ll.scaled builds it on entry, outside
    # any compiled code (its first build hashes W_res, which dynamo cannot trace).
    scaled_reads_original: bool = False
    # Data-driven init, once per model after every layer's `init`: group_init(model, targets, cfg,
    # calibration_data) with targets [(name, layer, role)]. `ll.load` skips it (the tensors come from the file).
    group_init: Callable[..., None] | None = None
    # Output side: y' = forward(layer, x, y). None for input-side variants. A variant with both hooks maps the
    # input first, then the output the base layer gave for it (its x is the input before its own forward_input).
    forward: Callable[[nn.Module, Tensor, Tensor], Tensor] | None = None
    # Input side (a pre-hook): the base layer runs on forward_input(layer, x). None for output-side variants.
    forward_input: Callable[[nn.Module, Tensor], Tensor] | None = None
    # ll.merge / ll.merged_state_dict / ll.combine: merged_weight(layer, W, b) -> (W', b'). W (d_out, d_in) and
    # b (d_out,) or None are the effective weight and bias of the layer as the adapters below this one left it
    # (the base layer's, for a lone adapter), dense, in `merge_dtype(layer)`. None: the variant cannot merge.
    merged_weight: Callable[[nn.Module, Tensor, Tensor | None], tuple[Tensor, Tensor | None]] | None = None
    # ll.combine / ll.per_sample: delta_factors(layer) -> (B (d_out, k), A (k, d_in), s) when the adapter's update is
    # additive low-rank, merged_weight(layer, W, b) == (W + s·B A, b) and forward(x, y) == y + s·(drop(x) Aᵀ) Bᵀ, with
    # B, A the live tensors (lora: lora_B, lora_A, alpha/r). "cat" is then exact, "linear"/"ties"/... mix the factors
    # as peft does, and mixed batches take a batched matmul. None: combine uses merged_weight (ΔW truncated by SVD).
    delta_factors: Callable[[nn.Module], tuple[Tensor, Tensor, float]] | None = None
    # Rewriting variants: residual_factors(layer) -> (L (d_out, k), R (k, d_in)) with W − W_res = L R, called right
    # after init, so the runtime restores W bit for bit without a dense copy (original.py). None: a dense copy.
    residual_factors: Callable[[nn.Module], tuple[Tensor, Tensor]] | None = None
    # The module kinds this variant adapts: "linear" (nn.Linear, GPT-2 Conv1D, bitsandbytes linears), "embedding"
    # (nn.Embedding), "conv" (nn.Conv1d/2d/3d). A target of another kind is refused at attach, naming the variants
    # that can adapt it.
    kinds: tuple[str, ...] = ("linear",)
    # param_specs of a form whose tensor shapes depend on more of the layer than (d_in, d_out) (loha / lokr on a
    # convolution: kernel, channels, groups): layer_specs(layer, cfg), with layer the target module. None: the
    # runtime calls param_specs(d_in, d_out, cfg).
    layer_specs: Callable[[nn.Module, LoraLiteConfig], dict[str, ParamSpec]] | None = None
    # ll.param_groups(..., loraplus_lr_ratio=k): the names of this variant's "B-type" tensors (LoRA+ trains them at
    # k·lr; lora: ("lora_B",)). Empty: every tensor at lr.
    b_tensors: tuple[str, ...] = ()
    # ll.on_step(model, step), after backward and before zero_grad: a training-time schedule over all of this
    # adapter's layers at once, on_step(layers {module name: layer}, cfg, step) (adalora's rank allocation).
    on_step: Callable[[dict[str, nn.Module], LoraLiteConfig, int], None] | None = None
    # ll.regularizer(model): a term the user adds to the loss, regularizer(layers {module name: layer}, cfg) -> scalar
    # (adalora's orthogonality penalty). None: no term.
    regularizer: Callable[[dict[str, nn.Module], LoraLiteConfig], Tensor] | None = None
    # ll.export_peft: the peft adapter type this variant exports as ("LORA", "IA3"), or None (not exportable).
    peft_type: str | None = None
    # ll.export_peft: tensors peft saves once per model rather than per layer (vera's shared projections),
    # peft_shared_tensors(layers {module name: layer}) -> {key after "base_model.": tensor}. None: none.
    peft_shared_tensors: Callable[[dict[str, nn.Module]], dict[str, Tensor]] | None = None
    # ll.import_peft for a peft_type other than "LORA" / "IA3" (those two are read by interop/peft.py):
    # peft_import(pc, tensors) -> (config fields, {module name: {our tensor name: tensor}}), with pc the
    # adapter_config.json dict and tensors keyed "<module name>.<peft tensor name>" (peft's prefix removed; a
    # model-level tensor "base_model.<key>", e.g. vera_A, keyed "<key>"). The runtime adds dtype, target_names
    # (exactly those modules) and exclude_names; it checks the shapes. Buffers may be left out: attach
    # initialises them (group_init included), e.g. vera's projections re-derived from their seed.
    # Raise ValueError naming the option for a peft option the variant does not support. None: not importable.
    peft_import: Callable[[dict, dict[str, Tensor]], tuple[dict[str, Any], dict[str, dict[str, Tensor]]]] | None = None

    @staticmethod
    def validate(cfg: LoraLiteConfig) -> None:
        """Config-level checks (e.g. HRA's even r). Raise `ConfigError` with the fix."""

    @classmethod
    def route(cls, name: str, role: str, cfg: LoraLiteConfig) -> type[Variant]:
        """The variant class that handles this target (ia3 sends feed-forward layers to ia3_ff)."""
        return cls

    @staticmethod
    def check_plan(targets: list[tuple[str, str]], cfg: LoraLiteConfig) -> None:
        """Checks over all the (name, role) targets at once, before anything is attached (ia3: every
        feedforward pattern must match a target). Raise `ConfigError` with the fix."""

    @staticmethod
    def param_specs(d_in: int, d_out: int, cfg: LoraLiteConfig) -> dict[str, ParamSpec]:
        raise NotImplementedError

    @staticmethod
    def init(layer: nn.Module, cfg: LoraLiteConfig) -> None:
        """Per-layer init from the layer's weight. Default: the ParamSpec inits are enough."""

    @classmethod
    def scaled_forward(cls, layer: nn.Module, x: Tensor, y: Tensor, c: float) -> Tensor:
        """`ll.scaled(model, c)`, c != 1, output-side variants. Default: y + c·(forward(x, y) − y).

        Every variant is affine in x, so this moves the layer's effective weight and bias linearly from
        the layer below (c = 0) to the trained adapter (c = 1). Override it to give c another meaning.
        """
        return y + c * (cls.forward(layer, x, y) - y)

    @classmethod
    def scaled_forward_input(cls, layer: nn.Module, x: Tensor, c: float) -> Tensor:
        """Input-side variants: x + c·(forward_input(x) − x), i.e. (the base layer being affine) the same interpolation."""
        return x + c * (cls.forward_input(layer, x) - x)

    @staticmethod
    def peft_tensors(layer: nn.Module) -> dict[str, Tensor]:
        """ll.export_peft: this layer's tensors under peft's names (e.g. {"lora_A.weight": A}); see interop/peft.py."""
        raise NotImplementedError

    @staticmethod
    def peft_config(cfg: LoraLiteConfig) -> dict[str, Any]:
        """ll.export_peft: the adapter_config.json fields that depend on the variant (r, lora_alpha, ...)."""
        return {}


# A variant's form for another kind of layer (lora and dora on embeddings and convolutions), filled by the files
# that define them: (kind, variant name) -> class. A variant's `route` looks its form up here.
FORMS: dict[tuple[str, str], type] = {}


def register(cls: type) -> type:
    """Class decorator: add a variant to `REGISTRY` under `cls.name`."""
    if not getattr(cls, "name", ""):
        raise ValueError(f"{cls.__name__} needs a non-empty `name` to be registered")
    if not issubclass(cls, Variant):  # allow plain classes, as in the spec: give them the defaults
        cls = type(cls.__name__, (cls, Variant), {})
    if cls.forward is None and cls.forward_input is None:
        raise ValueError(f"variant {cls.name!r} must define forward(layer, x, y) or forward_input(layer, x)")
    REGISTRY[cls.name] = cls
    return cls


def merge_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype `merged_weight` computes in: fp32, or fp64 when the base weight or an adapter tensor is fp64."""
    ts = [layer.weight, *(getattr(layer, n) for n in layer._lora_lite.names)]
    return functools.reduce(torch.promote_types, [t.dtype for t in ts if t.is_floating_point()], torch.float32)


def dropout(layer: nn.Module, x: Tensor) -> Tensor:
    """The adapter-input dropout of the config, active in training mode only."""
    p = layer._lora_lite.cfg.dropout
    if p == 0.0 or not layer.training:
        return x
    return F.dropout(x, p, training=True)


def writable(layer: nn.Module, y: Tensor) -> bool:
    """True if the forward hook vetted `y` (the base layer's output) as safe to update in place.

    The hook allows it only when nothing else can hold `y`: no global forward hooks, no hook registered
    on this layer before ours (a user hook that stored its output would see it change), not inside
    `ll.scaled` (which reuses y after the variant's forward), not under torch.func transforms, y is not
    a leaf that requires grad, and this adapter is the first of the layer's stack to run. Autograd still
    checks the rest: a base layer that saved its own output for backward would make the backward raise,
    never compute a wrong gradient (nn.Linear, Conv1D and bitsandbytes layers do not).
    """
    return layer._lora_lite.writable is y


def original_weight(layer: nn.Module, *, cache: bool = True, what: str = "original_weight") -> Tensor:
    """The weight a rewriting variant (pissa, antipasto) replaced, in the current weight's dtype and device.

    The runtime fills `layer._lora_lite.original_weight` at attach (original.py); it raises if the adapter
    was attached with keep_original=False; `what` names the operation in that error.
    """
    return layer._lora_lite.original_weight(cache, what)
