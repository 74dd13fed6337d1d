"""LoHa and LoKr on `nn.Conv1d/2d/3d` (variant="loha" / "lokr" route a convolution target here).

    y' = y + convNd(x, ΔW.view(W.shape), stride, padding, dilation, groups), ΔW (c_out, c_in/g·∏k) built per call
    loha: ΔW = s·(W1a W1b) ⊙ (W2a W2b) on the dense (c_out, c_in/g·∏k) view (the tensors are the linear form's);
          use_effective_conv2d (kernel ≠ 1): ΔW = s·R1 ⊙ R2, R_i[p, q, κ] = Σ_ij T_i[i, j, κ] W_ia[i, p] W_ib[j, q],
          T_i: (r, r, *k), W_ia: (r, c_out), W_ib: (r, c_in/g) (Tucker factors, peft's hada_t1 / hada_t2)
    lokr: ΔW = s·kron(W1, W2) with (o, k) = factorization(c_out), (m, n) = factorization(c_in/g); W2 full
          (k, n, *kernel), else W2a W2b with W2b (r, n·∏k), else (use_effective_conv2d) Tucker from T2 (r, r, *k)

The tensors have peft's shapes (a Conv1d's T is (r, r, k, 1), as peft), so export / import copy them as they are.
On a Conv1d with a full W2 (k, n, kernel) peft's torch.kron pairs a 2-D W1 with a 3-D W2 (it pads W1 to
(1, o, m)) before reshaping to W's shape; lora-lite computes that same tensor, so files interchange.
Init and identity at init: as the linear forms (loha W2b = 0, lokr W1 = 0; T kaiming-uniform): ΔW = 0.
Merge: W + ΔW on the dense view. Steering (`ll.scaled`): y + c·(conv with ΔW). rank / module dropout: peft's.
Refused at attach: padding_mode ≠ "zeros". export_peft refuses a Conv3d (peft 0.21.2 has no Conv3d LoHa / LoKr).

Checked against peft 0.21.2 `peft/tuners/loha/layer.py` (`create_adapter_parameters`, `update_layer`,
`Conv2d`, `Conv1d`, `HadaWeightCP`) and `peft/tuners/lokr/layer.py` (`update_layer`, `make_weight_cp`, `make_kron`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, LoraLiteConfig
from ..variant import FORMS, ParamSpec
from . import loha, lokr
from ._lycoris import lycoris_drop

_CONV = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}  # by the kernel's dim


def _geometry(c: nn.Module, cfg: LoraLiteConfig) -> tuple[int, int, tuple[int, ...], bool]:
    """(c_out, c_in/groups, peft's kernel shape of T (a Conv1d's (k, 1)), use the Tucker form), as peft decides."""
    if c.padding_mode != "zeros":
        raise ConfigError(
            f"{type(c).__name__} with padding_mode={c.padding_mode!r}: peft's {cfg.variant} convolves the update with "
            "zero padding, so its forward and merge differ at the borders; lora-lite adapts padding_mode='zeros' "
            "only. Leave this layer out of target_names."
        )
    k = tuple(c.kernel_size) + ((1,) if len(c.kernel_size) == 1 else ())
    eff = cfg.variant_kwargs.get("use_effective_conv2d", False) and math.prod(c.kernel_size) != 1
    return c.out_channels, c.in_channels // c.groups, k, eff


def _tucker(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """R[p, q, κ] = Σ_ij T[i, j, κ] Wa[i, p] Wb[j, q], flattened to (c_out, c_in/g·∏k) (peft's einsum)."""
    return torch.einsum("ij...,ip,jq->pq...", t, wa, wb).reshape(wa.shape[1], -1)


class _ConvForm:
    """forward, merge and export from `delta(layer, dtype)` (ΔW on the dense view) and `peft_names`."""

    peft_names: dict[str, str] = {}

    @classmethod
    def forward(cls, layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        c, kw = layer.base_layer, layer._lora_lite.cfg.variant_kwargs
        skip, mask = lycoris_drop(layer, c.out_channels, x.device, cls.name == "loha" or kw.get("rank_dropout_scale"))
        if skip:
            return y
        dW = cls.delta(layer)
        dW = (dW if mask is None else dW * mask.to(dW.dtype)[:, None]).reshape(c.weight.shape)
        return y + _CONV[c.weight.dim()](x, dW, None, c.stride, c.padding, c.dilation, c.groups)

    @classmethod
    def merged_weight(
        cls, layer: nn.Module, W: torch.Tensor, b: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return W + cls.delta(layer, W.dtype), b

    @classmethod
    def peft_tensors(cls, layer: nn.Module) -> dict[str, torch.Tensor]:
        if layer.weight.dim() == 5:
            raise ConfigError(
                f"{layer._lora_lite.name}: peft 0.21.2 has no {cls.name} for nn.Conv3d, so it cannot load this "
                "adapter; use ll.save, or ll.merge it"
            )
        return {
            theirs: getattr(layer, ours) for ours, theirs in cls.peft_names.items() if ours in layer._lora_lite.names
        }


_HADA = {**loha._NAMES, "lora_t1": "hada_t1", "lora_t2": "hada_t2"}


class LoHaConv(_ConvForm, loha.LoHa):
    """loha on a convolution: y + conv(x, s·(W1a W1b) ⊙ (W2a W2b)), or its Tucker form."""

    peft_names = _HADA

    @staticmethod
    def layer_specs(layer: nn.Module, cfg: LoraLiteConfig) -> dict[str, ParamSpec]:
        c_out, c_in, k, eff = _geometry(layer, cfg)
        if not eff:
            return loha.LoHa.param_specs(c_in * math.prod(layer.kernel_size), c_out, cfg)
        r = cfg.r
        out = {"lora_t1": ParamSpec((r, r, *k), init="kaiming"), "lora_t2": ParamSpec((r, r, *k), init="kaiming")}
        for i in (1, 2):
            out[f"lora_w{i}_a"] = ParamSpec((r, c_out), init="kaiming")
            out[f"lora_w{i}_b"] = ParamSpec((r, c_in), init="kaiming" if i == 1 else "zeros")  # ΔW = 0 at init
        return out

    @staticmethod
    def delta(layer: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
        if "lora_t1" not in layer._lora_lite.names:
            return loha.delta_weight(layer, dtype)
        t = {n: getattr(layer, n) if dtype is None else getattr(layer, n).to(dtype) for n in _HADA}
        r1 = _tucker(t["lora_t1"], t["lora_w1_a"], t["lora_w1_b"])
        return r1 * _tucker(t["lora_t2"], t["lora_w2_a"], t["lora_w2_b"]) * layer._lora_lite.scale


class LoKrConv(_ConvForm, lokr.LoKr):
    """lokr on a convolution: y + conv(x, s·kron(W1, W2)) with peft's factor shapes."""

    peft_names = {f"lora_{n}": f"lokr_{n}" for n in (*lokr._TENSORS, "t2")}

    @staticmethod
    def layer_specs(layer: nn.Module, cfg: LoraLiteConfig) -> dict[str, ParamSpec]:
        c_out, c_in, k, eff = _geometry(layer, cfg)
        _, (kk, n), _, full2 = lokr.shapes(c_in, c_out, cfg)
        r, K = cfg.r, math.prod(layer.kernel_size)
        w1 = {p: s for p, s in lokr.LoKr.param_specs(c_in, c_out, cfg).items() if p.startswith("lora_w1")}
        if full2:
            return {**w1, "lora_w2": ParamSpec((kk, n, *layer.kernel_size), init="kaiming")}
        if eff:
            return {**w1, "lora_t2": ParamSpec((r, r, *k), init="kaiming"),
                    "lora_w2_a": ParamSpec((r, kk), init="kaiming"), "lora_w2_b": ParamSpec((r, n), init="kaiming")}  # fmt: skip
        return {**w1, "lora_w2_a": ParamSpec((kk, r), init="kaiming"), "lora_w2_b": ParamSpec((r, n * K), init="kaiming")}  # fmt: skip

    @staticmethod
    def delta(layer: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
        w1, tucker = lokr._w(layer, 1), "lora_t2" in layer._lora_lite.names  # W2 (k, n, *kernel): make_weight_cp
        w2 = torch.einsum("ij...,ip,jq->pq...", layer.lora_t2, layer.lora_w2_a, layer.lora_w2_b) if tucker else None
        w2 = lokr._w(layer, 2) if w2 is None else w2
        if w2.dim() >= 4:  # peft's make_kron: W1 (o, m, 1, 1, ...); a 3-D W2 (Conv1d, full) is kron'd as is
            w1 = w1.reshape(*w1.shape, *(1,) * (w2.dim() - 2))
        dt = dtype or w1.dtype
        return (
            torch.kron(w1.to(dt), w2.to(dt).clone(memory_format=torch.contiguous_format)) * layer._lora_lite.scale
        ).reshape(layer.weight.shape[0], -1)


FORMS.update({("conv", "loha"): LoHaConv, ("conv", "lokr"): LoKrConv})
