"""LoRA on the 3-D expert weights of MoE blocks (`target_parameters`), without replacing any module.

transformers 5 keeps a MoE block's experts as 3-D `nn.Parameter`s of one module (`Qwen3MoeExperts`,
`MixtralExperts`: `gate_up_proj` (E, 2·inter, d), `down_proj` (E, d, inter)) whose forward reads
`self.gate_up_proj[e]` and applies it with `F.linear`; there is no linear module per expert to hook.
Per expert e, as peft's `ParamWrapper` (peft/tuners/lora/layer.py):

    W'_e = W_e + s · B_e A_e        A: (E, r, d_in), B: (E, d_out, r), s = alpha / r

with W_e (d_out, d_in) (the owner's `is_transposed` = True stores W_e as (d_in, d_out); ΔW_e is then
transposed the same way). Init: A per-expert kaiming-uniform(a=√5) (fan-in d_in, as peft), B = 0: identity.

How it runs: the owner gets a forward pre-hook that puts the tensor W + ΔW in place of the parameter in
`owner._parameters` for the duration of the call, and a forward hook (`always_call=True`, so it runs
even if the forward raises) that puts the parameter back. This is the substitution torch.func's
`functional_call` makes (`torch.nn.utils.stateless`); it is exact (the forward computes with W + ΔW,
whatever kernel it dispatches to) and differentiable (ΔW is built from A, B inside autograd), and the
parameter itself is never written, so detach is bit-exact. peft gets the same effect by registering a
`torch.nn.utils.parametrize` parametrization for the call, which changes the owner's class.
Merge: W ← W + ΔW. Steering (`ll.scaled`): ΔW·c. Several adapters on one parameter add their ΔW.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from .config import LoraLiteConfig
from .state import ParamAdapter, ParamStack
from .target import TargetError, block_index
from .variant import ParamSpec

PARAMS = "lora_lite_params"  # on the module owning the targeted parameters


def three_d(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The model's own 3-D floating-point parameters (adapter tensors left out)."""
    return [
        (n, p)
        for n, p in model.named_parameters()
        if p.dim() == 3 and p.is_floating_point() and f".{PARAMS}." not in f".{n}" and ".lora_lite." not in f".{n}"
    ]


def find_params(model: nn.Module, cfg: LoraLiteConfig) -> list[tuple[str, nn.Module, str]]:
    """(`<module>.<param>`, owner module, param name) of every 3-D parameter a target_parameters regex matches
    (re.search), less those exclude_names / layers leave out; a regex that matches none raises, listing the
    model's 3-D parameters."""
    if not cfg.target_parameters:
        return []
    params = three_d(model)
    for pat in cfg.target_parameters:
        if not any(re.search(pat, n) for n, _ in params):
            listing = "\n".join(f"  {n}  {tuple(p.shape)}" for n, p in params[:60]) or "  (none)"
            raise TargetError(
                f"target_parameters: {pat!r} matches no 3-D parameter of this model. Its 3-D parameters "
                f"(name, shape):\n{listing}"
            )
    out = []
    for n, _ in params:
        if any(re.search(pat, n) for pat in cfg.exclude_names):
            continue
        if cfg.layers is not None and block_index(n) not in cfg.layers:
            continue
        if any(re.search(pat, n) for pat in cfg.target_parameters):
            owner, _, pname = n.rpartition(".")
            out.append((n, model.get_submodule(owner), pname))
    return out


def untargeted_note(model: nn.Module, cfg: LoraLiteConfig) -> str | None:
    """The INFO line for a model with 3-D expert weights that the config does not target, or None."""
    if cfg.target_parameters:
        return None
    params = three_d(model)
    if not params:
        return None
    names = sorted({n.rpartition(".")[2] for n, _ in params})
    return (
        f"this model has {len(params)} 3-D expert weights (e.g. {params[0][0]}) that were not targeted; "
        f"to adapt them pass target_parameters=({'|'.join(names)!r},) (lora)"
    )


def _kaiming_rows(t: torch.Tensor) -> None:
    """peft's init of its (E·r, d_in) lora_A: kaiming-uniform(a=√5) with fan-in d_in, for every expert."""
    nn.init.kaiming_uniform_(t.view(-1, t.shape[-1]), a=math.sqrt(5))


def param_specs(shape: tuple[int, ...], transposed: bool, cfg: LoraLiteConfig) -> dict[str, ParamSpec]:
    E, a, b = shape
    d_in, d_out = (a, b) if transposed else (b, a)
    return {
        "lora_A": ParamSpec((E, cfg.r, d_in), init=_kaiming_rows),
        "lora_B": ParamSpec((E, d_out, cfg.r), init="zeros"),
    }


def delta(a: ParamAdapter, dtype: torch.dtype | None = None) -> torch.Tensor:
    """ΔW = s·c·B_e A_e for every expert, shaped as the parameter (in `dtype`, default the adapter's)."""
    st = a._lora_lite
    A, B = a.lora_A, a.lora_B
    if dtype is not None:
        A, B = A.to(dtype), B.to(dtype)
    d = torch.bmm(B, A) * (st.scale * st.coef)
    return d.transpose(1, 2) if a.transposed else d


# ---------------------------------------------------------------- attach / hooks / remove


def add(owner: nn.Module, a: ParamAdapter, adapter: str) -> None:
    """Put `a` in the owner's ParamStack (created with its two hooks if needed)."""
    stack = owner._modules.get(PARAMS)
    if stack is None:
        stack = ParamStack()
        owner.add_module(PARAMS, stack)
        stack.pre_handle = owner.register_forward_pre_hook(_swap_in)
        stack.post_handle = owner.register_forward_hook(_swap_out, always_call=True)
    if adapter not in stack:
        stack[adapter] = nn.ModuleDict()
    stack[adapter][a._param] = a


def remove(a: ParamAdapter, adapter: str) -> None:
    owner = a._base
    stack: ParamStack = owner._modules[PARAMS]
    del stack[adapter][a._param]
    if not len(stack[adapter]):
        del stack[adapter]
    if not len(stack):
        stack.pre_handle.remove()
        stack.post_handle.remove()
        del owner._modules[PARAMS]


def _swap_in(owner: nn.Module, args: tuple) -> None:
    stack: ParamStack = owner._modules[PARAMS]
    if stack.swapped:  # a call inside the owner's own forward: W + ΔW is in place already
        return
    deltas: dict[str, torch.Tensor] = {}
    for per in stack.values():
        for pname, a in per.items():
            st = a._lora_lite
            if not (st.active and st.enabled):
                continue
            st.ran = True
            W = owner._parameters[pname]
            d = delta(a)
            d = d if d.dtype == W.dtype else d.to(W.dtype)
            deltas[pname] = d if pname not in deltas else deltas[pname] + d
    for pname, d in deltas.items():
        W = owner._parameters[pname]
        stack.swapped[pname] = W
        owner._parameters[pname] = W + d


def _swap_out(owner: nn.Module, args: tuple, out: object) -> None:
    stack: ParamStack | None = owner._modules.get(PARAMS)
    if stack is None or not stack.swapped:
        return
    for pname, W in stack.swapped.items():
        owner._parameters[pname] = W
    stack.swapped = {}


@torch.no_grad()
def merge(adapters: list[ParamAdapter]) -> None:
    """Fold the adapters' ΔW into their parameter (in fp32, or fp64 for an fp64 parameter)."""
    W = adapters[0].weight
    dt = torch.promote_types(W.dtype, torch.float32)
    new = W.to(dt)
    for a in adapters:
        new = new + delta(a, dt)
    W.data = new.to(W.dtype)


# ---------------------------------------------------------------- peft's layout (ll.export_peft / import_peft)


def to_peft(a: ParamAdapter) -> dict[str, torch.Tensor]:
    """peft's ParamWrapper tensors: lora_A (E·r, d_in) with A_e = rows e·r..(e+1)·r; lora_B (d_out, r·E) with
    B_e[:, k] = column k·E + e (peft reshapes it (d_out, r, E))."""
    A, B = a.lora_A, a.lora_B
    E, d_out, r = B.shape
    return {"lora_A.weight": A.reshape(E * r, -1), "lora_B.weight": B.permute(1, 2, 0).reshape(d_out, r * E)}


def from_peft(A: torch.Tensor, B: torch.Tensor, E: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of `to_peft`: (A (E, r, d_in), B (E, d_out, r))."""
    r = A.shape[0] // E
    return A.reshape(E, r, A.shape[1]), B.reshape(B.shape[0], r, E).permute(2, 0, 1).contiguous()
