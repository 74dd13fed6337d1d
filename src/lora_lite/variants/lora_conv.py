"""LoRA and DoRA on `nn.Conv1d/2d/3d` (variant="lora" / "dora" route a convolution target here).

    y' = y + s · conv_B(conv_A(drop(x)))    A: (r, c_in·∏k), used as the kernel (r, c_in, *k) with the layer's
                                            stride, padding and dilation; B: (c_out, r), a 1×1 convolution
    dora: y' = y + (g − 1) ⊙ (y − b) + g ⊙ s·conv_B(conv_A(drop(x))),   g = m / sg(‖W + s·ΔW‖_row), m: (c_out,)
          (one norm per output channel over all its other dims, as peft; with dropout active, y − b is
          recomputed as conv(drop(x), W), as peft)

The tensors are lora's on the convolution's (c_out, c_in·∏k) view of W (`target.dense_weight`), so
ΔW = s·(B A).view(W.shape) (peft's get_delta_weight) and merge is lora's / dora's on that view.
Init: as lora (A kaiming-uniform, fan-in c_in·∏k as peft's conv lora_A; B = 0): the update is exactly zero.
Steering (`ll.scaled`): as lora / dora.

Refused at attach, naming the layer: groups > 1 (peft 0.21.2 adapts it only without merge, with its DoRA norm
not the effective weight's), padding_mode other than "zeros" (peft pads the adapter's input with zeros, so its
forward and its merge differ there). Dilation is the layer's; peft 0.21.2 builds lora_A without it (its
forward fails on a dilated kernel), so export_peft / import_peft refuse a dilated target.

Checked against peft 0.21.2 `peft/tuners/lora/layer.py` (`_ConvNd`: update_layer, get_delta_weight, forward),
`lora/dora.py` (`_DoraConvNdLayer`), `lora/variants.py` (`_DoraConvNdVariant`). Notes: docs/targeting.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, LoraLiteConfig
from ..variant import FORMS, dropout, writable
from .dora import DoRA, weight_norm
from .lora import LoRA

_CONV = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}  # by the kernel's dim


def _check(layer: nn.Module) -> None:
    c, name = layer.base_layer, layer._lora_lite.name
    if c.groups != 1:
        raise ConfigError(
            f"{name}: {type(c).__name__} with groups={c.groups}: lora-lite adapts convolutions with groups=1 only "
            "(peft 0.21.2 cannot merge a grouped one, and its DoRA norm there is not the weight's). Leave this "
            "layer out of target_names."
        )
    if c.padding_mode != "zeros":
        raise ConfigError(
            f"{name}: {type(c).__name__} with padding_mode={c.padding_mode!r}: peft pads the adapter's input with "
            "zeros, so its forward and merge differ at the borders; lora-lite adapts padding_mode='zeros' only. "
            "Leave this layer out of target_names."
        )


def _lowrank(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """s · conv_B(conv_A(x)), (…, c_out, *spatial) like the layer's output."""
    c = layer.base_layer
    conv = _CONV[c.weight.dim()]
    A = layer.lora_A.view(-1, c.in_channels, *c.kernel_size)
    h = conv(x, A, None, c.stride, c.padding, c.dilation) * layer._lora_lite.scale
    return conv(h, layer.lora_B.view(*layer.lora_B.shape, *(1,) * (c.weight.dim() - 2)))


def _channels(layer: nn.Module, v: torch.Tensor) -> torch.Tensor:
    """A per-output-channel vector shaped to broadcast over (…, c_out, *spatial)."""
    return v.view(-1, *(1,) * (layer.weight.dim() - 2))


def _peft(layer: nn.Module) -> dict[str, torch.Tensor]:
    c = layer.base_layer
    if any(d != 1 for d in c.dilation):
        raise ConfigError(
            f"{layer._lora_lite.name}: dilation={c.dilation}: peft 0.21.2 builds its lora_A without the layer's "
            "dilation, so it cannot run this adapter; use ll.save, or ll.merge it"
        )
    k = (1,) * (c.weight.dim() - 2)
    return {
        "lora_A.weight": layer.lora_A.view(-1, c.in_channels, *c.kernel_size),
        "lora_B.weight": layer.lora_B.view(*layer.lora_B.shape, *k),
    }


class LoRAConv(LoRA):
    """lora on a convolution: y + s · conv_B(conv_A(drop(x)))."""

    @staticmethod
    def init(layer: nn.Module, cfg: LoraLiteConfig) -> None:
        _check(layer)

    @staticmethod
    def forward(layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        u = _lowrank(layer, dropout(layer, x))
        return y.add_(u) if writable(layer, y) and u.dtype == y.dtype else y + u

    @staticmethod
    def peft_tensors(layer: nn.Module) -> dict[str, torch.Tensor]:
        return _peft(layer)


class DoRAConv(DoRA):
    """dora on a convolution: y + (g − 1) ⊙ (y − b) + g ⊙ s · conv_B(conv_A(drop(x)))."""

    @staticmethod
    def init(layer: nn.Module, cfg: LoraLiteConfig) -> None:
        _check(layer)
        DoRA.init(layer, cfg)

    @staticmethod
    def forward(layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        c = layer.base_layer
        g = _channels(layer, layer.lora_m / weight_norm(layer).to(x.dtype))  # gradient to m only
        xd = dropout(layer, x)
        if xd is x:  # the base part is y − b
            base = y if c.bias is None else y - _channels(layer, c.bias)
        else:  # dropout active: peft recomputes it on the dropped input
            base = _CONV[c.weight.dim()](xd, c.weight.to(xd.dtype), None, c.stride, c.padding, c.dilation, c.groups)
        return y + (g - 1) * base + g * _lowrank(layer, xd)

    @staticmethod
    def peft_tensors(layer: nn.Module) -> dict[str, torch.Tensor]:
        return {**_peft(layer), "lora_magnitude_vector": layer.lora_m.view(1, -1, *(1,) * (layer.weight.dim() - 2))}


FORMS.update({("conv", "lora"): LoRAConv, ("conv", "dora"): DoRAConv})
