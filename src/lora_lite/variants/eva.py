"""EVA. Paischer et al. 2024, "One Initialization to Rule them All: Fine-tuning via Explained Variance
Adaptation", arXiv 2410.07170.

LoRA whose A is initialised from data: the top-r principal directions of each target's inputs.

    y' = y + s · (drop(x) Aᵀ) Bᵀ          exactly lora's forward (we call `LoRA.forward`)
    X  = the layer's inputs over the calibration data, one row per non-padding token: (n, d_in)
    Xc = X − 1μᵀ (μ: mean row) = U Σ Vᵀ  →  A = V_rᵀ (top-r, largest first): (r, d_in), B = 0: (d_out, r)
    whiten=True:  A_i = V_i / √σ_i

Computed exactly in one streaming pass: float64 S = XᵀX, Σx and n per target (d_in² memory), then
eigh of Xcᵀ Xc = S − (Σx)(Σx)ᵀ / n; summed over ranks under torch.distributed. Padding (attention_mask)
and label_mask_value labels are masked out, as peft.

Identity at init: B = 0 makes the update exactly zero; A is trainable (as peft): B gets a gradient on
step 1, A from step 2. `ll.load` needs no calibration data: A and B come from the file.

Merge, steering and peft export: exactly lora's (W + s·B A; `ll.scaled` scales the update by c; a plain
peft LoRA).

Checked against peft 0.21.2 `peft/tuners/lora/eva.py` and `peft/utils/incremental_pca.py`: peft's
randomized IncrementalPCA approximates the subspace we compute exactly; uniform rank = peft's rho=1.0.

Notes: docs/variants/eva.md.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..config import ConfigError, LoraLiteConfig
from ..variant import ParamSpec, Variant, layer_input, register
from .lora import LoRA, nonzero_alpha

_KWARGS = {
    "use_rslora": bool,
    "whiten": bool,
    "use_label_mask": bool,
    "label_mask_value": int,
    "show_progress_bar": bool,
}


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


@register
class EVA(Variant):
    name = "eva"
    b_tensors = ("lora_B",)  # LoRA+: peft's lora_B
    kwargs = tuple(_KWARGS)

    @staticmethod
    def validate(cfg: LoraLiteConfig) -> None:
        nonzero_alpha(cfg)
        for k, v in cfg.variant_kwargs.items():  # (unknown keys: the config refuses them, `kwargs`)
            if isinstance(v, bool) is not (_KWARGS[k] is bool) or not isinstance(v, _KWARGS[k]):
                raise ConfigError(f"eva: variant_kwargs[{k!r}] must be a {_KWARGS[k].__name__}, got {v!r}")

    @staticmethod
    def param_specs(d_in: int, d_out: int, cfg: LoraLiteConfig) -> dict[str, ParamSpec]:
        return {
            "lora_A": ParamSpec((cfg.r, d_in), init="zeros"),  # set by group_init (attach) or the file (load)
            "lora_B": ParamSpec((d_out, cfg.r), init="zeros"),
        }

    forward = staticmethod(LoRA.forward)
    merged_weight = staticmethod(LoRA.merged_weight)
    peft_type, peft_tensors, peft_config = "LORA", staticmethod(LoRA.peft_tensors), staticmethod(LoRA.peft_config)

    @staticmethod
    def group_init(
        model: nn.Module, targets: list[tuple[str, nn.Module, str]], cfg: LoraLiteConfig, calibration_data: Any
    ) -> None:
        """Run `calibration_data` through `model` (eval mode, no grad, temporary hooks); set A = top-r PCs."""
        if calibration_data is None:
            raise ConfigError(
                "eva needs calibration_data=... at attach: a DataLoader or iterable of batches (tensors, or dicts "
                "with input_ids and optionally attention_mask/labels). ll.load needs none."
            )
        if isinstance(calibration_data, (torch.Tensor, Mapping)):  # one batch given as such
            calibration_data = [calibration_data]
        kw = cfg.variant_kwargs
        r = cfg.r
        for name, layer, _ in targets:
            if r > layer.lora_A.shape[1]:
                raise ConfigError(f"{name}: eva rank r={r} exceeds the layer's d_in={layer.lora_A.shape[1]}")
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
        _sum_over_ranks(stats)
        with torch.no_grad():
            for name, layer, _ in targets:
                st = stats[name]
                if st.n < r + 1:  # centring uses one degree of freedom: n rows span at most n - 1 directions
                    raise ConfigError(
                        f"{name}: eva saw only {st.n} non-padding input rows (tokens) in {n_batches} calibration "
                        f"batches but needs at least r + 1 = {r + 1} for a rank-{r} PCA. Pass more calibration data."
                    )
                v, sigma = st.top(r)
                if kw.get("whiten", False):
                    # < 1e-6 of the top variance is rounding noise: whitening it would scale its row of A > 1000x
                    if bool((sigma <= 1e-6 * sigma[0].clamp_min(1e-300)).any()):
                        raise ConfigError(
                            f"{name}: whiten=True but this layer's calibration inputs span fewer than r={r} directions "
                            f"(variances {sigma.tolist()}: below 1e-6 of the largest, whitening would scale those rows "
                            "of A by > 1000x); use more varied data, a smaller r, or whiten=False"
                        )
                    v = v / sigma.sqrt().unsqueeze(1)
                layer.lora_A.copy_(v)
                layer.lora_B.zero_()
