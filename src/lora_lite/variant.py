"""The variant contract: `ParamSpec`, the `Variant` base class, `REGISTRY` and `register`.

A variant owns the map `(x, layer.weight, layer.lora_*) -> new output` and nothing
else. The runtime (`adapter.py`) creates the tensors a variant asks for in
`param_specs`, calls `init` once per layer (and `group_init` once per model for
data-driven variants), then calls `forward` from a forward hook (or
`forward_input` from a pre-hook) on every call of the layer.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.autograd.forward_ad as _fwad
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .config import LoraLiteConfig


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
    """Base class; subclasses are used as namespaces of static methods (no instances)."""

    name: str = ""
    # True for variants that replace `layer.weight` (pissa, antipasto): the runtime keeps the
    # original for `detach`, fingerprints it for `load`, and refuses quantized bases.
    rewrites_weight: bool = False
    # True for variants that read dense values of `layer.weight` in init or forward.
    reads_weight: bool = False
    # True when scaled_forward reads `adapter.original_weight(layer)` (pissa): ll.scaled builds it on entry,
    # outside any compiled code (its first build hashes W_res, which dynamo cannot trace).
    scaled_reads_original: bool = False
    # The variant_kwargs keys it accepts; any other key is a ConfigError (a typo must not train the default).
    # None: not checked by the config (a custom variant's own `validate` may check them).
    kwargs: tuple[str, ...] | None = None

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

    group_init: Callable[..., None] | None = None  # (model, targets, cfg, calibration_data)

    # Optional with rewrites_weight=True, called once right after init, so the runtime can restore the original
    # weight bit for bit without a dense copy of it (original.py; without it, it keeps a dense copy):
    #   residual_factors(layer) -> (L (d_out, k), R (k, d_in)) with W − W_res ≈ L @ R

    # Optional, for ll.merge / ll.merged_state_dict / ll.export_peft:
    #   merged_weight(layer) -> (W_eff (d_out, d_in) in merge_dtype(layer), effective bias or None = unchanged)

    @classmethod
    def scaled_forward(cls, layer: nn.Module, x: torch.Tensor, y: torch.Tensor, c: float) -> torch.Tensor:
        """`ll.scaled(model, c)`, c != 1, output-hook variants. Default: y + c·(forward(x, y) − y).

        Every variant is affine in x, so this moves the layer's effective weight and bias linearly from
        the base (c = 0) to the trained adapter (c = 1). Override it to give c another meaning.
        """
        return y + c * (cls.forward(layer, x, y) - y)

    @classmethod
    def scaled_forward_input(cls, layer: nn.Module, x: torch.Tensor, c: float) -> torch.Tensor:
        """Pre-hook variants: x + c·(forward_input(x) − x), i.e. (the base layer being affine) the same interpolation."""
        return x + c * (cls.forward_input(layer, x) - x)


REGISTRY: dict[str, type[Variant]] = {}


def register(cls: type) -> type:
    """Class decorator: add a variant to `REGISTRY` under `cls.name`."""
    if not getattr(cls, "name", ""):
        raise ValueError(f"{cls.__name__} needs a non-empty `name` to be registered")
    if not (hasattr(cls, "forward") or hasattr(cls, "forward_input")):
        raise ValueError(f"variant {cls.name!r} must define forward(layer, x, y) or forward_input(layer, x)")
    if not issubclass(cls, Variant):  # allow plain classes, as in the spec: give them the defaults
        cls = type(cls.__name__, (cls, Variant), {})
    REGISTRY[cls.name] = cls
    return cls


def get_variant(name: str) -> type[Variant]:
    if name not in REGISTRY:
        from .config import ConfigError

        raise ConfigError(f"unknown variant {name!r}; registered variants: {sorted(REGISTRY)}")
    return REGISTRY[name]


def merge_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype `merged_weight` computes in: fp32, or fp64 when the base weight or an adapter tensor is fp64."""
    ts = [layer.weight, *(getattr(layer, n) for n in layer._lora_lite.names)]
    return functools.reduce(torch.promote_types, [t.dtype for t in ts if t.is_floating_point()], torch.float32)


@contextmanager
def for_cache() -> Iterator[None]:
    """Build tensors kept across calls (`layer._lora_lite.cache`) in here: plain tensors without autograd history.

    Also when the first call runs under `torch.inference_mode()` (an evaluation before training): an inference
    tensor in the cache would make every later training step raise ("Inference tensors cannot be saved for
    backward"). `inference_mode(False)` turns grad mode on, hence the `no_grad`.
    """
    with torch.inference_mode(False), torch.no_grad():
        yield


def dropout(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The adapter-input dropout of the config, active in training mode only."""
    p = layer._lora_lite.cfg.dropout
    if p == 0.0 or not layer.training:
        return x
    return F.dropout(x, p, training=True)


def writable(layer: nn.Module, y: torch.Tensor) -> bool:
    """True if the forward hook vetted `y` (the base layer's output) as safe to update in place.

    The hook allows it only when nothing else can hold `y`: no global forward hooks, no hook registered
    on this layer before ours (a user hook that stored its output would see it change), not inside
    `ll.scaled` (which reuses y after the variant's forward), not under torch.func transforms, and y is not
    a leaf that requires grad. Autograd still checks the rest: a base layer that saved its own output for backward would make the
    backward raise, never compute a wrong gradient (nn.Linear, Conv1D and bitsandbytes layers do not).
    """
    return layer._lora_lite.writable is y


def add_lowrank(y: torch.Tensor, h: torch.Tensor, B: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """y + h Bᵀ for h (…, r) and B (d_out, r): the last step of every low-rank update.

    One fused `addmm` when y and h share a dtype: no (…, d_out) temporary for h Bᵀ and no separate add.
    With `inplace=True` (pass `writable(layer, y)`) the same gemm adds into y's own storage: no copy of y
    either. Under autograd both go through `_LowRank`, whose backward computes B's gradient as (hᵀ g)ᵀ
    rather than addmm's gᵀ h: the same sum, in the layout MKL runs 2-3× faster for r = 8 (0.07 vs 0.21 ms
    on a (1024, 512) output). Values and gradients in place and out of place are the same bits (same
    kernels). Measured (2 threads, r = 8, the benchmark's Llama): in place, LoRA 1.15× → 1.14× the frozen
    base; the backward layout, 1.15× → 1.13× (paired medians over 30-40 rounds).
    Mixed dtypes (adapter dtype ≠ the base output's): an adapter wider than y (fp32 adapter, bf16 base) adds
    into y cast up to its dtype and rounds the sum once, as peft does (rounding h Bᵀ to y's dtype first would
    round twice: up to 1.4× peft's error where the update is as large as y); a narrower one computes h Bᵀ in
    its dtype and adds it to y in y's (y never rounded through the adapter dtype). Under torch.autocast (y, h
    in bf16, B the fp32 parameter) B is cast to h's dtype, as autocast's own addmm does, and an fp32 h (DeLoRA's
    math) gets h Bᵀ in autocast's dtype, added to y in y's.
    Under torch.compile, torch.func transforms and forward-mode AD (`torch.autograd.forward_ad.dual_level`):
    plain out-of-place `addmm` (the compiler plans memory itself; functorch needs no custom autograd.Function;
    `_LowRank` has no jvp).
    """
    if y.dtype != h.dtype:
        wider = torch.promote_types(y.dtype, h.dtype) == h.dtype
        if wider and not torch.is_autocast_enabled(y.device.type):  # adapter wider: one rounding, of the sum
            return add_lowrank(y.to(h.dtype), h, B).to(y.dtype)
        return y + F.linear(h, B).to(y.dtype)
    if B.dtype != h.dtype:  # under torch.autocast: h came out of an autocast matmul, B is the fp32 parameter
        B = B.to(h.dtype)  # (a recorded cast: B's gradient flows back in B's own dtype)
    d, h2 = y.shape[-1], h.reshape(-1, h.shape[-1])
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active() or _fwad._current_level >= 0:
        return torch.addmm(y.reshape(-1, d), h2, B.t()).view(y.shape)
    grad = torch.is_grad_enabled() and (y.requires_grad or h.requires_grad or B.requires_grad)
    t = _own_storage(y) if inplace and h2.shape[0] * d == y.numel() else None
    if t is not None:
        if not grad:
            t.view(-1, d).addmm_(h2, B.t())
            return y
        return _LowRank.apply(t, h2, B, True).view(y.shape)
    if not grad:
        return torch.addmm(y.reshape(-1, d), h2, B.t()).view(y.shape)
    return _LowRank.apply(y.reshape(-1, d), h2, B, False).view(y.shape)


def _own_storage(y: torch.Tensor) -> torch.Tensor | None:
    """The tensor to update in place for y: y itself, or (F.linear with a bias on batched input) the 2-D
    result y views with the same layout and last dimension; None for any other view or a non-contiguous y."""
    if not y.is_contiguous():
        return None
    base = y._base
    if base is None:
        return y
    same = base.numel() == y.numel() and base.data_ptr() == y.data_ptr() and base.shape[-1] == y.shape[-1]
    return base if same and base._base is None and base.is_contiguous() else None


class _LowRank(torch.autograd.Function):
    """t + h Bᵀ (t (…, d_out), h (n, r), n·d_out = t.numel()), in place on t (`inplace`) or into a new tensor.

    In place, `mark_dirty` marks t modified (version bump: a saved t would still be caught) without a view in
    the graph: an in-place op through `t.view(-1, d)` is recorded as CopySlices, whose backward copies the
    whole gradient twice (that made in-place slower than out of place).
    """

    @staticmethod
    def forward(ctx, t: torch.Tensor, h2: torch.Tensor, B: torch.Tensor, inplace: bool) -> torch.Tensor:
        if inplace:
            t.view(-1, t.shape[-1]).addmm_(h2, B.t())
            ctx.mark_dirty(t)
            out = t
        else:  # t is 2-D here: the output is addmm's own tensor, not a view made inside this Function
            out = torch.addmm(t, h2, B.t())  # (a view would make a later in-place edit of y an autograd error)
        ctx.save_for_backward(h2, B)
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        h2, B = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        gh = g2.mm(B) if ctx.needs_input_grad[1] else None
        gB = h2.t().mm(g2).t() if ctx.needs_input_grad[2] else None  # (hᵀ g)ᵀ: B's grad, in the fast layout
        return g, gh, gB, None
