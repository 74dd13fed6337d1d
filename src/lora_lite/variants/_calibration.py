"""Calibration for data-driven inits (eva): stream a model's batches and collect, per target layer, the exact
float64 statistics of its inputs (XᵀX, Σx, n), with padding and ignored labels masked out, summed over
torch.distributed ranks. `input_stats` runs the pass; `_Scatter.top(r)` gives the top-r principal directions.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..config import ConfigError
from ..variant import layer_input


class _Scatter:
    """Streaming float64 XᵀX, Σx and n of the rows one layer sees."""

    def __init__(self, d: int, device: torch.device) -> None:
        self.xtx = torch.zeros(d, d, dtype=torch.float64, device=device)
        self.sum = torch.zeros(d, dtype=torch.float64, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.to(self.xtx.device, torch.float64)
        self.xtx.addmm_(x.T, x)
        self.sum += x.sum(0)
        self.n += x.shape[0]

    def top(self, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(V_rᵀ (r, d), σ_r (r,)) of the centred rows, largest σ first, peft's sign convention."""
        cov = self.xtx - torch.outer(self.sum, self.sum) / self.n  # Xcᵀ Xc
        evals, evecs = torch.linalg.eigh(cov)  # ascending
        v = evecs[:, -r:].flip(-1).T.contiguous()  # (r, d)
        sigma = evals[-r:].flip(-1).clamp_min(0).sqrt()
        idx = v.abs().argmax(dim=1)
        v *= torch.sign(v[torch.arange(r, device=v.device), idx]).unsqueeze(1)
        return v, sigma


def _sum_over_ranks(stats: dict[str, _Scatter]) -> None:
    """Under torch.distributed, sum XᵀX, Σx and n over all ranks (a collective) before the PCA."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for st in stats.values():
        n = torch.tensor(float(st.n), dtype=torch.float64, device=st.xtx.device)  # exact below 2**53 rows
        for t in (st.xtx, st.sum, n):
            dist.all_reduce(t)
        st.n = int(n.item())


def _progress(it: Iterable, show: bool) -> Iterable:
    if not show:
        return it
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is optional
        return it
    return tqdm(it, desc="eva calibration", leave=False, disable=None)  # disable=None: off when not a tty


def _forward_names(model: nn.Module) -> set[str]:
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return set()
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _rows(name: str, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Flatten a layer input to (tokens, d_in), dropping masked (padding) tokens."""
    if mask is None:
        return x.reshape(-1, x.shape[-1])
    if tuple(x.shape[:-1]) == tuple(mask.shape):
        return x[mask]
    if x.dim() == 2 and x.shape[0] == mask.numel():
        return x[mask.reshape(-1)]
    raise ConfigError(
        f"{name}: eva cannot line up this layer's input of shape {tuple(x.shape)} with the batch's "
        f"attention mask of shape {tuple(mask.shape)} (it expects (..., d_in) with leading dims equal to the "
        "mask's). Pass batches without attention_mask if they have no padding (and without labels, or with "
        "variant_kwargs={'use_label_mask': False})."
    )


def input_stats(
    model: nn.Module, targets: list[tuple[str, nn.Module, str]], calibration_data: Any, kw: dict[str, Any]
) -> tuple[dict[str, _Scatter], int]:
    """Run `calibration_data` through `model` (eval mode, no grad, temporary hooks): ({name: stats}, batches)."""
    if isinstance(calibration_data, (torch.Tensor, Mapping)):  # one batch given as such
        calibration_data = [calibration_data]
    stats = {name: _Scatter(layer.lora_A.shape[1], layer.lora_A.device) for name, layer, _ in targets}
    current: dict[str, torch.Tensor | None] = {"mask": None}

    def make_hook(name: str):
        def hook(mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            x = layer_input(mod, args, kwargs)[0]
            stats[name].add(_rows(name, x.detach(), current["mask"]))

        return hook

    device = next(model.parameters()).device
    names = _forward_names(model)
    modes = {m: m.training for m in model.modules()}  # restored per module, not by model.train(flag)
    handles = [layer.base_layer.register_forward_hook(make_hook(n), with_kwargs=True) for n, layer, _ in targets]
    n_batches = 0
    try:
        model.eval()
        with torch.no_grad():
            for batch in _progress(calibration_data, kw.get("show_progress_bar", True)):
                n_batches += 1
                if isinstance(batch, torch.Tensor):
                    current["mask"] = None
                    model(batch.to(device))
                elif isinstance(batch, Mapping):
                    b = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                    mask = b.get("attention_mask")
                    mask = None if mask is None else torch.as_tensor(mask, device=device).bool()
                    labels = b.get("labels")
                    if labels is not None and kw.get("use_label_mask", True):
                        keep = torch.as_tensor(labels, device=device) != kw.get("label_mask_value", -100)
                        if mask is not None and keep.shape != mask.shape:
                            raise ConfigError(
                                f"eva: batch {n_batches} has labels of shape {tuple(keep.shape)} and an "
                                f"attention_mask of shape {tuple(mask.shape)}: label masking needs per-token "
                                "labels (causal LM). For per-sequence labels (classification) pass "
                                "variant_kwargs={'use_label_mask': False}, or leave the labels out"
                            )
                        mask = keep if mask is None else mask & keep
                    current["mask"] = mask
                    model(**({k: v for k, v in b.items() if k in names} if names & set(b) else b))
                else:
                    raise ConfigError(
                        f"eva calibration batches must be tensors or dicts (input_ids, attention_mask, ...), "
                        f"got {type(batch).__name__} in batch {n_batches}"
                    )
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    if n_batches == 0:
        raise ConfigError("eva: calibration_data yielded no batches")
    if n_batches == 0:
        raise ConfigError("eva: calibration_data yielded no batches")
    _sum_over_ranks(stats)
    return stats, n_batches
