"""ll.disabled and ll.scaled (issue 7): the base model without a second copy, and a steering coefficient c."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _models import ad
from test_merge import _adapted, _gpt2, perturb, rel
from test_variants_common import ALL_ROLES, CASES, _out

import lora_lite as ll
from lora_lite.variants.antipasto import block_size, max_angle, rotation_blocks

NAMES = list(CASES)


def _setup(name: str, kind: str = "llama"):
    """(model with a perturbed adapter, input, base output, adapted output): test_merge's `_adapted`."""
    return _adapted(name, kind)


@pytest.mark.parametrize("name", NAMES)
def test_disabled_is_exactly_the_base_model_and_restores(name: str) -> None:
    model, x, base, adapted = _setup(name)
    with torch.no_grad():
        with ll.disabled(model) as m:
            assert m is model
            assert torch.equal(_out(model, "llama", x), base)  # bit for bit, also for pissa / antipasto
            with ll.disabled(model):  # nesting: the inner block must not restore the adapter early
                pass
            assert torch.equal(_out(model, "llama", x), base)
        assert torch.equal(_out(model, "llama", x), adapted)


@pytest.mark.parametrize("name", ["pissa", "antipasto", "lora"])
def test_disabled_restores_on_exception(name: str) -> None:
    model, x, base, adapted = _setup(name)
    weights = {n: layer.weight.detach().clone() for n, layer in ll.targets(model).items()}
    with pytest.raises(KeyError), ll.disabled(model):
        raise KeyError("boom")
    assert all(torch.equal(layer.weight, weights[n]) for n, layer in ll.targets(model).items())  # W_res is back
    assert all(ad(layer)._lora_lite.enabled for layer in ll.targets(model).values())
    with torch.no_grad():
        assert torch.equal(_out(model, "llama", x), adapted)


def test_detach_inside_disabled_leaves_the_base_model() -> None:
    model, x, base, _ = _setup("pissa")
    with ll.disabled(model):
        ll.detach(model)
    with torch.no_grad():
        assert torch.equal(_out(model, "llama", x), base)  # the original weight, not W_res swapped back in


def test_disabled_trains_nothing_and_gives_a_reference_model() -> None:
    """DPO-style use: the reference forward under disabled builds no graph (every base parameter is frozen)."""
    model, x, _, _ = _setup("lora")
    with ll.disabled(model):
        assert not model(x).logits.requires_grad
    assert model(x).logits.requires_grad


@pytest.mark.parametrize("name", NAMES)
def test_scaled_zero_is_base_one_is_adapter(name: str) -> None:
    model, x, base, adapted = _setup(name)
    with torch.no_grad():
        with ll.scaled(model, 0.0):
            # pissa/antipasto split W into W_res + a rank-r part: c = 0 is the base to fp32 rounding (1e-5, see
            # test_variants_common); the other variants' c = 0 adds exactly zero
            assert rel(_out(model, "llama", x), base) <= 1e-5
        with ll.scaled(model, 1.0):
            assert torch.equal(_out(model, "llama", x), adapted)  # c = 1: the usual hook path
        assert torch.equal(_out(model, "llama", x), adapted)


def _layer_outputs(model, c: float) -> dict[str, tuple[torch.Tensor, ...]]:
    """(x, y_base, y_adapter, y_c) for every target layer called on its own with random inputs."""
    g = torch.Generator().manual_seed(11)
    out = {}
    with torch.no_grad():
        for name, layer in ll.targets(model).items():
            d_in = ad(layer).lora_g.shape[0] if ad(layer)._lora_lite.variant.name == "ia3_ff" else layer.in_features
            x = torch.randn(3, 5, d_in, generator=g)
            with ll.disabled(model):
                y0 = layer(x)
            y1 = layer(x)
            with ll.scaled(model, c):
                yc = layer(x)
            out[name] = (x, y0, y1, yc)
    return out


@pytest.mark.parametrize("c", [0.5, -1.0, 2.5])
@pytest.mark.parametrize("name", [n for n in NAMES if n not in ("antipasto", "oft", "boft", "road")])
def test_scaled_interpolates_each_layer_linearly(name: str, c: float) -> None:
    """Every variant but the fractional rotations (antipasto; oft, boft: tests/test_variants_oft_boft.py; road:
    tests/test_variants_road_adalora.py): y_c = y_base + c·(y_adapter − y_base) per layer (each is affine in x),
    with y_base the ORIGINAL layer's output for pissa."""
    model, *_ = _setup(name, "toy")
    for _, y0, y1, yc in _layer_outputs(model, c).values():
        want = y0 + c * (y1 - y0)
        assert rel(yc, want) <= 1e-5  # fp32 rounding of one extra subtraction / matmul


@pytest.mark.parametrize("c", [0.5, -1.0])
def test_scaled_ia3_interpolates_the_gate(c: float) -> None:
    model, *_ = _setup("ia3", "toy")
    for name, (x, y0, _, yc) in _layer_outputs(model, c).items():
        layer = ll.targets(model)[name]
        g = 1 + c * (ad(layer).lora_g - 1)
        want = (
            y0 * g
            if ad(layer)._lora_lite.variant.name == "ia3"
            else torch.nn.functional.linear(x * g, layer.weight, layer.bias)
        )
        assert rel(yc, want) <= 1e-6


def test_antipasto_rotation_inverse_identities() -> None:
    g = torch.Generator().manual_seed(0)
    rot_T = torch.randn(3, 6, generator=g)  # 3 blocks of size 4
    for ang in (None, torch.pi / 3):
        for c in (1.0, 0.3, 2.0):
            Rp, Rm = rotation_blocks(rot_T, 4, ang, c), rotation_blocks(rot_T, 4, ang, -c)
            eye = torch.eye(4).expand(3, 4, 4)
            assert (Rp @ Rm - eye).abs().max() <= 1e-6  # R(c) R(−c) = I
            assert (Rp @ Rp.transpose(-1, -2) - eye).abs().max() <= 1e-6  # orthogonal, so R(−c) = R(c)ᵀ
            assert (Rm - Rp.transpose(-1, -2)).abs().max() <= 1e-6
            Vh = torch.randn(12, 20, generator=g)
            there = (Rp @ Vh.view(3, 4, 20)).view(12, 20)  # c = +1 then c = −1 on the rotation part cancels
            back = (Rm @ there.view(3, 4, 20)).view(12, 20)
            assert (back - Vh).abs().max() <= 1e-5 * Vh.abs().max()
    assert torch.equal(rotation_blocks(rot_T, 4, None, 0.0), torch.eye(4).expand(3, 4, 4))  # c = 0: exactly I


@pytest.mark.parametrize("c", [-1.0, 0.5])
def test_scaled_antipasto_rotates_by_c(c: float) -> None:
    """y_c = x W_resᵀ + b + ((x (R(c) Vh)ᵀ) ⊙ (S + c·δs)) Uᵀ; at c = −1, R(−1) = R(1)ᵀ (the exact inverse)."""
    model, *_ = _setup("antipasto", "toy")
    for name, (x, _, _, yc) in _layer_outputs(model, c).items():
        layer = ll.targets(model)[name]
        cfg = ad(layer)._lora_lite.cfg
        bs = block_size(cfg)
        R = rotation_blocks(ad(layer).lora_rot_T, bs, max_angle(cfg), 1.0)
        if c == -1.0:
            R = R.transpose(-1, -2)
        else:
            R = rotation_blocks(ad(layer).lora_rot_T, bs, max_angle(cfg), c)
        Vh = (R @ ad(layer).lora_Vh.view(-1, bs, ad(layer).lora_Vh.shape[1])).view_as(ad(layer).lora_Vh)
        S = ad(layer).lora_S + c * ad(layer).lora_delta_s
        want = torch.nn.functional.linear(x, layer.weight, layer.bias) + ((x @ Vh.T) * S) @ ad(layer).lora_U.T
        assert rel(yc, want) <= 1e-5


def test_scaled_nests_restores_on_exception_and_validates() -> None:
    model, x, _, adapted = _setup("lora")
    states = [ad(layer)._lora_lite for layer in ll.targets(model).values()]
    with ll.scaled(model, 0.5):
        with pytest.raises(ValueError), ll.scaled(model, -2):
            assert all(st.coef == -2.0 for st in states)
            raise ValueError
        assert all(st.coef == 0.5 for st in states)
    assert all(st.coef == 1.0 for st in states)
    for bad in (float("nan"), float("inf"), True, "1", None, 1j, torch.tensor([0.5, 1.0]), torch.tensor(True)):
        with pytest.raises(ll.AdapterError, match="finite real number"), ll.scaled(model, bad):
            pass
    with (
        pytest.raises(ll.AdapterError, match=r"c requires grad.*c.item\(\)"),
        ll.scaled(model, torch.ones((), requires_grad=True)),
    ):
        pass
    assert all(st.coef == 1.0 for st in states)
    with torch.no_grad():  # numpy scalars and one-element tensors are numbers too
        with ll.scaled(model, 0.5):
            half = _out(model, "llama", x)
        for c in (np.float32(0.5), np.float64(0.5), torch.tensor(0.5), torch.tensor([0.5], dtype=torch.float64)):
            with ll.scaled(model, c):
                assert all(type(st.coef) is float and st.coef == 0.5 for st in states)
                assert torch.equal(_out(model, "llama", x), half)
    with torch.no_grad():
        assert torch.equal(_out(model, "llama", x), adapted)


def test_scaled_one_takes_the_plain_path(monkeypatch) -> None:
    """c == 1 (the default) never calls scaled_forward: no extra work in the common case."""
    model, x, _, _ = _setup("pissa")
    variant = next(iter(ll.targets(model).values()))._lora_lite.variant

    def boom(*a, **k):
        raise AssertionError("scaled_forward called at c == 1")

    monkeypatch.setattr(variant, "scaled_forward", boom)
    with torch.no_grad():
        _out(model, "llama", x)
        with ll.scaled(model, 1.0):
            _out(model, "llama", x)
        with pytest.raises(AssertionError, match="scaled_forward called"), ll.scaled(model, 0.5):
            _out(model, "llama", x)


def test_scaled_gradients_flow() -> None:
    """Steered training (e.g. contrastive c = ±1 objectives) gets gradients through scaled_forward."""
    model, x, _, _ = _setup("antipasto")
    with ll.scaled(model, -1.0):
        model(x).logits.square().mean().backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", ["pissa", "antipasto", "ia3", "hra"])
def test_disabled_and_scaled_gpt2_conv1d(name: str) -> None:
    """Conv1D keeps W as (d_in, d_out): the swapped-in original weight and pissa's y₀ must use that layout."""
    model = _gpt2()
    x = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = model(x).logits
    ll.attach(model, ll.LoraLiteConfig(variant=name, target_roles=ALL_ROLES, **CASES[name]["cfg"]))
    perturb(model)
    with torch.no_grad():
        adapted = model(x).logits
        assert rel(adapted, base) > 1e-2
        with ll.disabled(model):
            assert torch.equal(model(x).logits, base)
        with ll.scaled(model, 0.0):
            assert rel(model(x).logits, base) <= 1e-5
        assert torch.equal(model(x).logits, adapted)


@pytest.mark.parametrize("name", ["pissa", "antipasto"])
def test_backward_inside_disabled_uses_the_graphs_own_weights(name: str) -> None:
    """A graph built before the block (policy forward), differentiated inside it (after the reference forward),
    must see W_res, not the original weight swapped in for the block (the swap rebinds `weight.data`; autograd
    saved its own reference to the W_res storage, so an in-place copy_ here would be wrong, a rebind is not)."""
    model, x, _, _ = _setup(name)
    model(x).logits.square().mean().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    loss = model(x).logits.square().mean()
    with ll.disabled(model):
        with torch.no_grad():
            model(x)
        loss.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.grad, want[n]), n


def test_disabled_keeps_the_parameter_objects() -> None:
    model, *_ = _setup("pissa")
    params = {n: p for n, p in model.named_parameters()}
    with ll.disabled(model):
        pass
    assert all(p is params[n] for n, p in model.named_parameters())
    with ll.disabled(model):
        ll.detach(model)
    assert all(p is params[n] for n, p in model.named_parameters() if n in params)
