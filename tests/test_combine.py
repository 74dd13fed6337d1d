"""ll.combine: peft's add_weighted_adapter for lora (same tensors), every variant through its effective weight,
the places where peft is wrong (rsLoRA, DoRA), and the refusals. Toy model, CPU."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from _models import Toy, ad, perturb_trained

import lora_lite as ll

TARGETS = (r"layers\.\d+\.(q|up|down)$",)
LAYERS = [f"layers.{i}.{m}" for i in range(2) for m in ("q", "up", "down")]


def _layer(model, lname):
    return model.get_submodule(lname)


def _x(layer, seed=3):
    return torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(seed))


def _close(a, b, rtol=1e-5):
    assert (a - b).abs().max() <= rtol * max(a.abs().max(), b.abs().max(), 1.0), (a - b).abs().max()


# ---------------------------------------------------------------- peft parity (lora, the same tensors)


def _pair(ranks=(4, 4), alphas=(8.0, 6.0), rslora=False, bias=True):
    from peft import LoraConfig, get_peft_model

    base = Toy(bias=bias)
    pm = None
    ours = copy.deepcopy(base)
    for i, (n, r, al) in enumerate(zip("ab", ranks, alphas)):
        pc = LoraConfig(r=r, lora_alpha=al, target_modules=["q", "up", "down"], use_rslora=rslora)
        if pm is None:
            pm = get_peft_model(copy.deepcopy(base), pc, adapter_name=n)
        else:
            pm.add_adapter(n, pc)
        kw = {"use_rslora": True} if rslora else {}
        ll.attach(ours, ll.LoraLiteConfig(r=r, alpha=al, target_names=TARGETS, variant_kwargs=kw), name=n)
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for lname in LAYERS:
                pl = pm.base_model.model.get_submodule(lname)
                pl.lora_B[n].weight.normal_(generator=g)
                pl.lora_A[n].weight.normal_(generator=g)
                ad(_layer(ours, lname), n).lora_A.copy_(pl.lora_A[n].weight)
                ad(_layer(ours, lname), n).lora_B.copy_(pl.lora_B[n].weight)
    return pm, ours


FACTOR_METHODS = [
    ("linear", None),
    ("ties", 0.5),
    ("dare_linear", 0.6),
    ("dare_ties", 0.6),
    ("magnitude_prune", 0.4),
]


def _seeded_peft_dare(monkeypatch, seed):
    """peft draws DARE's masks from the global RNG after its new adapter's init used it: give it a generator
    seeded like ours (`seed=`), same draws in the same order (per layer: the A's, then the B's)."""
    from peft.utils import merge_utils

    gen = torch.Generator().manual_seed(seed)

    def random_pruning(tensor, density, rescale):
        out = tensor * torch.bernoulli(torch.full_like(tensor, density), generator=gen)
        return out / density if rescale else out

    monkeypatch.setattr(merge_utils, "random_pruning", random_pruning)


@pytest.mark.parametrize("method,density", [*FACTOR_METHODS, ("cat", None)])
def test_factor_methods_equal_peft(method, density, monkeypatch):
    pm, ours = _pair(ranks=(4, 6) if method == "cat" else (4, 4))
    w = [0.7, -0.4]
    _seeded_peft_dare(monkeypatch, 5)
    pm.base_model.add_weighted_adapter(["a", "b"], w, "c", combination_type=method, density=density)
    errs = ll.combine(ours, {"a": w[0], "b": w[1]}, "c", method=method, density=density, seed=5)
    assert errs == dict.fromkeys(LAYERS, 0.0)
    for lname in LAYERS:
        pl, a = pm.base_model.model.get_submodule(lname), ad(_layer(ours, lname), "c")
        assert a._lora_lite.scale == pl.scaling["c"] == 1.0
        _close(a.lora_A, pl.lora_A["c"].weight, 1e-6)
        _close(a.lora_B, pl.lora_B["c"].weight, 1e-6)


@pytest.mark.parametrize("method,density", [("svd", None), ("ties_svd", 0.5), ("dare_linear_svd", 0.6)])
def test_svd_methods_equal_peft(method, density, monkeypatch):
    pm, ours = _pair(ranks=(4, 6))
    _seeded_peft_dare(monkeypatch, 2)
    pm.base_model.add_weighted_adapter(
        ["a", "b"], [1.0, 0.5], "c", combination_type=method, density=density, svd_rank=5
    )
    errs = ll.combine(ours, {"a": 1.0, "b": 0.5}, "c", method=method, r=5, density=density, seed=2)
    for lname in LAYERS:
        pl, a = pm.base_model.model.get_submodule(lname), ad(_layer(ours, lname), "c")
        _close(a.lora_B @ a.lora_A, pl.lora_B["c"].weight @ pl.lora_A["c"].weight)  # SVD signs may differ
        assert 0 < errs[lname] < 1


@torch.no_grad()
def test_cat_is_exact_and_svd_reports_truncation():
    _, ours = _pair(ranks=(4, 6))
    ll.combine(ours, {"a": 0.7, "b": -0.4}, "cat", method="cat")
    errs = ll.combine(ours, {"a": 0.7, "b": -0.4}, "low", method="svd", r=2)
    for lname in LAYERS:
        layer = _layer(ours, lname)
        A, B, c = ad(layer, "a"), ad(layer, "b"), ad(layer, "cat")
        want = 0.7 * A._lora_lite.scale * A.lora_B @ A.lora_A - 0.4 * B._lora_lite.scale * B.lora_B @ B.lora_A
        assert c.lora_A.shape[0] == 10
        _close(c.lora_B @ c.lora_A, want)
        L = ad(layer, "low")
        S = torch.linalg.svdvals(want)
        assert errs[lname] == pytest.approx((S[2:].square().sum() / S.square().sum()).sqrt().item(), rel=1e-4)
        assert torch.linalg.norm(want - L.lora_B @ L.lora_A) / torch.linalg.norm(want) == pytest.approx(
            errs[lname], rel=1e-3
        )


def test_rslora_peft_is_off_by_sqrt_r_ours_is_exact():
    """peft copies use_rslora into the combined config with alpha = r, so its scale is √r, not 1 (a √r error)."""
    pm, ours = _pair(ranks=(4, 4), rslora=True)
    pm.base_model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "c", combination_type="cat")
    ll.combine(ours, {"a": 1.0, "b": 1.0}, "c", method="cat")
    for lname in LAYERS:
        layer, pl = _layer(ours, lname), pm.base_model.model.get_submodule(lname)
        want = sum(ad(layer, n)._lora_lite.scale * ad(layer, n).lora_B @ ad(layer, n).lora_A for n in "ab")
        c = ad(layer, "c")
        _close(c._lora_lite.scale * c.lora_B @ c.lora_A, want)
        assert pl.scaling["c"] == pytest.approx(8**0.5)  # peft's combined adapter: r = 8, alpha = 8, rsLoRA
        _close(pl.get_delta_weight("c"), 8**0.5 * want)


def test_dora_peft_ignores_magnitudes_ours_is_exact():
    """peft combines DoRA's A, B as plain LoRA factors and re-initialises the magnitude to ‖W‖ (peft issue 3761);
    ours combines the effective weights."""
    from peft import LoraConfig, get_peft_model

    base = Toy(bias=False)
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q"], use_dora=True))
    ours = copy.deepcopy(base)
    ll.attach(ours, ll.LoraLiteConfig(variant="dora", r=4, alpha=8.0, target_names=(r"\.q$",)))
    perturb_trained(ours, "default", 1)
    x = _x(ours.layers[0].q)
    with ll.disabled(ours):
        y0 = ours.layers[0].q(x)
    yd = ours.layers[0].q(x)
    for lname in ("layers.0.q", "layers.1.q"):
        pl, a = pm.base_model.model.get_submodule(lname), ad(_layer(ours, lname))
        with torch.no_grad():
            pl.lora_A["default"].weight.copy_(a.lora_A)
            pl.lora_B["default"].weight.copy_(a.lora_B)
            pl.lora_magnitude_vector["default"].weight.copy_(a.lora_m)
    pm.base_model.add_weighted_adapter(["default"], [1.0], "c", combination_type="svd", svd_rank=16)
    ll.combine(ours, {"default": 1.0}, "c", method="svd", r=16)
    ll.set_active(ours, "c")
    _close(ours.layers[0].q(x), yd)  # exact: the combination of one DoRA with weight 1 is that DoRA
    pm.set_adapter("c")
    pq = pm.base_model.model.layers[0].q
    y_peft = pq(x)
    assert (y_peft - yd).abs().max() > 1e-3 * yd.abs().max()  # peft's is not
    assert (y0 - yd).abs().max() > 1e-3


# ---------------------------------------------------------------- every variant, against its forward


def _cfg(variant):
    from test_variants_common import CASES

    kw = dict(CASES[variant]["cfg"])
    return kw


@pytest.mark.parametrize("variant", sorted(__import__("test_variants_common").CASES))  # every registered variant
def test_every_variant_combines_to_its_layer_outputs(variant):
    """At full rank (16), layer_c(x) − layer_0(x) == 0.7·(layer_a(x) − layer_0(x)) − 0.4·(layer_b(x) − layer_0(x))."""
    model = Toy(bias=variant not in ("ia3", "road"))  # (their bias change is refused: test below)
    rewrites = ll.REGISTRY[variant].rewrites_weight
    calib = [torch.randn(8, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    for i, n in enumerate("ab"):
        kw = _cfg(variant)
        layers = (i,) if rewrites else None
        cfg = ll.LoraLiteConfig(variant=variant, target_names=TARGETS, layers=layers, **kw)
        ll.attach(model, cfg, calibration_data=calib if variant == "eva" else None, name=n)
        perturb_trained(model, n, i)
    xs = {lname: _x(_layer(model, lname)) for lname in LAYERS}
    outs = {}
    for key in ("a", "b", None):
        if key is None:
            with ll.disabled(model):
                outs[key] = {ln: _layer(model, ln)(x) for ln, x in xs.items()}
        else:
            ll.set_active(model, key)
            outs[key] = {ln: _layer(model, ln)(x) for ln, x in xs.items()}
    ll.set_active(model, ["a", "b"])
    errs = ll.combine(model, {"a": 0.7, "b": -0.4}, "c", method="svd", r=16, detach_sources=rewrites)
    assert max(errs.values()) < 1e-5
    ll.set_active(model, "c")
    for ln, x in xs.items():
        y0 = outs[None][ln]
        want = y0 + 0.7 * (outs["a"][ln] - y0) - 0.4 * (outs["b"][ln] - y0)
        _close(_layer(model, ln)(x), want)


def test_ia3_bias_change_is_refused_model_unchanged():
    model = Toy(bias=True)
    ll.attach(model, ll.LoraLiteConfig(variant="ia3", target_names=TARGETS), name="g")
    perturb_trained(model, "g", 0)
    with pytest.raises(ll.AdapterError, match=r"changes the bias of layers\.0\.q.*cannot carry"):
        ll.combine(model, {"g": 1.0}, "c", method="svd")
    assert ll.adapters(model) == ["g"]


# ---------------------------------------------------------------- refusals: nothing changes


def _two_loras(ranks=(4, 4), layers=(None, None)):
    model = Toy()
    for n, r, lay in zip("ab", ranks, layers):
        ll.attach(model, ll.LoraLiteConfig(r=r, target_names=TARGETS, layers=lay), name=n)
    return model


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(weights={"a": 1.0, "zz": 1.0}), "no adapter named 'zz'"),
        (dict(weights={"a": float("nan")}), "weight of adapter 'a' must be a finite number"),
        (dict(weights={"a": float("inf")}), "finite number"),
        (dict(weights={}), "non-empty dict"),
        (dict(weights={"a": 1.0}, name="a"), "already attached"),
        (dict(weights={"a": 1.0}, method="mean"), "unknown method 'mean'"),
        (dict(weights={"a": 1.0, "b": 1.0}, method="ties"), r"needs density=\.\.\. in \(0, 1\]"),
        (dict(weights={"a": 1.0, "b": 1.0}, method="ties", density=0.0), r"density must be in \(0, 1\]"),
        (dict(weights={"a": 1.0, "b": 1.0}, method="dare_ties", density=1.5), r"density must be in \(0, 1\]"),
        (dict(weights={"a": 1.0, "b": 1.0}, method="svd", density=0.5), "takes no density"),
        (dict(weights={"a": 1.0}, method="svd", r=0), "r must be an integer"),
    ],
)
def test_bad_input_changes_nothing(kwargs, match):
    model = _two_loras()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    kwargs = {"name": "c", **kwargs}
    with pytest.raises(ll.AdapterError, match=match):
        ll.combine(model, **kwargs)
    assert ll.adapters(model) == ["a", "b"]
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())


def test_factor_methods_need_one_rank_and_the_same_layers():
    model = _two_loras(ranks=(4, 6))
    with pytest.raises(ll.AdapterError, match=r"needs one rank; the ranks are \{'a': 4, 'b': 6\}"):
        ll.combine(model, {"a": 1.0, "b": 1.0}, "c", method="linear")
    model = _two_loras(layers=((0,), (0, 1)))
    with pytest.raises(ll.AdapterError, match=r"3 layers differ, e\.g\. layers\.1\.q \(not targeted by \['a'\]\)"):
        ll.combine(model, {"a": 1.0, "b": 1.0}, "c", method="ties", density=0.5)
    ll.combine(model, {"a": 1.0, "b": 1.0}, "c", method="ties_svd", density=0.5)  # dense: absent counts as zero
    assert ll.adapters(model) == ["a", "b", "c"]


def test_cat_refuses_dense_only_variants_and_rewriting_sources_need_detach():
    model = Toy()
    ll.attach(model, ll.LoraLiteConfig(variant="dora", target_names=TARGETS), name="d")
    with pytest.raises(ll.AdapterError, match=r"'cat' stacks low-rank factors, but adapter 'd' \(dora\)"):
        ll.combine(model, {"d": 1.0}, "c", method="cat")
    model = Toy()
    ll.attach(model, ll.LoraLiteConfig(variant="pissa", r=4, target_names=TARGETS), name="p")
    with pytest.raises(ll.AdapterError, match="Pass detach_sources=True"):
        ll.combine(model, {"p": 1.0}, "c")
    assert ll.adapters(model) == ["p"]


def test_truncation_error_is_logged(caplog):
    model = _two_loras()
    perturb_trained(model, "a", 0)
    with caplog.at_level(logging.INFO, logger="lora_lite"):
        ll.combine(model, {"a": 1.0, "b": 2.0}, "c", method="svd", r=1)
    assert "rank-1 SVD truncation, relative error max" in caplog.text


def test_docs_arithmetic_page_runs():
    """docs/arithmetic.md's python blocks run, in order, in one namespace."""
    from test_docs import DOCS, python_blocks

    ns = {"__name__": "__main__"}
    page = DOCS / "arithmetic.md"
    blocks = python_blocks(page)
    assert len(blocks) == 2
    for line, code in blocks:
        exec(compile("\n" * (line - 1) + code, str(page), "exec"), ns)
    assert ll.adapters(ns["model"]) == ["counting", "evens", "both"]


@torch.no_grad()
def test_gpt2_conv1d_layout():
    """GPT-2's Conv1D stores W as (d_in, d_out): cat (factors) and svd over pissa (dense, against the original
    weight) give the layers' own updates; the model output of a weight-1 combination equals the source's."""
    from _parity import base_model

    model = base_model("gpt2")
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    ll.attach(model, ll.LoraLiteConfig(r=4, alpha=8.0, layers=(0,)), name="a")
    ll.attach(model, ll.LoraLiteConfig(variant="pissa", r=4, alpha=8.0, layers=(1,)), name="p")
    perturb_trained(model, "a", 0)
    perturb_trained(model, "p", 1)
    want = model(input_ids=ids).logits
    ll.combine(model, {"a": 1.0}, "cat", method="cat")
    ll.set_active(model, ["cat", "p"])
    _close(model(input_ids=ids).logits, want)
    ll.detach(model, "cat")
    ll.combine(model, {"a": 1.0, "p": 1.0}, "both", method="svd", r=32, detach_sources=True)
    _close(model(input_ids=ids).logits, want)


def test_expert_weights_and_modules_to_save_are_refused(tmp_path) -> None:
    """combine and hotswap handle layer adapters only: target_parameters / modules_to_save adapters are refused
    naming the adapter (not silently dropped from the result), and nothing changes."""
    from _models import Toy
    from test_targets_params_patterns import qwen_moe

    m = qwen_moe()
    ll.attach(m, ll.LoraLiteConfig(r=2, target_roles=(), target_parameters=(r"experts\.gate_up_proj",)), name="e")
    with pytest.raises(ll.AdapterError, match="ll.combine: adapter 'e' uses target_parameters"):
        ll.combine(m, {"e": 1.0}, "c")
    t = Toy()
    ll.attach(t, ll.LoraLiteConfig(r=2, target_names=(r"up$",), modules_to_save=(r"layers\.1\.q$",)), name="s")
    ll.save(t, tmp_path / "s.safetensors", name="s")
    with pytest.raises(ll.AdapterError, match="ll.combine: adapter 's' uses modules_to_save"):
        ll.combine(t, {"s": 1.0}, "c")
    with pytest.raises(ll.AdapterError, match=r"ll.load\(replace=True\): adapter 's' uses modules_to_save"):
        ll.load(t, tmp_path / "s.safetensors", name="s", replace=True)
    assert ll.adapters(m) == ["e"] and ll.adapters(t) == ["s"]
