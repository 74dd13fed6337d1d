"""LoKr. Edalati et al. 2022, "KronA: Parameter Efficient Tuning with Kronecker Adapter", arXiv 2212.10650;
Yeh et al. 2023, "Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to Model Evaluation",
arXiv 2309.14859 (as LyCORIS and peft implement it).

    ΔW = s · W1 ⊗ W2                    W1: (o, m), W2: (k, n), d_out = o·k, d_in = m·n, s = alpha / r
    y' = y + s · W1 X W2ᵀ               X = x reshaped (…, m, n); the result (…, o, k) reshaped (…, d_out)

(m, n) = factorization(d_in, decompose_factor), (o, k) likewise (peft's rule: a split of d into two
factors, the one ≤ the other as close to √d, or to decompose_factor, as it goes). W2 = W2a W2b (rank r)
when r < max(k, n)/2, else a full (k, n) tensor; W1 = W1a W1b likewise only with decompose_both=True.
The forward never forms ΔW (d_out × d_in): two small matmuls on the reshaped input.
Init (peft's `reset_adapter_parameters`): W1 = 0 (or W1a = 0 with W1b kaiming), W2 (or W2a, W2b)
kaiming-uniform(a=√5). Identity at init: W1 = 0 makes ΔW = 0, y' == y bit for bit; step 1: only W1
(W1a) gets a gradient. rank_dropout / module_dropout as loha (rank_dropout_scale: rescale the kept rows,
peft's default False); `use_effective_conv2d`: convolutions (lycoris_conv.py).

Merge (`ll.merge`): W_eff = W + s·kron(W1, W2), bias unchanged.
Steering (`ll.scaled(model, c)`): y + c·x ΔWᵀ (c = 0: the base model, c = 1: the adapter).
Checked against peft 0.21.2 `peft/tuners/lokr/layer.py` (`LoKrLayer.update_layer`, `factorization`).

Notes: docs/variants/lokr.md.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config import ConfigError, LoraLiteConfig
from ..variant import ParamSpec, Variant, register
from ._lycoris import check_lycoris, lycoris_config, lycoris_drop, lycoris_import
from .lora import routed

_TENSORS = ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b")  # lora_<name> here, lokr_<name> in peft


def factorization(d: int, factor: int = -1) -> tuple[int, int]:
    """(m, n), m ≤ n, m·n = d: `factor` itself when it divides d; else walk the divisors m of d upwards while
    m + n shrinks and m ≤ factor (factor = -1: no cap, so the pair nearest √d). peft's `factorization`."""
    if factor > 0 and d % factor == 0:
        return factor, d // factor
    cap = d if factor == -1 else factor
    m, n = 1, d
    while m < n:
        m2 = m + 1
        while d % m2:
            m2 += 1
        n2 = d // m2
        if m2 + n2 > m + n or m2 > cap:
            break
        m, n = m2, n2
    return (n, m) if m > n else (m, n)


def shapes(d_in: int, d_out: int, cfg: LoraLiteConfig) -> tuple[tuple[int, int], tuple[int, int], bool, bool]:
    """(o, m) of W1, (k, n) of W2, and whether each is a full tensor (peft's use_w1 / use_w2)."""
    f = cfg.variant_kwargs.get("decompose_factor", -1)
    (m, n), (o, k) = factorization(d_in, f), factorization(d_out, f)
    full1 = not (cfg.variant_kwargs.get("decompose_both", False) and cfg.r < max(o, m) / 2)
    full2 = not (cfg.r < max(k, n) / 2)
    return (o, m), (k, n), full1, full2


def _w(layer: nn.Module, i: int) -> torch.Tensor:
    """W1 or W2: the full tensor, or the product of its two rank-r factors."""
    if f"lora_w{i}" in layer._lora_lite.names:
        return getattr(layer, f"lora_w{i}")
    return getattr(layer, f"lora_w{i}_a") @ getattr(layer, f"lora_w{i}_b")


def kron_apply(w1: torch.Tensor, w2: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x (W1 ⊗ W2)ᵀ for x (…, m·n) -> (…, o·k), as W1 X W2ᵀ on X = x viewed (…, m, n)."""
    X = x.reshape(-1, w1.shape[1], w2.shape[1])
    Z = torch.matmul(w1, X @ w2.T)  # (N, o, k)
    return Z.reshape(*x.shape[:-1], w1.shape[0] * w2.shape[0])


@register
class LoKr(Variant):
    name = "lokr"
    kwargs = ("rank_dropout", "module_dropout", "use_effective_conv2d", "decompose_both", "decompose_factor",
              "rank_dropout_scale")  # fmt: skip
    peft_type = "LOKR"
    b_tensors = ()  # peft's LoRA+ B group takes "lora_B" names and 1-D tensors: LoKr has neither
    kinds = ("linear", "conv")  # convolutions: lycoris_conv.py
    route = classmethod(routed)

    @staticmethod
    def validate(cfg: LoraLiteConfig) -> None:
        check_lycoris(cfg, ("decompose_both", "rank_dropout_scale"))
        f = cfg.variant_kwargs.get("decompose_factor", -1)
        if isinstance(f, bool) or not isinstance(f, int) or not (f == -1 or f > 0):
            raise ConfigError(f"lokr: variant_kwargs['decompose_factor'] must be -1 (near √d) or an int > 0, got {f!r}")

    @staticmethod
    def param_specs(d_in: int, d_out: int, cfg: LoraLiteConfig) -> dict[str, ParamSpec]:
        (o, m), (k, n), full1, full2 = shapes(d_in, d_out, cfg)
        r = cfg.r
        if full1:
            specs = {"lora_w1": ParamSpec((o, m), init="zeros")}  # ΔW = 0 at init
        else:
            specs = {"lora_w1_a": ParamSpec((o, r), init="zeros"), "lora_w1_b": ParamSpec((r, m), init="kaiming")}
        if full2:
            return {**specs, "lora_w2": ParamSpec((k, n), init="kaiming")}
        return {**specs, "lora_w2_a": ParamSpec((k, r), init="kaiming"), "lora_w2_b": ParamSpec((r, n), init="kaiming")}

    @staticmethod
    def forward(layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        rescale = layer._lora_lite.cfg.variant_kwargs.get("rank_dropout_scale", False)
        skip, mask = lycoris_drop(layer, y.shape[-1], x.device, rescale)
        if skip:
            return y
        h = kron_apply(_w(layer, 1) * layer._lora_lite.scale, _w(layer, 2), x)  # s on W1: (l, m) products
        return y + (h if mask is None else h * mask.to(h.dtype))

    @staticmethod
    def merged_weight(
        layer: nn.Module, W: torch.Tensor, b: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """W + s·kron(W1, W2); bias unchanged."""
        return W + layer._lora_lite.scale * torch.kron(_w(layer, 1).to(W.dtype), _w(layer, 2).to(W.dtype)), b

    @staticmethod
    def peft_tensors(layer: nn.Module) -> dict[str, torch.Tensor]:
        return {f"lokr_{n}": getattr(layer, f"lora_{n}") for n in _TENSORS if f"lora_{n}" in layer._lora_lite.names}

    @staticmethod
    def peft_config(cfg: LoraLiteConfig, layers: dict[str, nn.Module]) -> dict[str, Any]:
        return lycoris_config(cfg, decompose_both=False, decompose_factor=-1, rank_dropout_scale=False)

    @staticmethod
    def peft_import(pc: dict, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, dict]]:
        per: dict[str, dict] = {}
        for key, t in tensors.items():
            module, _, tname = key.rpartition(".")
            if tname.removeprefix("lokr_") not in (*_TENSORS, "t2") or not tname.startswith("lokr_"):
                raise ValueError(f"tensor {key!r} is not a peft LoKr tensor")
            per.setdefault(module, {})["lora_" + tname.removeprefix("lokr_")] = t
        for module, ts in per.items():  # which of W1 / W2 are full is peft's rule again: check the file follows it
            for i in (1, 2):
                if (f"lora_w{i}" in ts) == (f"lora_w{i}_a" in ts or f"lora_w{i}_b" in ts):
                    raise ValueError(f"{module}: expected either lokr_w{i} or lokr_w{i}_a + lokr_w{i}_b")
        return lycoris_import(pc, "LOKR", ("decompose_both", "decompose_factor", "rank_dropout_scale")), per
