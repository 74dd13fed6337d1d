"""The in-place update of the base output (variant.add_lowrank with `writable`): taken when safe, never visible.

The forward hook lets a variant add its low-rank update into the base layer's output tensor itself (no copy
of a (…, d_out) activation) only if nobody else can hold that tensor. These tests pin both halves: the fast
path is really taken in the common case (a regression to out of place would be silent otherwise), and a
user's hook registered before ours, a global hook, or ll.scaled each see exactly the values they would see
without it, with gradients equal to the out-of-place computation's.
"""

from __future__ import annotations

import pytest
import torch
from _models import ad
from torch import nn

import lora_lite as ll

VARIANTS = ["lora", "dora", "delora", "pissa", "eva", "antipasto"]  # every add_lowrank user


def _model(variant: str, bias: bool) -> nn.Sequential:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 24, bias=bias), nn.Tanh(), nn.Linear(24, 16, bias=bias))
    calib = [torch.randn(4, 5, 16)] if variant == "eva" else None
    ll.attach(m, ll.LoraLiteConfig(variant=variant, r=4, target_names=(r"^[02]$",)), calibration_data=calib)
    with torch.no_grad():  # move every trainable tensor off its init so B = 0 hides nothing
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return m


def _grads(m: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x = x.clone().requires_grad_(True)
    y = m(x)
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    g = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}
    m.zero_grad(set_to_none=True)
    return y.detach(), {"x": x.grad, **g}


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("variant", VARIANTS)
def test_update_is_in_place_and_matches_out_of_place(variant: str, bias: bool) -> None:
    m = _model(variant, bias)
    x = torch.randn(3, 5, 16)
    layer = m[0]
    base_out = []

    class Recording(type(layer)):  # the base forward itself (not a hook) keeps y: sees it before our hook
        def forward(self, t: torch.Tensor) -> torch.Tensor:
            y = super().forward(t)
            base_out.append((y, y.clone()))
            return y

    cls, layer.__class__ = layer.__class__, Recording  # (a forward set on the instance turns the in-place path off)
    y_fast, g_fast = _grads(m, x)
    layer.__class__ = cls
    y, before = base_out[-1]
    assert not torch.equal(y, before), "the update was not made in place (the base output was copied)"

    seen = []
    pre = layer.register_forward_hook(lambda _m, _a, o: seen.append((o, o.clone())), prepend=True)  # before ours
    y_slow, g_slow = _grads(m, x)
    pre.remove()
    stored, copy = seen[-1]
    assert torch.equal(stored, copy), "a hook registered before ours saw its tensor change"
    assert torch.equal(y_fast, y_slow)  # the same gemm, in place or not, and addmm's own backward: same bits
    for k in g_slow:
        assert torch.equal(g_fast[k], g_slow[k]), k


def test_global_hook_disables_the_in_place_path() -> None:
    m = _model("lora", bias=False)
    x = torch.randn(2, 5, 16)
    seen = []
    h = nn.modules.module.register_module_forward_hook(
        lambda mod, _a, o: seen.append((o, o.clone())) if mod is m[0] else None
    )
    try:
        m(x)
    finally:
        h.remove()
    stored, copy = seen[0]
    assert torch.equal(stored, copy)


def test_hook_registered_before_attach_keeps_the_base_output() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 24))
    seen = []
    m[0].register_forward_hook(lambda _m, _a, o: seen.append(o))  # e.g. an activation cache set up first
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        ref = m(x).clone()
        ll.attach(m, ll.LoraLiteConfig(variant="lora", r=4, target_names=(r"^0$",)))
        nn.init.normal_(ad(m[0]).lora_B)
        y = m(x)
    assert torch.equal(seen[-1], ref) and not torch.equal(y, ref)


def test_scaled_and_disabled_are_unaffected() -> None:
    m = _model("lora", bias=True)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():  # the first layer alone: ll.scaled interpolates each layer's output linearly
        y1 = m[0](x)
        with ll.disabled(m):
            y0 = m[0](x)
        with ll.scaled(m, 0.5):
            yh = m[0](x)
    assert torch.allclose(yh, y0 + 0.5 * (y1 - y0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_grad_and_inference_mode_match_out_of_place_bit_for_bit(variant: str) -> None:
    """Without autograd the in-place update is the same gemm as the out-of-place one: identical bits."""
    m = _model(variant, bias=True)
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        y_ng = m(x)
    with torch.inference_mode():
        y_inf = m(x)
    hooks = [layer.base_layer.register_forward_hook(lambda *_: None, prepend=True) for layer in ll.targets(m).values()]
    with torch.no_grad():
        y_oop = m(x)  # a hook before ours: out of place
    for h in hooks:
        h.remove()
    assert torch.equal(y_ng, y_inf) and torch.equal(y_ng, y_oop)


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_torch_func_per_sample_gradients_and_double_backward(variant: str) -> None:
    """torch.func transforms take the out-of-place path (an autograd.Function would need a vmap rule)."""
    from torch.func import functional_call, grad, vmap

    m = _model(variant, bias=False)
    params = {k: v.detach() for k, v in m.named_parameters()}
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(0))

    def loss(p: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
        return functional_call(m, p, (xi.unsqueeze(0),)).pow(2).sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, x)
    for i in range(x.shape[0]):
        m.zero_grad(set_to_none=True)
        m(x[i : i + 1]).pow(2).sum().backward()
        for k, p in m.named_parameters():
            if p.requires_grad:
                # vmap's batched kernels sum in another order: fp32 rounding relative to the gradient's scale
                atol = 1e-6 * p.grad.abs().max().item()
                assert torch.allclose(per_sample[k][i], p.grad, rtol=1e-5, atol=atol), k
    xg = x.clone().requires_grad_(True)  # double backward (e.g. a gradient penalty) through the in-place path
    (gx,) = torch.autograd.grad(m(xg).sum(), xg, create_graph=True)
    gx.pow(2).sum().backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


class _FlatBuffer(nn.Module):
    """Linear-like, but its output is a view of a flat (1-D) result: not a layout the in-place path can use."""

    def __init__(self) -> None:
        super().__init__()
        self.in_features, self.out_features = 16, 24
        self.weight = nn.Parameter(torch.randn(24, 16))
        self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.weight.T).flatten().clone().view(*x.shape[:-1], 24)  # y views a 1-D tensor


@pytest.mark.parametrize("variant", ["lora", "dora", "delora"])
def test_output_viewing_a_flat_result_takes_the_out_of_place_path(variant: str) -> None:
    torch.manual_seed(0)
    m = nn.Sequential(_FlatBuffer())
    x = torch.randn(3, 5, 16)
    ll.attach(m, ll.LoraLiteConfig(variant=variant, r=4, target_names=(r"^0$",)))
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    y, g = _grads(m, x)
    ref = nn.Linear(16, 24, bias=False)
    with torch.no_grad():
        ref.weight.copy_(ll.merged_state_dict(m)["0.weight"])
    # fp32: the merged product rounds differently from the hooked one, to ~eps·max|y| (delora's outputs reach ~28 here)
    assert torch.allclose(y, ref(x), rtol=1e-5, atol=1e-6 * max(1.0, y.abs().max().item()))
    assert all(torch.isfinite(v).all() and v.abs().sum() > 0 for v in g.values())
