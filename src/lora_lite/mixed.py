"""`per_sample`: a mixed batch, row i of the batch through its own adapters.

    with ll.per_sample(model, ["a", "b", None, ("a", "c")]):   # a name, None (the base model) or a stack
        out = model(batch)                                     # row i == model(batch[i:i+1]) with names[i] active

On entry each adapted layer gets a plan (`stack.rows`): its rows grouped by the adapters they use on that
layer. The runtime's two hooks hand the call to `input_hook` / `output_hook` below while a plan is set.
Each group runs the usual per-adapter code on its rows (one `index_select` in, one gather out), so the
cost grows with the number of distinct adapters, never with the batch. When every row uses at most one
adapter and all of them are additive low-rank (`Variant.delta_factors`: lora, eva) the layer takes one
gathered batched matmul instead: y + s_i·(x_i A_iᵀ) B_iᵀ for all rows at once.

Row i runs exactly the adapters named for it (they must be active), in attach order; adapters named for
no row do not run. A rewriting adapter (pissa, antipasto) keeps its residual weight in place, and the rows
that do not use it get the original weight's output. `ll.scaled` and `ll.disabled` apply inside the block.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import guards, original
from .errors import AdapterError
from .named import model_state
from .state import STACK, AdapterStack, LayerAdapter
from .target import is_conv1d


@dataclass(eq=False)
class Rows:
    """One layer's plan for a mixed batch."""

    n: int  # batch size
    groups: list[tuple[torch.Tensor, tuple[LayerAdapter, ...]]]  # (row indices, this layer's adapters for them)
    inv: torch.Tensor  # torch.cat(group outputs)[inv] puts the rows back in batch order
    slots: tuple[LayerAdapter, ...] | None  # the batched-matmul path: its adapters, and for each row
    slot_of_row: torch.Tensor | None  # the slot it uses (len(slots): none, a zero slot)


def _row(entry: object, i: int) -> tuple[str, ...]:
    if entry is None:
        return ()
    if isinstance(entry, str):
        return (entry,)
    if isinstance(entry, (tuple, list)) and all(isinstance(e, str) for e in entry):
        return tuple(entry)
    raise AdapterError(f"ll.per_sample: names[{i}] must be an adapter name, None or a tuple of names, got {entry!r}")


def _plan(stack: AdapterStack, rows: list[tuple[str, ...]], device: torch.device, cache: dict) -> Rows:
    """The layer's groups of rows; the index tensors are shared by every layer holding the same adapters."""
    on_layer = tuple(stack)  # adapter names, attach order
    key = (on_layer, device)
    if key not in cache:
        by_set: dict[tuple[str, ...], list[int]] = {}
        for i, names in enumerate(rows):
            by_set.setdefault(tuple(n for n in on_layer if n in names), []).append(i)
        idx = [torch.tensor(ix, device=device) for ix in by_set.values()]
        used = list(dict.fromkeys(n for s in by_set for n in s))
        slot = {n: k for k, n in enumerate(used)}
        which = [slot[s[0]] if s else len(used) for s, ix in by_set.items() for _ in ix]
        order = [i for ix in by_set.values() for i in ix]
        slot_of_row = torch.tensor([w for _, w in sorted(zip(order, which))], device=device)
        cache[key] = (list(by_set), idx, torch.argsort(torch.cat(idx)), used, slot_of_row)
    sets, idx, inv, used, slot_of_row = cache[key]
    groups = [(ix, tuple(stack[n] for n in s)) for ix, s in zip(idx, sets)]
    lowrank = all(len(s) <= 1 for s in sets) and all(
        stack[n]._lora_lite.variant.delta_factors is not None and not stack[n]._lora_lite.variant.rewrites_weight
        for n in used
    )
    if not (lowrank and used):
        return Rows(len(rows), groups, inv, None, None)
    return Rows(len(rows), groups, inv, tuple(stack[n] for n in used), slot_of_row)


@contextmanager
def per_sample(model: nn.Module, names: Sequence[str | None | tuple[str, ...]]) -> Iterator[nn.Module]:
    """Inside the block, row i of every batch runs through the adapters `names[i]` (None: the base model; a
    tuple: that stack, in attach order). Equals running each row alone with those adapters active."""
    state = model_state(model)
    if isinstance(names, (str, torch.Tensor)) or not isinstance(names, Sequence) or not len(names):
        raise AdapterError(f"ll.per_sample: names must be a non-empty list, one entry per row, got {names!r}")
    rows = [_row(e, i) for i, e in enumerate(names)]
    used = list(dict.fromkeys(n for r in rows for n in r))
    guards.check_known(used, list(state.adapters), "ll.per_sample")
    guards.check_per_sample(state)
    inactive = [n for n in used if not state.adapters[n].active]
    if inactive:
        raise AdapterError(
            f"ll.per_sample: adapter {inactive[0]!r} is not active; activate the adapters the rows use first "
            f"(ll.set_active(model, {used!r}))"
        )
    stacks: dict[int, AdapterStack] = {}
    for info in state.adapters.values():
        for a in info.layers.values():
            if STACK in a._base._modules:  # (an inactive adapter's expert weights have no layer stack)
                stacks[id(a._base)] = a._base._modules[STACK]
    for stack in stacks.values():
        if stack.rows is not None:
            raise AdapterError("ll.per_sample blocks do not nest; leave the outer block first")
        for a in stack.order:
            st = a._lora_lite
            guards.require_outside_blocks(st, "ll.per_sample", "(it decides which rows an adapter runs on)")
            if st.variant.rewrites_weight and any(st.adapter not in r for r in rows):
                guards.require_original(st, "ll.per_sample (the rows without it need the original weight)")
                original.original_weight(a)  # built now, outside the forward
    cache: dict = {}
    plans = {k: _plan(s, rows, s.order[0].weight.device, cache) for k, s in stacks.items()}
    try:
        for k, stack in stacks.items():
            stack.rows = plans[k]
        yield model
    finally:
        for stack in stacks.values():
            stack.rows, stack.seen = None, None


# ---------------------------------------------------------------- the hooks' per-sample paths (runtime.py)


def _check_batch(layer: nn.Module, stack: AdapterStack, x: torch.Tensor) -> Rows:
    rows = stack.rows
    if x.dim() < 2 or x.shape[0] != rows.n:
        raise AdapterError(
            f"{stack.order[0]._lora_lite.name}: ll.per_sample got {rows.n} names, but this layer's input has shape "
            f"{tuple(x.shape)}, whose first dimension is not a batch of {rows.n} rows; pass one name per row of "
            "the batch (a model that flattens the batch before this layer cannot be run per sample)"
        )
    return rows


def _cast(a: LayerAdapter, x: torch.Tensor) -> torch.Tensor:
    dtype = guards.adapter_dtype(a, x)
    return x if x.dtype == dtype else x.to(dtype)


def input_hook(layer: nn.Module, stack: AdapterStack, args: tuple, kwargs: dict[str, Any]) -> tuple | None:
    """Input-side adapters per group of rows; notes each group's input of every output-side adapter."""
    x0, key = guards.layer_input(layer, args, kwargs, stack.order[0]._lora_lite.name)
    rows = _check_batch(layer, stack, x0)
    pieces, seen = [], []
    for idx, adapters in rows.groups:
        x, s = x0.index_select(0, idx), {}
        for a in reversed(stack.order):
            st = a._lora_lite
            if st.variant.forward is not None:
                s[id(a)] = x
            if st.variant.forward_input is not None and a in adapters and st.on:  # (both hooks: boft)
                st.ran = True
                xa = _cast(a, x)
                out = (
                    st.variant.forward_input(a, xa)
                    if st.coef == 1.0
                    else st.variant.scaled_forward_input(a, xa, st.coef)
                )
                x = out if out.dtype == x.dtype else out.to(x.dtype)
        pieces.append(x)
        seen.append(s)
    stack.seen = seen
    x = torch.cat(pieces).index_select(0, rows.inv)
    return ((x, *args[1:]), kwargs) if key is None else (args, {**kwargs, key: x})


def output_hook(layer: nn.Module, stack: AdapterStack, args: tuple, kwargs: dict[str, Any], y: Any) -> torch.Tensor:
    """Output-side adapters per group of rows (or all rows in one batched matmul), reassembled in batch order."""
    seen, stack.seen = stack.seen, None
    name = stack.order[0]._lora_lite.name
    x = args[0] if args else guards.layer_input(layer, args, kwargs, name)[0]
    rows = _check_batch(layer, stack, x)
    guards.check_output(layer, y, name)
    if rows.slots is not None and not (layer.training and any(a._lora_lite.cfg.dropout for a in rows.slots)):
        return _batched_lowrank(rows, x, y)
    pieces = []
    for g, (idx, adapters) in enumerate(rows.groups):
        yg = y.index_select(0, idx)
        xg = None if seen is not None else x.index_select(0, idx)
        for a in stack.outputs:
            st = a._lora_lite
            xa = seen[g][id(a)] if seen is not None else xg
            if a in adapters and st.on:
                st.ran = True
                xa = _cast(a, xa)
                out = st.variant.forward(a, xa, yg) if st.coef == 1.0 else st.variant.scaled_forward(a, xa, yg, st.coef)
                yg = out if out.dtype == y.dtype else out.to(y.dtype)
            elif st.variant.rewrites_weight and st.on:  # the weight is its residual: these rows need the original
                yg = _original_output(a, xa).to(y.dtype)
        pieces.append(yg)
    return torch.cat(pieces).index_select(0, rows.inv)


def _original_output(a: LayerAdapter, x: torch.Tensor) -> torch.Tensor:
    W0 = original.original_weight(a).to(x.dtype)
    y = x @ W0 if is_conv1d(a) else F.linear(x, W0)
    return y if a.bias is None else y + a.bias.to(x.dtype)


def _batched_lowrank(rows: Rows, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """y + s_i·(x_i A_iᵀ) B_iᵀ for every row i at once: the rows' factors gathered, two batched matmuls."""
    xa = _cast(rows.slots[0], x)
    Bs, As = [], []
    for a in rows.slots:
        st = a._lora_lite
        B, A, s = st.variant.delta_factors(a)
        st.ran = st.ran or st.on
        Bs.append(B.to(xa.dtype) * (s * st.coef if st.on else 0.0))
        As.append(A.to(xa.dtype))
    r = max(A.shape[0] for A in As)
    if any(A.shape[0] != r for A in As):
        As = [F.pad(A, (0, 0, 0, r - A.shape[0])) for A in As]
        Bs = [F.pad(B, (0, r - B.shape[1])) for B in Bs]
    As.append(As[0].new_zeros(As[0].shape))  # the slot of rows without an adapter
    Bs.append(Bs[0].new_zeros(Bs[0].shape))
    A_rows = torch.stack(As).index_select(0, rows.slot_of_row)  # (n, r, d_in)
    B_rows = torch.stack(Bs).index_select(0, rows.slot_of_row)  # (n, d_out, r)
    xs = xa.reshape(rows.n, -1, xa.shape[-1])
    h = torch.bmm(xs, A_rows.transpose(1, 2))
    d = torch.bmm(h, B_rows.transpose(1, 2))
    return y + d.view(*y.shape[:-1], d.shape[-1]).to(y.dtype)
