"""DoRA, DeLoRA, HRA: each forward against its formula written out by hand (random, non-init tensors,
biased layers), the traps of the original project, and fp32 parity with peft 0.21.2 (forward,
gradients, 10 AdamW steps) on a single biased nn.Linear.

Tolerances: fp32 with rtol 1e-5 (relative to the output scale) unless stated: every comparison is
between two fp32 evaluations of the same function that differ only in op order.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from _models import Toy, ad
from torch import nn

import lora_lite as ll
from lora_lite.variants.dora import weight_norm
from lora_lite.variants.hra import householder_product

D_IN, D_OUT, R = 16, 12, 4


class One(nn.Module):
    """A single linear-like layer named `lin` (the only target)."""

    def __init__(self, lin: nn.Module) -> None:
        super().__init__()
        self.lin = lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def _linear(bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(D_IN, D_OUT, bias=bias)


def _attach(lin: nn.Module, variant: str, **kw) -> One:
    model = One(lin)
    kw.setdefault("r", R)
    ll.attach(model, ll.LoraLiteConfig(variant=variant, target_names=(r"^lin$",), **kw))
    return model


def _randomize(layer: nn.Module, seed: int = 1) -> None:
    """Non-init values for every trainable lora_* tensor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in layer.named_parameters():
            if n.startswith("lora_") and p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if n in ("lora_m", "lora_lambda") else 0.0))


def _x(n: int = 5, d: int = D_IN, seed: int = 2) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> None:
    err = (a - b).abs().max().item()
    scale = max(b.abs().max().item(), 1e-30)
    assert err <= rtol * scale, f"max abs err {err:.3g} vs scale {scale:.3g}"


# ====================================================================== DoRA


def _dora_formula(x, W, b, A, B, m, s):
    """y' = b + m/‖W + sBA‖_row ⊙ (x Wᵀ + s x Aᵀ Bᵀ), norm detached."""
    n = torch.linalg.norm(W + s * B @ A, dim=1).detach()
    out = (m / n) * (x @ W.T + s * (x @ A.T) @ B.T)
    return out if b is None else out + b


@pytest.mark.parametrize("bias", [True, False])
def test_dora_matches_formula_bias_not_scaled(bias) -> None:
    lin = _linear(bias)
    W, b = lin.weight.detach().clone(), None if lin.bias is None else lin.bias.detach().clone()
    model = _attach(lin, "dora", alpha=8.0)
    _randomize(lin)
    x = _x()
    A, B, m = ad(lin).lora_A, ad(lin).lora_B, ad(lin).lora_m
    s = 8.0 / R
    out = model(x)
    ref = _dora_formula(x, W, b, A, B, m, s)
    _close(out, ref)
    if bias:  # the trap: scaling the bias too would give b * m/‖V‖, which is far from this
        wrong = (m / torch.linalg.norm(W + s * B @ A, dim=1)) * (x @ W.T + b + s * (x @ A.T) @ B.T)
        assert (out - wrong).abs().max() > 1e-3
    # gradients: the norm is a constant (detached) in both
    gA, gB, gm = torch.autograd.grad((out**2).sum(), (A, B, m))
    rA, rB, rm = torch.autograd.grad((ref**2).sum(), (A, B, m))
    for g, r in ((gA, rA), (gB, rB), (gm, rm)):
        _close(g, r)


def test_dora_weight_norm_formula_equals_dense_norm() -> None:
    lin = _linear()
    model = _attach(lin, "dora", alpha=8.0)
    _randomize(lin)
    dense = torch.linalg.norm(lin.weight + 2.0 * ad(lin).lora_B @ ad(lin).lora_A, dim=1)
    _close(weight_norm(ad(lin)), dense.detach(), rtol=1e-6)
    assert not weight_norm(ad(lin)).requires_grad
    ll.detach(model)


def test_dora_init_magnitude_is_row_norm_and_identity() -> None:
    lin = _linear()
    x = _x()
    y0 = lin(x)
    model = _attach(lin, "dora")
    _close(ad(lin).lora_m, torch.linalg.norm(lin.weight, dim=1), rtol=1e-6)
    assert torch.equal(ad(lin).lora_B, torch.zeros_like(ad(lin).lora_B))
    assert torch.equal(model(x), y0)


def test_dora_dropout_matches_peft_convention() -> None:
    """Training with dropout: y + (g-1)·drop(x)Wᵀ + g·s·drop(x)AᵀBᵀ (peft recomputes the base part on drop(x))."""
    lin = _linear()
    W, b = lin.weight.detach().clone(), lin.bias.detach().clone()
    model = _attach(lin, "dora", alpha=8.0, dropout=0.5)
    _randomize(lin)
    model.train()
    x = _x()
    torch.manual_seed(5)
    out = model(x)
    torch.manual_seed(5)
    xd = F.dropout(x, 0.5, training=True)
    A, B, m, s = ad(lin).lora_A, ad(lin).lora_B, ad(lin).lora_m, 2.0
    g = m / torch.linalg.norm(W + s * B @ A, dim=1)
    ref = x @ W.T + b + (g - 1) * (xd @ W.T) + g * (s * (xd @ A.T) @ B.T)
    _close(out, ref)
    model.eval()  # eval: no dropout, plain formula
    _close(model(x), _dora_formula(x, W, b, A, B, m, s))


def test_dora_gpt2_conv1d() -> None:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(D_OUT, D_IN)  # nf=out, nx=in; weight (d_in, d_out)
    nn.init.normal_(conv.bias)
    W, b = conv.weight.detach().t().clone(), conv.bias.detach().clone()
    x = _x()
    y0 = conv(x)
    model = _attach(conv, "dora", alpha=8.0)
    _close(ad(conv).lora_m, torch.linalg.norm(W, dim=1), rtol=1e-6)
    assert torch.equal(model(x), y0)
    _randomize(conv)
    _close(model(x), _dora_formula(x, W, b, ad(conv).lora_A, ad(conv).lora_B, ad(conv).lora_m, 2.0))


def _bnb_4bit(lin: nn.Linear) -> nn.Module:
    bnb = pytest.importorskip("bitsandbytes")
    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, compute_dtype=torch.float32)
    q.load_state_dict(lin.state_dict())
    return q.to("cpu")  # quantizes


def _bnb_8bit(lin: nn.Linear) -> nn.Module:
    bnb = pytest.importorskip("bitsandbytes")
    q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None, has_fp16_weights=False)
    q.load_state_dict(lin.state_dict())
    return q.to("cpu")


@pytest.mark.parametrize("quant", [_bnb_4bit, _bnb_8bit])
def test_dora_quantized_base(quant) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = quant(_linear())
        x = _x()
        y0 = q(x)
        W = ll.target.dense_weight(q)  # dequantized
        model = _attach(q, "dora", alpha=8.0)
        _close(ad(q).lora_m, torch.linalg.norm(W, dim=1), rtol=1e-6)
        assert torch.equal(model(x), y0)
        _randomize(q)
        out = model(x)
    # base part from the quantized layer's own output y: y' = b + g ⊙ (y - b + s x Aᵀ Bᵀ)
    b, A, B, m = q.bias.detach(), ad(q).lora_A, ad(q).lora_B, ad(q).lora_m
    g = m / torch.linalg.norm(W + 2.0 * B @ A, dim=1)
    _close(out, b + g * (y0 - b + 2.0 * (x @ A.T) @ B.T))
    out.sum().backward()
    assert ad(q).lora_A.grad.abs().sum() > 0 and ad(q).lora_m.grad.abs().sum() > 0


# ====================================================================== DeLoRA


def _delora_formula(x, W, b, A, B, lam, wnorm, r):
    An = A.norm(dim=1).clamp(min=1e-4)
    Bn = B.norm(dim=0).clamp(min=1e-4)
    dW = B @ torch.diag(lam / r / (An * Bn)) @ A @ torch.diag(wnorm)
    return x @ (W + dW).T + b


def test_delora_matches_formula() -> None:
    lin = _linear()
    W, b = lin.weight.detach().clone(), lin.bias.detach().clone()
    model = _attach(lin, "delora", variant_kwargs={"delora_lambda": 3.0})
    assert ad(lin).lora_lambda.shape == () and ad(lin).lora_lambda.item() == 3.0
    _close(ad(lin).lora_wnorm, torch.linalg.norm(W, dim=0), rtol=1e-6)
    assert not ad(lin).lora_wnorm.requires_grad and "lora_lite.default.lora_wnorm" in dict(lin.named_buffers())
    _randomize(lin)
    x = _x()
    out = model(x)
    ref = _delora_formula(x, W, b, ad(lin).lora_A, ad(lin).lora_B, ad(lin).lora_lambda, ad(lin).lora_wnorm, R)
    _close(out, ref)
    params = (ad(lin).lora_A, ad(lin).lora_B, ad(lin).lora_lambda)
    for g, r in zip(torch.autograd.grad((out**2).sum(), params), torch.autograd.grad((ref**2).sum(), params)):
        _close(g, r)  # norms are not detached: A and B also get gradient through ‖A_i‖, ‖B_i‖


def test_delora_gradient_schedule() -> None:
    """Step 1: only B moves (A, λ multiply B = 0). Step 2: A and λ have non-zero gradients."""
    torch.manual_seed(0)
    model = Toy(bias=True)
    ll.attach(model, ll.LoraLiteConfig(variant="delora", r=R, target_roles=("reader", "writer", "inner")))
    x = _x(6)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    grads = []
    for _ in range(2):
        opt.zero_grad()
        (model(x) ** 2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        opt.step()
    for n, g in grads[0].items():
        if n.endswith("lora_B"):
            assert g.abs().sum() > 0, n
        else:
            assert g.abs().sum() == 0, n
    for n, g in grads[1].items():
        assert g.abs().sum() > 0, n


@pytest.mark.parametrize("lam", [0, 0.0, float("nan"), "15", True])
def test_delora_rejects_bad_lambda(lam) -> None:
    with pytest.raises(ll.ConfigError, match="delora_lambda"):
        ll.LoraLiteConfig(variant="delora", variant_kwargs={"delora_lambda": lam})


@pytest.mark.parametrize("variant", ["dora", "delora", "hra"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_adapter_dtypes_run_finite(variant, dtype) -> None:
    torch.manual_seed(0)
    model = Toy(bias=True)
    x = _x(6)
    y0 = model(x)
    ll.attach(model, ll.LoraLiteConfig(variant=variant, r=R, dtype=dtype, target_roles=("reader", "writer")))
    y = model(x)
    assert y.dtype == y0.dtype
    _close(y, y0, rtol=1e-6 if dtype == torch.float64 else 1e-2)  # hra's pairs cancel only to adapter rounding
    y.sum().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad.dtype == dtype and torch.isfinite(p.grad).all(), n


def test_delora_gpt2_conv1d_and_4bit() -> None:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(D_OUT, D_IN)
    _attach(conv, "delora")
    _close(ad(conv).lora_wnorm, torch.linalg.norm(conv.weight.t(), dim=0), rtol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = _bnb_4bit(_linear())
        x = _x()
        y0 = q(x)
        model = _attach(q, "delora")
        assert torch.equal(model(x), y0)
    _close(ad(q).lora_wnorm, torch.linalg.norm(ll.target.dense_weight(q), dim=0), rtol=1e-6)


# ====================================================================== HRA


def _reflections(U: torch.Tensor) -> torch.Tensor:
    """Dense H_1 H_2 … H_r, H_i = I - 2 u_i u_iᵀ / ‖u_i‖² (the test's reference; never used by the library)."""
    Q = torch.eye(U.shape[1], dtype=U.dtype)
    for u in U:
        Q = Q @ (torch.eye(U.shape[1], dtype=U.dtype) - 2 * torch.outer(u, u) / (u @ u))
    return Q


def test_hra_matches_dense_formula_and_is_orthogonal() -> None:
    lin = _linear()
    W, b = lin.weight.detach().clone(), lin.bias.detach().clone()
    model = _attach(lin, "hra", r=6)
    _randomize(lin)
    U = ad(lin).lora_U
    x = _x()
    Q = _reflections(U)
    out = model(x)
    ref = (x @ Q.T) @ W.T + b  # y = W (H_1 … H_r x) + b
    _close(out, ref)
    gU, rU = torch.autograd.grad((out**2).sum(), U)[0], torch.autograd.grad((ref**2).sum(), U)[0]
    _close(gU, rU)
    # the product the pre-hook applies is orthogonal: rows of x' for x = I are Q's columns
    with torch.no_grad():
        Qt = householder_product(U, torch.eye(D_IN))
    _close(Qt, Q.T)
    _close(Qt @ Qt.T, torch.eye(D_IN))
    # order matters: the reversed product H_r … H_1 is a different matrix
    assert (Q - _reflections(U.flip(0))).abs().max() > 1e-3


def test_hra_apply_gs_matches_projector_formula() -> None:
    lin = _linear()
    W, b = lin.weight.detach().clone(), lin.bias.detach().clone()
    model = _attach(lin, "hra", variant_kwargs={"apply_GS": True})
    _randomize(lin)
    U = ad(lin).lora_U
    x = _x()
    Qr, _ = torch.linalg.qr(U.T)  # orthonormal basis of span(u_i), independent of Gram-Schmidt's loop
    H = torch.eye(D_IN) - 2 * Qr @ Qr.T
    out = model(x)
    ref = x @ H.T @ W.T + b
    _close(out, ref)
    gU, rU = torch.autograd.grad((out**2).sum(), U)[0], torch.autograd.grad((ref**2).sum(), U)[0]
    _close(gU, rU, rtol=1e-4)  # QR vs MGS backward: same function, different op order through r normalisations
    ll.detach(model)
    # GS off on the same U gives the product of reflections instead, a different map
    model = _attach(lin, "hra")
    with torch.no_grad():
        ad(lin).lora_U.copy_(U)
        assert (model(x) - out).abs().max() > 1e-3


def test_hra_symmetric_init_and_identity() -> None:
    lin = _linear()
    x = _x()
    y0 = lin(x)
    model = _attach(lin, "hra", r=8)
    U = ad(lin).lora_U
    assert torch.equal(U[0::2], U[1::2])  # adjacent pairs
    assert U.abs().max() <= 1 / math.sqrt(8 / 2)  # kaiming bound of a (d_in, r/2) tensor: fan_in = r/2
    assert torch.linalg.matrix_rank(U[0::2]) == 4
    _close(model(x), y0, rtol=1e-6)
    (model(x) ** 2).sum().backward()
    assert (U.grad.abs().sum(1) > 0).all()  # every u_i gets a gradient at a cancelling pair


def test_hra_odd_r_and_dropout_raise() -> None:
    with pytest.raises(ll.ConfigError, match="r must be even"):
        ll.LoraLiteConfig(variant="hra", r=3)
    with pytest.raises(ll.ConfigError, match="dropout"):
        ll.LoraLiteConfig(variant="hra", r=4, dropout=0.1)
    with pytest.raises(ll.ConfigError, match="apply_GS"):
        ll.LoraLiteConfig(variant="hra", r=4, variant_kwargs={"apply_GS": "yes"})


def test_hra_quantized_base_and_conv1d() -> None:
    from transformers.pytorch_utils import Conv1D

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = _bnb_4bit(_linear())
        model = _attach(q, "hra")
        _randomize(q)
        x = _x()
        out = model(x)
        with torch.no_grad():
            ref = q.forward(x @ _reflections(ad(q).lora_U).T)  # .forward bypasses the hook
    _close(out, ref)
    out.sum().backward()
    assert ad(q).lora_U.grad.abs().sum() > 0
    torch.manual_seed(0)
    conv = Conv1D(D_OUT, D_IN)
    model = _attach(conv, "hra")
    _randomize(conv)
    with torch.no_grad():
        _close(model(x), x @ _reflections(ad(conv).lora_U).T @ conv.weight + conv.bias)


# ====================================================================== parity with peft 0.21.2


def _peft_model(variant: str, lin: nn.Linear, **kw):
    import peft

    if variant == "dora":
        pcfg = peft.LoraConfig(r=R, lora_alpha=8, use_dora=True, target_modules=["lin"], **kw)
    elif variant == "delora":
        pcfg = peft.DeloraConfig(r=R, delora_lambda=15, target_modules=["lin"], **kw)
    else:
        pcfg = peft.HRAConfig(r=R, target_modules=["lin"], **kw)
    return peft.get_peft_model(One(lin), pcfg)


# peft tensor (under model.base_model.model.lin) -> ours, as a function of the peft tensor
MAPS = {
    "dora": {
        "lora_A.default.weight": ("lora_A", lambda t: t),
        "lora_B.default.weight": ("lora_B", lambda t: t),
        "lora_magnitude_vector.default.weight": ("lora_m", lambda t: t),
    },
    "delora": {
        "delora_A.default": ("lora_A", lambda t: t),
        "delora_B.default": ("lora_B", lambda t: t),
        "delora_lambda.default": ("lora_lambda", lambda t: t.reshape(())),
    },
    "hra": {"hra_u.default": ("lora_U", lambda t: t.T)},
}


@pytest.mark.parametrize(
    "variant, ours_kw, peft_kw",
    [
        ("dora", dict(alpha=8.0), {}),
        ("delora", {}, {}),
        ("hra", {}, {}),
        ("hra", dict(variant_kwargs={"apply_GS": True}), dict(apply_GS=True)),
    ],
)
def test_parity_with_peft(variant, ours_kw, peft_kw) -> None:
    base = _linear()
    pm = _peft_model(variant, copy.deepcopy(base), **peft_kw)
    player = pm.base_model.model.lin
    ours = _attach(copy.deepcopy(base), variant, **ours_kw)
    layer = ours.lin
    # init-time tensors computed from W agree before any copy
    if variant == "dora":
        _close(ad(layer).lora_m, ad(player).lora_magnitude_vector["default"].weight, rtol=1e-6)
    if variant == "delora":
        _close(ad(layer).lora_wnorm, player.delora_w_norm["default"], rtol=1e-6)
    # random non-init values in peft, copied into ours
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for pname, (oname, f) in MAPS[variant].items():
            p = player.get_parameter(pname)
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
            getattr(ad(layer), oname).copy_(f(p))
    pparams = {oname: player.get_parameter(pname) for pname, (oname, _) in MAPS[variant].items()}
    x = _x(7)
    target = torch.sin(torch.arange(D_OUT, dtype=torch.float32))

    def loss(m):
        return ((m(x) - target) ** 2).mean()

    _close(ours(x), pm(x))
    lp, lo = loss(pm), loss(ours)
    lp.backward()
    lo.backward()
    for oname, f in MAPS[variant].values():
        _close(getattr(ad(layer), oname).grad, f(pparams[oname].grad))
    opt_p = torch.optim.AdamW(list(pparams.values()), lr=1e-2)
    opt_o = torch.optim.AdamW([getattr(ad(layer), o) for o in pparams], lr=1e-2)
    for _ in range(10):
        for opt, m in ((opt_p, pm), (opt_o, ours)):
            opt.zero_grad()
            loss(m).backward()
            opt.step()
    for oname, f in MAPS[variant].values():
        _close(getattr(ad(layer), oname), f(pparams[oname]).detach())
    _close(ours(x), pm(x))


@pytest.mark.parametrize("variant", ["dora", "delora"])
def test_dropout_parity_with_peft(variant) -> None:
    """Same seed, same dropout mask: peft's DoRA feeds drop(x) to the base part of the correction too."""
    base = _linear()
    kw = dict(lora_dropout=0.5) if variant == "dora" else dict(module_dropout=0.5)
    pm = _peft_model(variant, copy.deepcopy(base), **kw)
    player = pm.base_model.model.lin
    ours = _attach(copy.deepcopy(base), variant, alpha=8.0, dropout=0.5)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for pname, (oname, f) in MAPS[variant].items():
            p = player.get_parameter(pname)
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
            getattr(ad(ours.lin), oname).copy_(f(p))
    pm.train()
    ours.train()
    x = _x(7)
    torch.manual_seed(3)
    yp = pm(x)
    torch.manual_seed(3)
    _close(ours(x), yp)


def test_hra_apply_gs_uses_random_init_and_stays_finite() -> None:
    """GS of peft's paired vectors is 0/0 (NaN or normalised noise): with apply_GS we init U randomly instead."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 3)
    model = _attach(lin, "hra", variant_kwargs={"apply_GS": True})
    assert torch.isfinite(model(torch.randn(5, 8))).all()
    U = ad(lin).lora_U
    assert not torch.equal(U[0], U[1]) and not torch.equal(U[2], U[3])  # not the symmetric pairs
    bound = 1 / math.sqrt(U.shape[0])  # kaiming-uniform(a=√5) on the (d_in, r) layout: fan_in = r
    assert U.abs().max() <= bound


def test_hra_apply_gs_refuses_r_above_d_in_naming_the_layer() -> None:
    lin = torch.nn.Linear(2, 3)
    with pytest.raises(ll.ConfigError, match=r"^lin \(2->3\): hra: apply_GS needs r <= d_in"):
        _attach(lin, "hra", r=4, variant_kwargs={"apply_GS": True})
    assert not hasattr(lin, "lora_U") and not lin._forward_pre_hooks
